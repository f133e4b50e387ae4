"""The experiment behind docs/particles.md: single sampling, best-of-n, PF and ePF on the
project's verifiable problems, with accuracy (95% bootstrap intervals, paired differences),
generated tokens, wall time and throughput, and a plot of the accuracies.

Every method answers the same held-out problems with the same reward (self-certainty):
best-of-n samples n whole answers (plain `n`) and keeps the one with the highest
exp(-mean token entropy); PF is Puri et al.'s (multinomial resampling, no annealing); ePF adds
Entropic Annealing (ESS rule, systematic resampling) and then Look-ahead Modulation. The
throughput ratio ePF / best-of-n at the same n is the benchmark the issue asks for (same
prompts, same run).

    python -m clients.experiments.particles_eval run --out docs/particles
    python -m clients.experiments.particles_eval throughput --n 8 --rounds 2   (the ratio alone)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from clients.experiments.problems import Problem, generate, is_correct
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked

METHODS = {
    "best-of-n": None,
    "PF": {"annealing": "none", "resampling": "multinomial"},
    "ePF (EA)": {"annealing": "ess", "resampling": "systematic"},
    "ePF (EA + LaM)": {"annealing": "ess", "resampling": "systematic", "lookahead": True},
}


async def solve(url: str, problems: list[Problem], method: str, n: int, args) -> dict:
    gate = asyncio.Semaphore(args.concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(problem: Problem) -> tuple[bool, int]:
            body = {"messages": [{"role": "user", "content": problem.question}],
                    "max_tokens": args.max_tokens, "temperature": 0.8}
            if method == "best-of-n":
                body |= {"n": n, "steering": {"return_entropy": True}}
            else:
                body["steering"] = {"particles": {
                    "n": n, "step_delimiter": args.delimiter, "max_steps": args.max_steps,
                    **METHODS[method]}}
            async with gate:
                reply = checked(await client.post("/v1/chat/completions", json=body))
            if method == "best-of-n":
                best = max(reply["choices"], key=lambda c: certainty(c["steering"]))
                text = best["message"]["content"]
            else:
                text = reply["choices"][0]["message"]["content"]
            return is_correct(text, problem.answer), reply["usage"]["completion_tokens"]

        started = time.monotonic()
        results = await asyncio.gather(*(one(p) for p in problems))
        seconds = time.monotonic() - started
    tokens = sum(t for _, t in results)
    return {"method": "single sample" if n == 1 else method, "n": n,
            "accuracy": statistics.fmean(c for c, _ in results),
            "tokens_per_question": tokens / len(problems), "seconds": seconds,
            "tokens_per_second": tokens / seconds,
            "correct": [c for c, _ in results], "tokens": [t for _, t in results]}


def certainty(steering: dict) -> float:
    """Self-certainty of a whole answer: exp(-mean token entropy)."""
    known = [h for h in steering["token_entropy"] if h is not None]
    return math.exp(-statistics.fmean(known)) if known else 0.0


def run(args) -> None:
    from clients.bench.local_server import steer_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate(args.problems, seed=3)
    server = None if args.url else steer_server(Path(tempfile.mkdtemp()) / "server.log")
    url = args.url or server.base_url
    rows = []
    try:
        plan = [("best-of-n", 1)] + [(m, n) for n in args.n if n > 1 for m in METHODS]
        for method, n in plan:
            row = asyncio.run(solve(url, problems, method, n, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        if server is not None:
            server.stop()
    speed = {(r["method"], r["n"]): r["tokens_per_second"] for r in rows}
    report = {"model": model, "problems": len(problems), "max_tokens": args.max_tokens,
              "epf_vs_sampling": {n: speed[("ePF (EA)", n)] / speed[("best-of-n", n)]
                                  for n in args.n if ("ePF (EA)", n) in speed},
              "delimiter": args.delimiter, "max_steps": args.max_steps,
              "concurrency": args.concurrency, "rows": rows}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    plot(report, out / "accuracy.png")
    print(markdown(report))


def throughput(args) -> None:
    """Only the benchmark: ePF (EA) against best-of-n at each n, in alternating rounds on one
    server (extra `steer serve` arguments after `--`)."""
    from clients.bench.local_server import steer_server

    problems = generate(args.problems, seed=3)
    server = steer_server(Path(tempfile.mkdtemp()) / "server.log", *args.server_args)
    try:
        for round_ in range(args.rounds):
            for n in args.n:
                rows = [asyncio.run(solve(server.base_url, problems, method, n, args))
                        for method in ("best-of-n", "ePF (EA)")]
                print(json.dumps({"round": round_, "n": n,
                                  "best_of_n_tokens_per_second": rows[0]["tokens_per_second"],
                                  "epf_tokens_per_second": rows[1]["tokens_per_second"],
                                  "ratio": rows[1]["tokens_per_second"]
                                  / rows[0]["tokens_per_second"]}), flush=True)
    finally:
        server.stop()


def markdown(report: dict) -> str:
    """The table: accuracy and tokens with 95% bootstrap intervals over problems, and each
    particle method paired against best-of-n and against PF at the same n (the same
    problems)."""
    from clients.experiments.stats import interval_text, mean_interval, paired_difference

    lines = [
        f"Model {report['model']}, {report['problems']} problems (seed 3), temperature 0.8, "
        f"max_tokens {report['max_tokens']} per particle, step delimiter "
        f"{json.dumps(report['delimiter'])}, max_steps {report['max_steps']}, "
        f"{report['concurrency']} requests at a time; reward: self-certainty. 95% bootstrap "
        "intervals over problems; Δ columns are paired differences on the same problems.", "",
        "| method | n | accuracy | Δ vs best-of-n | Δ vs PF | generated tokens / problem "
        "| wall time (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["method"], r["n"]): r for r in report["rows"]}
    for r in report["rows"]:
        cells = [r["method"], str(r["n"]), interval_text(mean_interval(r["correct"])), "", "",
                 interval_text(mean_interval(r["tokens"]), 0), f"{r['seconds']:.0f}",
                 f"{r['tokens_per_second']:.0f}"]
        for column, baseline in ((3, "best-of-n"), (4, "PF")):
            other = by.get((baseline, r["n"]))
            if other is not None and other is not r and r["n"] > 1:
                cells[column] = interval_text(paired_difference(r["correct"], other["correct"]))
        lines.append("| " + " | ".join(cells) + " |")
    ratios = ", ".join(f"n = {n}: {ratio:.2f}×" for n, ratio in report["epf_vs_sampling"].items())
    lines += ["", "Throughput of ePF (EA) relative to sampling n whole answers (best-of-n) on the "
              f"same prompts in the same run: {ratios}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy per method with its 95% interval, one group per particle count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clients.experiments.stats import mean_interval

    figure, axis = plt.subplots(figsize=(7.5, 3.8))
    labels = []
    for x, r in enumerate(report["rows"]):
        mean, low, high = mean_interval(r["correct"])
        axis.errorbar(x, mean, yerr=[[mean - low], [high - mean]], fmt="o", capsize=4,
                      color=f"C{list(METHODS).index(r['method']) if r['n'] > 1 else 4}")
        labels.append(f"{r['method']}\nn = {r['n']}")
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("accuracy (95% bootstrap interval)")
    axis.set_title(f"Particle filtering on {report['model']}, {report['problems']} problems")
    figure.tight_layout()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.particles_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole experiment")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--url", help="use a running server instead of starting one")
    r.add_argument("--problems", type=int, default=100)
    r.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--max-steps", type=int, default=8)
    r.add_argument("--delimiter", default="\n")
    r.add_argument("--concurrency", type=int, default=4)
    t = sub.add_parser("throughput", help="only the ePF / best-of-n throughput ratio")
    t.add_argument("--problems", type=int, default=24)
    t.add_argument("--n", type=int, nargs="+", default=[8])
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--max-steps", type=int, default=8)
    t.add_argument("--delimiter", default="\n")
    t.add_argument("--concurrency", type=int, default=4)
    t.add_argument("server_args", nargs="*", help="extra `steer serve` arguments (after --)")
    args = parser.parse_args(argv)
    (run if args.command == "run" else throughput)(args)


if __name__ == "__main__":
    main()
