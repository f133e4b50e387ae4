"""Load test: many concurrent requests mixing every steering mode with plain ones.

Fails (exit status 1) if any request fails, if the engine is still busy afterwards, or if a
request's outcome under load differs from its outcome alone: every request is greedy or seeded
(its seed fixed by its prompt), every (mode, prompt) pair is first sent once, one request at a
time, and each request in the load must return exactly that text, and the same per-token
entropy (within float noise) where it reports it, so a request's neighbours in a batch cannot
have changed it. Reports latency percentiles per mode, throughput, and the resident memory of
the server's whole process tree (API process, engine, workers) before, at the peak of, and
after the load.

    python -m clients.bench.loadtest --requests 500 --concurrency 32 --out docs/hardening
    python -m clients.bench.loadtest --duration 1800 --concurrency 16 --out docs/hardening/soak

starts the bundled model's server (vLLM's default, compiled mode) and stops it afterwards;
`--base-url` (with `--server-pid` for memory) tests a running one instead.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from clients.bench.serve import PROMPTS
from clients.files import write_text_atomic


@dataclass(frozen=True)
class Mode:
    """One kind of request: route, fields beside the prompt, streamed or not. Its outcome
    under load must equal its outcome alone (greedy, or seeded by its prompt)."""

    route: str  # "completions" or "chat"
    body: dict = field(default_factory=dict)
    stream: bool = False


ENTROPY = {"return_entropy": True}
ENTROPY_TOLERANCE = 2e-3  # nats: a batched float32 forward against a one-row one

# The request mix, cycled through in this order. Each steering method has an entry; a new method
# adds its own (EAST and DiffAdapt use the bundled model's `explore` vector and `default` probe).
MODES: dict[str, Mode] = {
    "plain greedy": Mode("completions", {"temperature": 0}),
    "plain greedy chat": Mode("chat", {"temperature": 0}),
    "plain greedy stream": Mode("completions", {"temperature": 0}, stream=True),
    "plain sampled": Mode("chat", {"temperature": 1.0, "steering": ENTROPY}),
    "entropy report": Mode("chat", {"temperature": 0, "steering": ENTROPY}),
    "typical": Mode("completions", {"typical_p": 0.9, "steering": ENTROPY}),
    "typical tight": Mode("chat", {"typical_p": 0.3}),
    "east": Mode("completions", {"temperature": 0, "steering": {
        "east": {"vector": "explore", "scale": 4.0}, **ENTROPY}}),
    "diffadapt": Mode("chat", {"steering": {"diffadapt": {"probe": "default"}}}),
    "particles": Mode("chat", {"steering": {"particles": {"n": 2, "max_steps": 2}}}),
    "vreason": Mode("chat", {"steering": {"vreason": {"every": 4, "steps": 2}, **ENTROPY}}),
}


@dataclass
class Outcome:
    mode: str
    prompt: int
    seconds: float
    text: str | None = None
    tokens: int = 0
    entropy: list[float | None] | None = None  # the report's `token_entropy`, when asked
    error: str | None = None
    ended: float = 0.0  # time.perf_counter() when it finished

    def differs_from(self, solo: Outcome) -> bool:
        if self.text != solo.text or (self.entropy is None) != (solo.entropy is None):
            return True
        return self.entropy is not None and (len(self.entropy) != len(solo.entropy) or any(
            (a is None) != (b is None) or (a is not None and abs(a - b) > ENTROPY_TOLERANCE)
            for a, b in zip(self.entropy, solo.entropy)))


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
            outcome.entropy = choice["steering"].get("token_entropy")
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the run
        outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.ended = time.perf_counter()
    outcome.seconds = outcome.ended - start
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


def process_rss(pid: int | None) -> dict[int, tuple[str, int]]:
    """Resident bytes of a process and each of its descendants, by pid (with its name)."""
    if pid is None:
        return {}
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    sizes = {}
    for process in processes:
        try:
            sizes[process.pid] = (process.name(), process.memory_info().rss)
        except psutil.NoSuchProcess:
            pass
    return sizes


def tree_rss(pid: int | None) -> int | None:
    """Resident bytes of a process and all its descendants."""
    sizes = process_rss(pid)
    return sum(rss for _, rss in sizes.values()) if sizes else None


def slope_mib_per_hour(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of resident memory over time."""
    if len(samples) < 3:
        return None
    times, sizes = [t for t, _ in samples], [r / 2**20 for _, r in samples]
    mean_t, mean_r = statistics.fmean(times), statistics.fmean(sizes)
    spread = sum((t - mean_t) ** 2 for t in times)
    return sum((t - mean_t) * (r - mean_r) for t, r in zip(times, sizes)) / spread * 3600


