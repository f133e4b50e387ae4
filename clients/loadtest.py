"""Load test: many concurrent requests mixing every steering mode with plain ones.

Fails (exit status 1) if any request fails, if the engine is still busy afterwards, or if a
greedy request's output under load differs from its output alone: every greedy (mode, prompt)
pair is first sent once, one request at a time, and each greedy request in the load must return
exactly that text, so a request's neighbours in a batch cannot have changed it. Reports latency
percentiles per mode, throughput, and the resident memory of the server's whole process tree
(API process, engine, workers) before, at the peak of, and after the load.

    python -m clients.loadtest --requests 500 --concurrency 32 --out docs/hardening

starts the bundled model's server (vLLM's default, compiled mode) and stops it afterwards;
`--base-url` (with `--server-pid` for memory) tests a running one instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from clients.bench import PROMPTS
from clients.problems import write_text_atomic


@dataclass(frozen=True)
class Mode:
    """One kind of request: route, fields beside the prompt, streamed or not; a greedy mode's
    output under load must equal its solo output."""

    route: str  # "completions" or "chat"
    body: dict = field(default_factory=dict)
    greedy: bool = False
    stream: bool = False


# The request mix, cycled through in this order. Each steering method has an entry; a new method
# adds its own (EAST and DiffAdapt use the bundled model's `explore` vector and `default` probe).
MODES: dict[str, Mode] = {
    "plain greedy": Mode("completions", {"temperature": 0}, greedy=True),
    "plain greedy chat": Mode("chat", {"temperature": 0}, greedy=True),
    "plain greedy stream": Mode("completions", {"temperature": 0}, greedy=True, stream=True),
    "plain sampled": Mode("chat", {"temperature": 1.0}),
    "entropy report": Mode("chat", {"temperature": 0, "steering": {"return_entropy": True}},
                           greedy=True),
    "typical": Mode("completions", {"typical_p": 0.9}),
    "east": Mode("completions", {"temperature": 0,
                                 "steering": {"east": {"vector": "explore", "scale": 4.0}}},
                 greedy=True),
    "diffadapt": Mode("chat", {"steering": {"diffadapt": {"probe": "default"}}}),
    "particles": Mode("chat", {"steering": {"particles": {"n": 2, "max_steps": 2}}}),
    "vreason": Mode("chat", {"steering": {"vreason": {"every": 4, "steps": 2}}}),
}


@dataclass
class Outcome:
    mode: str
    prompt: int
    seconds: float
    text: str | None = None
    tokens: int = 0
    error: str | None = None


def request_body(mode: Mode, prompt: str, max_tokens: int, seed: int) -> dict:
    body = {"max_tokens": max_tokens, "seed": seed, "stream": mode.stream, **mode.body}
    if mode.stream:
        body["stream_options"] = {"include_usage": True}
    if mode.route == "chat":
        return {"messages": [{"role": "user", "content": prompt}], **body}
    return {"prompt": prompt, **body}


async def send(client: httpx.AsyncClient, name: str, prompt: int, max_tokens: int,
               seed: int) -> Outcome:
    """One request; any failure (status, in-band stream error, malformed reply) is recorded."""
    mode = MODES[name]
    body = request_body(mode, PROMPTS[prompt], max_tokens, seed)
    path = "/v1/chat/completions" if mode.route == "chat" else "/v1/completions"
    start = time.perf_counter()
    outcome = Outcome(name, prompt, 0.0)
    try:
        if mode.stream:
            outcome.text, outcome.tokens = await _streamed(client, path, body)
        else:
            reply = await client.post(path, json=body)
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text[:300]}")
            data = reply.json()
            choice = data["choices"][0]
            outcome.text = choice["message"]["content"] if mode.route == "chat" \
                else choice["text"]
            outcome.tokens = data["usage"]["completion_tokens"]
            if "methods" not in choice["steering"]:
                raise RuntimeError("no steering report")
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.seconds = time.perf_counter() - start
    return outcome


async def _streamed(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, int]:
    text, tokens, done = "", 0, False
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                text += "".join(c.get("text", "") for c in chunk["choices"])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return text, tokens


def tree_rss(pid: int | None) -> int | None:
    """Resident bytes of a process and all its descendants."""
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return None


async def engine_idle(client: httpx.AsyncClient, timeout: float = 60) -> bool:
    """Whether vLLM's running and waiting gauges fall to zero (nothing left behind)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get("/metrics")).text
        busy = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(("vllm:num_requests_running{",
                                       "vllm:num_requests_waiting{")))
        if busy == 0 or time.monotonic() > deadline:
            return busy == 0
        await asyncio.sleep(0.5)


def _mib(size: int | None) -> float | None:
    return None if size is None else round(size / 2**20, 1)


def percentiles(values: list[float]) -> dict:
    if len(values) < 2:
        return {"p50": values[0] if values else None, "p90": None, "p99": None, "max": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98], "max": max(values)}


