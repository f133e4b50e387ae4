"""The experiment behind docs/deepconf.md: majority voting (self-consistency) against DeepConf
offline and online, low (η = 0.1) and high (η = 0.9), at the same trace budget on the project's
verifiable problems: accuracy (95% bootstrap intervals, paired differences against majority
voting) and generated tokens per problem, and a plot of accuracy against tokens.

Every method answers each problem with the same seed, so trace i is the same sample in every
offline variant (they differ only in which traces vote and how much), and online's warm-up
traces are offline's first ones. Majority voting is DeepConf offline with `keep: 1` and
unweighted votes: one server path for all five.

    python -m clients.experiments.deepconf_eval run --out docs/deepconf
    python -m clients.experiments.deepconf_eval throughput --rounds 6   (mixed traffic)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from clients.experiments.problems import INSTRUCTIONS, Problem, generate
from clients.experiments.runs import (
    add_model_argument,
    experiment_server,
    paired_order,
    parse_recorded,
    pyplot,
)
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked

METHODS = {
    "majority vote": {"mode": "offline", "keep": 1.0, "weighted": False},
    "DeepConf-low offline": {"mode": "offline", "keep": 0.1},
    "DeepConf-high offline": {"mode": "offline", "keep": 0.9},
    "DeepConf-low online": {"mode": "online", "keep": 0.1},
    "DeepConf-high online": {"mode": "online", "keep": 0.9},
}


async def solve(url: str, problems: list[Problem], method: str, args) -> dict:
    gate = asyncio.Semaphore(args.concurrency)
    options = {**METHODS[method], "budget": args.budget, "window": args.window,
               "answer": "last_number"}
    if options["mode"] == "online":
        options |= {"warmup": args.warmup, "parallel": args.parallel}

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        async def one(index: int, problem: Problem) -> tuple[bool, int]:
            body = {"messages": [{"role": "user", "content": problem.question}],
                    "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "seed": 1000 * index, "steering": {"deepconf": options}}
            async with gate:
                reply = checked(await client.post("/v1/chat/completions", json=body))
            answer = reply["choices"][0]["steering"]["deepconf"]["answer"]
            correct = answer is not None and answer.replace(",", "") == str(problem.answer)
            return correct, reply["usage"]["completion_tokens"]

        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
    return {"method": method, "correct": [c for c, _ in results],
            "tokens": [t for _, t in results]}


def run(args) -> None:
    pyplot()  # the docs extra is there, before the run rather than at its end
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate(args.problems, seed=5, levels=tuple(args.levels),
                        instruction=args.instruction)
    server = None if args.url else experiment_server(args)
    url = args.url or server.base_url
    rows = []
    try:
        for method in METHODS:
            rows.append(asyncio.run(solve(url, problems, method, args)))
            print(json.dumps(rows[-1]), flush=True)
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        if server is not None:
            server.stop()
    report = {"model": model, "problems": len(problems), "levels": args.levels,
              "instruction": INSTRUCTIONS[args.instruction], "budget": args.budget,
              "warmup": args.warmup, "window": args.window, "parallel": args.parallel,
              "max_tokens": args.max_tokens,
              "temperature": args.temperature, "command": args.command_line, "rows": rows}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    plot(report, out / "accuracy_tokens.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    from clients.experiments.stats import interval_text, mean_interval, paired_difference

    lines = [
        f"Model {report['model']}, {report['problems']} problems (seed 5, levels "
        f"{', '.join(map(str, report['levels']))}; \"{report['instruction']}\"), budget "
        f"{report['budget']} traces, warm-up {report['warmup']} (online), window "
        f"{report['window']} tokens, {report['parallel']} online traces at a time, consensus "
        f"0.95, temperature {report['temperature']}, max_tokens {report['max_tokens']} per "
        "trace. 95% bootstrap intervals over problems; Δ is paired on the same problems. "
        f"Command: `{report['command']}`", "",
        "| method | accuracy | Δ vs majority vote | generated tokens / problem | tokens vs "
        "majority vote |",
        "|---|---|---|---|---|",
    ]
    base = report["rows"][0]
    for r in report["rows"]:
        delta = "" if r is base else interval_text(paired_difference(r["correct"],
                                                                     base["correct"]))
        share = sum(r["tokens"]) / sum(base["tokens"])
        lines.append(f"| {r['method']} | {interval_text(mean_interval(r['correct']))} | {delta} "
                     f"| {interval_text(mean_interval(r['tokens']), 0)} | {share:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy against generated tokens per problem, each with its 95% interval."""
    plt = pyplot()

    from clients.experiments.stats import mean_interval

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(report["rows"]):  # the offline rows share their traces: nested marks
        acc, acc_low, acc_high = mean_interval(r["correct"])
        tok, tok_low, tok_high = mean_interval(r["tokens"])
        axis.errorbar(tok, acc, xerr=[[tok - tok_low], [tok_high - tok]],
                      yerr=[[acc - acc_low], [acc_high - acc]], fmt="osDv^"[i], capsize=3,
                      markersize=12 - 2 * i, fillstyle="none", color=f"C{i}",
                      label=r["method"])
    axis.set_xlabel("generated tokens per problem")
    axis.set_ylabel("accuracy")
    axis.set_title(f"DeepConf on {report['model']}, budget {report['budget']}, "
                   f"{report['problems']} problems", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


async def mixed(url: str, deepconf: bool, args) -> dict:
    """Other users' traffic (`args.others` clients, `args.other_requests` plain completions
    each) while multi-trace requests run back to back: DeepConf offline measuring `budget`
    traces, or plain sampling of `n` = `budget` with the same lengths (`ignore_eos`), so the
    engine's batch is the same and only the confidence pass differs. Tokens per second of
    each side."""
    done = asyncio.Event()
    traces = {"prompt": "Count from one to one hundred:", "max_tokens": args.max_tokens,
              "temperature": 0.8, "ignore_eos": True}
    if deepconf:
        traces["steering"] = {"deepconf": {"mode": "offline", "budget": args.budget,
                                           "window": args.window}}
    else:
        traces["n"] = args.budget

    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        async def other(seed: int) -> int:
            tokens = 0
            for i in range(args.other_requests):
                body = {"prompt": "Once upon a time", "max_tokens": args.max_tokens,
                        "temperature": 0.8, "seed": seed * 1000 + i, "ignore_eos": True}
                reply = checked(await client.post("/v1/completions", json=body))
                tokens += reply["usage"]["completion_tokens"]
            return tokens

        async def multi() -> int:
            tokens = 0
            while not done.is_set():
                reply = checked(await client.post("/v1/completions", json=traces))
                tokens += reply["usage"]["completion_tokens"]
            return tokens

        started = time.monotonic()
        background = asyncio.create_task(multi())
        others = await asyncio.gather(*(other(c) for c in range(args.others)))
        seconds = time.monotonic() - started
        done.set()
        multi_tokens = await background
    return {"others_tokens_per_second": sum(others) / seconds,
            "multi_tokens_per_second": multi_tokens / (time.monotonic() - started)}


def throughput(args) -> None:
    """Paired rounds, order alternating: other users' tokens/s beside DeepConf against beside
    plain n-sampling of the same size, and the ratio per round."""
    server = None if args.url else experiment_server(args)
    url = args.url or server.base_url
    ratios, multi = [], []
    try:
        for round_ in range(args.rounds):
            got = {deepconf: asyncio.run(mixed(url, deepconf, args))
                   for deepconf in paired_order((False, True), round_)}
            ratios.append(got[True]["others_tokens_per_second"]
                          / got[False]["others_tokens_per_second"])
            multi.append(got[True]["multi_tokens_per_second"]
                         / got[False]["multi_tokens_per_second"])
            print(json.dumps({"round": round_, "deepconf": got[True], "plain": got[False],
                              "others_ratio": ratios[-1], "multi_ratio": multi[-1]}),
                  flush=True)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps({"others_ratio_median": statistics.median(ratios),
                      "others_ratio_range": [min(ratios), max(ratios)],
                      "multi_ratio_median": statistics.median(multi),
                      "multi_ratio_range": [min(multi), max(multi)]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.deepconf_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the accuracy / tokens experiment")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--problems", type=int, default=40)
    r.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    r.add_argument("--warmup", type=int, default=4)
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--temperature", type=float, default=0.8)
    r.add_argument("--concurrency", type=int, default=2)
    r.add_argument("--instruction", choices=INSTRUCTIONS, default="answer",
                   help="what follows each question (problems.INSTRUCTIONS)")
    t = sub.add_parser("throughput", help="other requests' tokens/s beside DeepConf")
    t.add_argument("--rounds", type=int, default=6)
    t.add_argument("--others", type=int, default=4, help="other clients")
    t.add_argument("--other-requests", type=int, default=6, help="requests per other client")
    for p, budget, max_tokens in ((r, 12, 96), (t, 8, 64)):
        p.add_argument("--url", help="use a running server instead of starting one")
        add_model_argument(p)
        p.add_argument("--budget", type=int, default=budget)
        p.add_argument("--window", type=int, default=16)
        p.add_argument("--max-tokens", type=int, default=max_tokens)
    args = parse_recorded(parser, argv)
    (run if args.command == "run" else throughput)(args)


if __name__ == "__main__":
    main()