async def engine_running(client: httpx.AsyncClient,
                         gauges=("vllm:num_requests_running{",)) -> float:
    """vLLM's count of requests in its batch (and, with the waiting gauge, queued)."""
    text = (await client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(gauges))


async def engine_idle(client: httpx.AsyncClient, timeout: float = 60) -> bool:
    """Whether vLLM's running and waiting gauges fall to zero (nothing left behind)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = await engine_running(client, ("vllm:num_requests_running{",
                                             "vllm:num_requests_waiting{"))
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
              progress=print, duration_s: float | None = None,
              window_s: float = 300) -> dict:
    """Solo references, then `requests` requests at `concurrency` at once; the report. With
    `duration_s` (a soak), `concurrency` clients cycle through the mix until that much time
    has passed, and the report adds latency per `window_s` window and each server process's
    resident-memory slope."""
    names = list(MODES)

    def case(i: int) -> tuple[str, int]:
        return names[i % len(names)], (i // len(names)) % prompts

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600,
                                 limits=limits) as client:
        solo = {}
        for name in names:
            for prompt in range(prompts):
                outcome = await send(client, name, prompt, max_tokens, seed=prompt)
                if outcome.error:
                    raise SystemExit(f"solo {name} #{prompt} failed: {outcome.error}")
                solo[name, prompt] = outcome
        progress(f"{len(solo)} solo references taken")
        rss_before, running = tree_rss(server_pid), [0.0]
        memory: dict[int, tuple[str, list[tuple[float, int]]]] = {}
        totals: list[tuple[float, int]] = []  # (time, the whole tree's RSS)

        async def sample_memory() -> None:
            while True:
                sizes = process_rss(server_pid)
                now = time.perf_counter()
                totals.append((now, sum(rss for _, rss in sizes.values())))
                for pid, (name, rss) in sizes.items():
                    memory.setdefault(pid, (name, []))[1].append((now, rss))
                running[0] = max(running[0], await engine_running(client))
                await asyncio.sleep(1 if duration_s is None else min(10, window_s / 4))

        sampler = asyncio.create_task(sample_memory())
        started = time.perf_counter()
        if duration_s is None:
            gate = asyncio.Semaphore(concurrency)

            async def limited(name: str, prompt: int) -> Outcome:
                async with gate:
                    return await send(client, name, prompt, max_tokens, seed=prompt)

            outcomes = await asyncio.gather(*(limited(*case(i)) for i in range(requests)))
        else:
            cases, deadline = itertools.count(), started + duration_s

            async def client_loop() -> list[Outcome]:
                done = []
                while time.perf_counter() < deadline:
                    name, prompt = case(next(cases))
                    done.append(await send(client, name, prompt, max_tokens, seed=prompt))
                return done

            outcomes = [o for done in await asyncio.gather(
                *(client_loop() for _ in range(concurrency))) for o in done]
        duration = time.perf_counter() - started
        sampler.cancel()
        idle = await engine_idle(client)
        rss_after = tree_rss(server_pid)
    failed = [o for o in outcomes if o.error]
    mismatched = [o for o in outcomes if not o.error and o.differs_from(solo[o.mode, o.prompt])]
    report = {
        "requests": len(outcomes), "concurrency": concurrency, "max_tokens": max_tokens,
        "modes": {name: {"route": m.route, "body": m.body, "stream": m.stream,
                         "count": sum(o.mode == name for o in outcomes)}
                  for name, m in MODES.items()},
        "failures": len(failed),
        "failed": [{"mode": o.mode, "error": o.error} for o in failed[:20]],
        "checked": sum(not o.error for o in outcomes),
        "entropy_checked": sum(o.entropy is not None for o in outcomes if not o.error),
        "mismatches": len(mismatched),
        "mismatched": [{"mode": o.mode, "prompt": o.prompt, "solo": solo[o.mode, o.prompt].text,
                        "under_load": o.text} for o in mismatched[:20]],
        "engine_idle_after": idle,
        "peak_running": running[0],  # requests in one engine batch, sampled every second
        "duration_s": round(duration, 2),
        "requests_per_s": round(len(outcomes) / duration, 2),
        "completion_tokens_per_s": round(sum(o.tokens for o in outcomes) / duration, 1),
        "latency_s": {"all": percentiles([o.seconds for o in outcomes]), **{
            name: percentiles([o.seconds for o in outcomes if o.mode == name])
            for name in names}},
        "memory_rss_mib": {"before": _mib(rss_before),
                           "peak": _mib(max((r for _, r in totals), default=0) or None),
                           "after": _mib(rss_after)},
    }
    if duration_s is not None:
        windows = range(math.ceil(duration / window_s))

        def at_end(samples: list[tuple[float, int]], w: int) -> float | None:
            """The last RSS sampled in window `w`."""
            return _mib(next((r for t, r in reversed(samples)
                              if t - started < (w + 1) * window_s), None))

        report["windows"] = [{
            "start_s": w * window_s,
            "requests": len(batch := [o for o in outcomes
                                      if w * window_s <= o.ended - started < (w + 1) * window_s]),
            "failures": sum(o.error is not None for o in batch),
            "rss_mib": at_end(totals, w),
            **percentiles([o.seconds for o in batch])} for w in windows]
        report["processes"] = [{
            "pid": pid, "name": name, "first_mib": _mib(samples[0][1]),
            "last_mib": _mib(samples[-1][1]),
            "window_end_mib": [at_end(samples, w) for w in windows],
            "slope_mib_per_hour": slope_mib_per_hour(samples),
            # the first window holds the warm-up (allocator pools for new batch shapes)
            "slope_after_first_window_mib_per_hour": slope_mib_per_hour(
                [(t, r) for t, r in samples if t - started >= window_s])}
            for pid, (name, samples) in sorted(memory.items())]
    return report


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
        f"{report['checked']} requests compared with their solo outcome "
        f"({report['entropy_checked']} with per-token entropy): "
        f"**{report['mismatches']} differed**; at most {report['peak_running']:.0f} requests "
        f"in one engine batch; engine idle afterwards: "
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
    if "windows" in report:
        lines += ["", "| window from | requests | failed | p50 s | p90 s | p99 s | tree RSS MiB |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {w['start_s'] / 60:.0f} min | {w['requests']} | {w['failures']} | "
                  f"{cell(w['p50'])} | {cell(w['p90'])} | {cell(w['p99'])} | {w['rss_mib']} |"
                  for w in report["windows"]]
        lines += ["", "| process | pid | RSS first MiB | RSS at each window's end MiB | "
                  "RSS last MiB | slope MiB/h | slope after the first window MiB/h |",
                  "|---|---:|---:|---|---:|---:|---:|"]
        lines += [f"| {p['name']} | {p['pid']} | {p['first_mib']} | "
                  f"{', '.join(str(m) for m in p['window_end_mib'])} | {p['last_mib']} | "
                  f"{cell(p['slope_mib_per_hour'])} | "
                  f"{cell(p['slope_after_first_window_mib_per_hour'])} |"
                  for p in report["processes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.bench.loadtest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server (default: start one)")
    parser.add_argument("--api-key", help="for --base-url")
    parser.add_argument("--server-pid", type=int, help="for --base-url: whose memory to report")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--duration", type=float, help="a soak: keep the load up this many "
                        "seconds (instead of --requests), with latency per --window and each "
                        "server process's memory slope")
    parser.add_argument("--window", type=float, default=300, help="seconds per latency window")
    parser.add_argument("--out", type=Path, help="write loadtest.json and loadtest.md here")
    parser.add_argument("--log-dir", type=Path, default=Path("bench-logs/loadtest"))
    args = parser.parse_args(argv)
    command = "python -m clients.bench.loadtest " + " ".join(
        argv if argv is not None else sys.argv[1:])

    server = None
    if args.base_url is None:
        from clients.bench.local_server import steer_server

        args.log_dir.mkdir(parents=True, exist_ok=True)
        server = steer_server(args.log_dir / "server.log", "--disable-uvicorn-access-log")
        url, pid = server.base_url, server.process.pid
        print(f"server ready at {url}", flush=True)
    else:
        url, pid = args.base_url, args.server_pid
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        report = asyncio.run(run(url, headers, args.requests, args.concurrency, args.max_tokens,
                                 server_pid=pid, progress=lambda m: print(m, flush=True),
                                 duration_s=args.duration, window_s=args.window))
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
