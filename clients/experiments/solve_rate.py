"""How well a model solves the project's problems, and at what cost: the measurement behind the
choice of the experiments' model (docs/models.md).

Greedy, single-shot answers to generated problems at each level (the same number of every kind
per level): the solve rate per level with its 95% interval, output tokens, and what serving
cost on this machine: one stream's decode tokens/s, the batch's tokens/s at --concurrency, and
the server's resident memory (every process of it) at the end.

    python -m clients.experiments.solve_rate --out docs/models/SmolLM2-135M-Instruct
    python -m clients.experiments.solve_rate --model Qwen2.5-Coder-0.5B-Instruct \\
        --instruction steps --out docs/models/Qwen2.5-Coder-0.5B-Instruct

Each run writes OUT/solve-rate-INSTRUCTION.md (the table, the costs, the command) and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from clients.experiments.problems import INSTRUCTIONS, KINDS, LEVELS, Problem, generate, is_correct
from clients.experiments.runs import (
    add_model_argument,
    experiment_server,
    gather_bounded,
    parse_recorded,
    tree_rss_mib,
)
from clients.experiments.stats import interval_text, mean_interval
from clients.files import write_text_atomic
from clients.sdk import checked


async def answer(client: httpx.AsyncClient, problem: Problem, max_tokens: int) -> dict:
    reply = checked(await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": problem.question}],
        "max_tokens": max_tokens, "temperature": 0}))
    choice = reply["choices"][0]
    return {"level": problem.level, "kind": problem.kind,
            "correct": is_correct(choice["message"]["content"], problem.answer),
            "tokens": reply["usage"]["completion_tokens"],
            "cut": choice["finish_reason"] == "length"}


async def measure(url: str, problems: list[Problem], args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        await answer(client, problems[0], 8)  # warm-up
        start = time.monotonic()
        alone = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Count from 1 to 200, one per line."}],
            "max_tokens": 128, "temperature": 0, "ignore_eos": True})
        single = checked(alone)["usage"]["completion_tokens"] / (time.monotonic() - start)
        start = time.monotonic()
        answers = await gather_bounded(
            [answer(client, problem, args.max_tokens) for problem in problems], args.concurrency)
        seconds = time.monotonic() - start
    return {"answers": answers, "single_stream_tokens_per_s": single,
            "batch_tokens_per_s": sum(a["tokens"] for a in answers) / seconds}


def _row(label, answers: list[dict]) -> str:
    solved = interval_text(mean_interval([float(a["correct"]) for a in answers]))
    return (f"| {label} | {solved} | {statistics.fmean(a['tokens'] for a in answers):.0f} "
            f"| {sum(a['cut'] for a in answers)} of {len(answers)} |")


def report(model: str, measured: dict, memory: float | None, args) -> str:
    answers = measured["answers"]
    by_kind = {kind: statistics.fmean(float(a["correct"]) for a in answers if a["kind"] == kind)
               for kind in KINDS}
    lines = [f"# Solve rate and cost: {model}", "",
             "Greedy single-shot answers to the project's problems (`clients/experiments/"
             f"problems.py`, seed {args.seed}, {args.per_level} per level: the kinds "
             f"{', '.join(KINDS)} in turn), each followed by \"{INSTRUCTIONS[args.instruction]}\", "
             f"at most {args.max_tokens} output tokens.", "",
             "| level | solved (95% interval) | mean output tokens | cut at the limit |",
             "|---|---|---|---|",
             *(_row(level, [a for a in answers if a["level"] == level]) for level in args.levels),
             _row("all", answers), "",
             "By kind (all levels): " + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items())
             + ".", "",
             f"- one stream's decode: {measured['single_stream_tokens_per_s']:.1f} tokens/s",
             f"- the problems at concurrency {args.concurrency}: "
             f"{measured['batch_tokens_per_s']:.1f} tokens/s"]
    if memory is not None:
        lines.append(f"- the server's resident memory (all its processes): "
                     f"{memory / 1024:.1f} GiB")
    return "\n".join([*lines, "", f"Command: `{args.command_line}`", ""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.solve_rate",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--per-level", type=int, default=16)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--instruction", choices=INSTRUCTIONS, default="answer",
                        help="what follows each question (problems.INSTRUCTIONS)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parse_recorded(parser, argv)
    problems = generate(args.per_level * len(args.levels), args.seed, levels=tuple(args.levels),
                        instruction=args.instruction)
    server = None
    if not args.url:
        server = experiment_server(args)
    url = args.url or server.base_url
    try:
        measured = asyncio.run(measure(url, problems, args))
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
        memory = tree_rss_mib(server.process.pid) if server else None
    finally:
        if server:
            server.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / f"solve-rate-{args.instruction}.json", json.dumps(
        {"model": model, **measured, "resident_mib": memory}, indent=1) + "\n")
    text = report(model, measured, memory, args)
    write_text_atomic(args.out / f"solve-rate-{args.instruction}.md", text)
    print(text)


if __name__ == "__main__":
    main()
