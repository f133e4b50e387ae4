"""Benchmark: plain vLLM's OpenAI server vs entropy-steer on the same model and request mix.

Both servers run side by side on loopback and are measured in rounds; each round runs every
scenario once, in a rotated order, after a short pause, so drift and the idle server's
wind-down hit every scenario alike. The median round of each scenario is reported. Every
request streams, so the time to first token is measured; `ignore_eos` keeps every completion
exactly `max_tokens` long.
Prints per-scenario throughput and median TTFT, and their ratios to plain vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from clients.local_server import LocalServer

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
}
BENCH_LAYER = 15


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

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


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
    args = parser.parse_args(argv)

    from server.cli import CPU_DEFAULT_BLOCK_SIZE, CPU_DEFAULT_KV_CACHE_BYTES
    from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    model_path = args.model or str(ensure_default_model())
    name = DEFAULT_MODEL_NAME if args.model is None else Path(args.model).name
    args.log_dir.mkdir(parents=True, exist_ok=True)
    # The settings `steer serve` defaults to on CPU, given to both servers.
    common = ["--model", model_path, "--served-model-name", name, "--dtype", "float32",
              "--kv-cache-memory-bytes", str(CPU_DEFAULT_KV_CACHE_BYTES),
              "--block-size", str(CPU_DEFAULT_BLOCK_SIZE), "--disable-uvicorn-access-log"]
    commands = {
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *common],
        "steer": [sys.executable, "-m", "server.cli", "serve", *common,
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
        results: dict[str, list[RunResult]] = {s: [] for s in SCENARIOS}
        names = list(SCENARIOS)
        for round_ in range(args.rounds):
            for scenario in names[round_ % len(names):] + names[:round_ % len(names)]:
                key, extra = SCENARIOS[scenario]
                time.sleep(args.pause)
                r = asyncio.run(run_mix(urls[key], name, extra, args.requests,
                                        args.concurrency, args.max_tokens))
                results[scenario].append(r)
                print(f"round {round_ + 1} {scenario:30s} {r.throughput:7.1f} tok/s "
                      f"median TTFT {statistics.median(r.ttfts):.3f} s", flush=True)
    finally:
        for server in servers.values():
            server.stop()

    best = {s: sorted(rs, key=lambda r: r.throughput)[len(rs) // 2] for s, rs in results.items()}
    base = best["plain vLLM"]
    base_ttft = statistics.median(base.ttfts)
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, {args.concurrency} concurrent, "
          f"median of {args.rounds} rounds\n")
    print("| scenario | tok/s | x plain | median TTFT s | x plain |")
    print("|---|---:|---:|---:|---:|")
    table = {}
    for scenario, r in best.items():
        ttft = statistics.median(r.ttfts)
        table[scenario] = {"tokens_per_s": r.throughput, "throughput_ratio": r.throughput /
                           base.throughput, "median_ttft_s": ttft, "ttft_ratio": ttft / base_ttft}
        print(f"| {scenario} | {r.throughput:.1f} | {r.throughput / base.throughput:.3f} | "
              f"{ttft:.3f} | {ttft / base_ttft:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json),
                                         "log_dir": str(args.log_dir)}, "results": table},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