async def run(url: str, headers: dict, requests: int, concurrency: int, max_tokens: int,
              prompts: int = len(PROMPTS), server_pid: int | None = None,
              progress=print) -> dict:
    """Solo greedy references, then `requests` requests at `concurrency` at once; the report."""
    names = list(MODES)
    plan = [(names[i % len(names)], (i // len(names)) % prompts) for i in range(requests)]
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as client:
        solo = {}
        for name in names:
            for prompt in range(prompts):
                if MODES[name].greedy:
                    outcome = await send(client, name, prompt, max_tokens, seed=0)
                    if outcome.error:
                        raise SystemExit(f"solo {name} #{prompt} failed: {outcome.error}")
                    solo[name, prompt] = outcome.text
        progress(f"{len(solo)} solo greedy references taken")
        rss_before, peak = tree_rss(server_pid), [0]

        async def sample_memory() -> None:
            while True:
                peak[0] = max(peak[0], tree_rss(server_pid) or 0)
                await asyncio.sleep(1)

        gate = asyncio.Semaphore(concurrency)

        async def limited(i: int, name: str, prompt: int) -> Outcome:
            async with gate:
                return await send(client, name, prompt, max_tokens, seed=i)

        sampler = asyncio.create_task(sample_memory())
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(limited(i, n, p) for i, (n, p) in enumerate(plan)))
        duration = time.perf_counter() - started
        sampler.cancel()
        idle = await engine_idle(client)
        rss_after = tree_rss(server_pid)
    failed = [o for o in outcomes if o.error]
    mismatched = [o for o in outcomes if not o.error and MODES[o.mode].greedy
                  and o.text != solo[o.mode, o.prompt]]
    return {
        "requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
        "modes": {name: {"route": m.route, "body": m.body, "greedy": m.greedy,
                         "stream": m.stream, "count": sum(n == name for n, _ in plan)}
                  for name, m in MODES.items()},
        "failures": len(failed),
        "failed": [{"mode": o.mode, "error": o.error} for o in failed[:20]],
        "greedy_checked": sum(MODES[o.mode].greedy for o in outcomes if not o.error),
        "mismatches": len(mismatched),
        "mismatched": [{"mode": o.mode, "prompt": o.prompt, "solo": solo[o.mode, o.prompt],
                        "under_load": o.text} for o in mismatched[:20]],
        "engine_idle_after": idle,
        "duration_s": round(duration, 2),
        "requests_per_s": round(requests / duration, 2),
        "completion_tokens_per_s": round(sum(o.tokens for o in outcomes) / duration, 1),
        "latency_s": {"all": percentiles([o.seconds for o in outcomes]), **{
            name: percentiles([o.seconds for o in outcomes if o.mode == name])
            for name in names}},
        "memory_rss_mib": {"before": _mib(rss_before), "peak": _mib(peak[0] or None),
                           "after": _mib(rss_after)},
    }


def passed(report: dict) -> bool:
    return (report["failures"] == 0 and report["mismatches"] == 0
            and report["engine_idle_after"])


def markdown(report: dict, command: str) -> str:
    def cell(value) -> str:
        return "–" if value is None else f"{value:.2f}"

    memory = report["memory_rss_mib"]
    lines = [
        f"`{command}`", "",
        f"{report['requests']} requests, {report['concurrency']} at a time, max_tokens "
        f"{report['max_tokens']}: **{report['failures']} failed**, "
        f"{report['greedy_checked']} greedy requests compared with their solo output: "
        f"**{report['mismatches']} differed**; engine idle afterwards: "
        f"{'yes' if report['engine_idle_after'] else 'NO'}.", "",
        f"{report['duration_s']} s, {report['requests_per_s']} requests/s, "
        f"{report['completion_tokens_per_s']} completion tokens/s. " + (
            f"Server process tree RSS: {memory['before']} MiB before, {memory['peak']} MiB "
            f"peak, {memory['after']} MiB after." if memory["before"] is not None
            else "Server memory not measured (no --server-pid)."), "",
        "| mode | requests | p50 s | p90 s | p99 s | max s |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, latency in report["latency_s"].items():
        count = report["requests"] if name == "all" else report["modes"][name]["count"]
        lines.append(f"| {name} | {count} | {cell(latency['p50'])} | {cell(latency['p90'])} "
                     f"| {cell(latency['p99'])} | {cell(latency['max'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (default: start one)")
    parser.add_argument("--api-key", help="for --base-url")
    parser.add_argument("--server-pid", type=int, help="for --base-url: whose memory to report")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write loadtest.json and loadtest.md here")
    parser.add_argument("--log-dir", type=Path, default=Path("bench-logs/loadtest"))
    args = parser.parse_args(argv)
    command = "python -m clients.loadtest " + " ".join(argv if argv is not None else sys.argv[1:])

    server = None
    if args.base_url is None:
        from clients.local_server import steer_server

        args.log_dir.mkdir(parents=True, exist_ok=True)
        server = steer_server(args.log_dir / "server.log", "--disable-uvicorn-access-log")
        url, pid = server.base_url, server.process.pid
        print(f"server ready at {url}", flush=True)
    else:
        url, pid = args.base_url, args.server_pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        report = asyncio.run(run(url, headers, args.requests, args.concurrency, args.max_tokens,
                                 server_pid=pid, progress=lambda m: print(m, flush=True)))
    finally:
        if server is not None:
            server.stop()
    text = markdown(report, command)
    print(text)
    if args.out:
        write_text_atomic(args.out / "loadtest.json", json.dumps(report, indent=2) + "\n")
        write_text_atomic(args.out / "loadtest.md", text)
    sys.exit(0 if passed(report) else 1)


if __name__ == "__main__":
    main()
