"""The experiment behind docs/vreason.md: greedy answers to the project's verifiable problems with
and without V-Reason (k = 2 and k = 8), their accuracy, length and final-phase entropy, an
entropy-trajectory plot, and the per-token latency and memory of V-Reason in the same run.

Final-phase entropy is the mean token entropy after the global peak of the entropy EMA (the
paper's macro-exploitation phase), with the EMA computed the same way for every method.

    python -m clients.experiments.vreason_eval run --out docs/vreason
    python -m clients.experiments.vreason_eval latency --rounds 5   (the latency ratios alone)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from clients.experiments.problems import INSTRUCTIONS, Problem, generate, is_correct
from clients.experiments.runs import (
    add_model_argument,
    experiment_server,
    paired_order,
    parse_recorded,
    pyplot,
    tree_rss_mib,
)
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked
from steering.methods.vreason.core import EntropyPhase, VReasonConfig

PLAIN = "greedy"


def method_settings(every: list[int], context_every: list[int]) -> dict[str, dict | None]:
    """Greedy, V-Reason on the prompt's positions (the stand-in for the paper's video tokens)
    at each k of `every`, and on the whole context at each k of `context_every`."""
    return {PLAIN: None, **{f"V-Reason k={k}": {"every": k} for k in every},
            **{f"V-Reason k={k}, context": {"every": k, "positions": "context"}
               for k in context_every}}


def final_phase(entropy: list[float], beta: float) -> tuple[int, float | None]:
    """(token of the EMA's global peak, mean entropy after it)."""
    phase = EntropyPhase(beta)
    for h in entropy:
        phase.observe(h)
    after = entropy[phase.peak_token + 1:]
    return phase.peak_token, statistics.fmean(after) if after else None


async def solve(url: str, problems: list[Problem], vreason: dict | None, args) -> dict:
    gate = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(problem: Problem) -> dict:
            steering = {"return_entropy": True, **({"vreason": vreason} if vreason else {})}
            async with gate:
                reply = checked(await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": problem.question}],
                    "max_tokens": args.max_tokens, "temperature": 0, "steering": steering}))
            choice = reply["choices"][0]
            entropy = [h for h in choice["steering"]["token_entropy"] if h is not None]
            _, final = final_phase(entropy, VReasonConfig().ema)
            return {"correct": is_correct(choice["message"]["content"], problem.answer),
                    "tokens": reply["usage"]["completion_tokens"], "entropy": entropy,
                    "final_entropy": final}
        return {"answers": await asyncio.gather(*(one(p) for p in problems))}


def summarise(name: str, answers: list[dict]) -> dict:
    """Per problem: correct, output tokens, final-phase entropy (NaN: no phase after the
    peak) and the answer's mean token entropy, for intervals over problems."""
    return {"method": name, "correct": [float(a["correct"]) for a in answers],
            "tokens": [a["tokens"] for a in answers],
            "final_phase_entropy": [math.nan if a["final_entropy"] is None else
                                    a["final_entropy"] for a in answers],
            "mean_entropy": [statistics.fmean(a["entropy"]) if a["entropy"] else math.nan
                             for a in answers]}


def latency(url: str, prompts: list[str], vreason: dict | None, tokens: int) -> float:
    """Seconds per generated token, one request at a time, `tokens` tokens each."""
    spent = produced = 0.0
    with httpx.Client(base_url=url, timeout=600) as client:
        for prompt in prompts:
            started = time.monotonic()
            reply = checked(client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True,
                **({"steering": {"vreason": vreason}} if vreason else {})}))
            spent += time.monotonic() - started
            produced += reply["usage"]["completion_tokens"]
    return spent / produced


def run(args) -> None:
    pyplot()  # the docs extra is there, before the run rather than at its end
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate(args.problems, seed=5, instruction=args.instruction)
    server = experiment_server(args)
    methods = method_settings(args.every, args.context_every)
    rows, trajectories, bench = [], {}, []
    try:
        url = server.base_url
        for name, vreason in methods.items():
            answers = asyncio.run(solve(url, problems, vreason, args))["answers"]
            rows.append(summarise(name, answers))
            trajectories[name] = mean_trajectory([a["entropy"] for a in answers])
            print(json.dumps({"method": name, "accuracy": statistics.fmean(rows[-1]["correct"])}),
                  flush=True)
        prompts = [p.question for p in problems[: args.latency_prompts]]
        rss_before = tree_rss_mib(server.process.pid)
        for name, vreason in methods.items():
            seconds = latency(url, prompts, vreason, args.latency_tokens)
            bench.append({"method": name, "ms_per_token": 1000 * seconds,
                          "rss_mib_after": tree_rss_mib(server.process.pid)})
            print(json.dumps(bench[-1]), flush=True)
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        server.stop()
    base = bench[0]["ms_per_token"]
    for row in bench:
        row["ratio"] = row["ms_per_token"] / base
    report = {"model": model, "problems": len(problems), "max_tokens": args.max_tokens,
              "instruction": INSTRUCTIONS[args.instruction],
              "command": args.command_line,
              "concurrency": args.concurrency, "settings": asdict(VReasonConfig()),
              "rows": rows, "latency": {"prompts": len(prompts), "tokens": args.latency_tokens,
                                        "rss_mib_before": rss_before, "rows": bench},
              "trajectories": trajectories}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    plot(report, out / "entropy.png")
    print(markdown(report))


def mean_trajectory(traces: list[list[float]]) -> list[float]:
    """Mean entropy at each token position over the answers still running there."""
    longest = max(map(len, traces), default=0)
    return [statistics.fmean(t[i] for t in traces if len(t) > i) for i in range(longest)]


def plot(report: dict, path: Path) -> None:
    """Left: the entropy EMA per generated token, mean over the problems still answering.
    Right: each V-Reason setting's paired difference from greedy, with its 95% interval."""
    plt = pyplot()

    from clients.experiments.stats import paired_difference

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8),
                                         gridspec_kw={"width_ratios": [3, 2]})
    for name, values in report["trajectories"].items():
        phase, smoothed = EntropyPhase(VReasonConfig().ema), []
        for h in values:
            phase.observe(h)
            smoothed.append(phase.ema)
        left.plot(smoothed, label=name)
    left.set_xlabel("generated token")
    left.set_ylabel("entropy EMA (nats), mean over problems")
    left.legend()
    greedy, tuned = report["rows"][0], report["rows"][1:]
    for offset, (column, label) in enumerate((("final_phase_entropy", "final-phase entropy"),
                                              ("mean_entropy", "mean entropy"))):
        for y, row in enumerate(tuned):
            mean, low, high = paired_difference(row[column], greedy[column])
            right.errorbar(mean, y + 0.15 * (offset * 2 - 1), xerr=[[mean - low], [high - mean]],
                           fmt="o", capsize=3, color=f"C{offset + 4}",
                           label=label if y == 0 else None)
    right.axvline(0, color="grey", linewidth=0.8)
    right.set_yticks(range(len(tuned)), [row["method"] for row in tuned], fontsize=8)
    right.set_xlabel("Δ vs greedy (nats), 95% interval")
    right.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def paired_latency(args) -> None:
    """Only the benchmark: per-token latency of V-Reason at each k against greedy, in paired
    rounds on one server (the order alternates between rounds); each round's ratio to greedy
    measured in that round, and their median."""
    prompts = [p.question for p in generate(args.prompts, seed=5)]
    methods = method_settings(args.every, [])
    server = experiment_server(args)
    ratios: dict[str, list[float]] = {name: [] for name in methods if name != PLAIN}
    try:
        latency(server.base_url, prompts[:1], None, 8)  # warm-up
        for round_ in range(args.rounds):
            seconds = {name: latency(server.base_url, prompts, vreason, args.tokens)
                       for name, vreason in paired_order(methods.items(), round_)}
            for name in ratios:
                ratios[name].append(seconds[name] / seconds[PLAIN])
            print(json.dumps({"round": round_, **{f"{name} ms/token": 1000 * value
                                                  for name, value in seconds.items()}}),
                  flush=True)
    finally:
        server.stop()
    print(f"\nPer-token latency against greedy, {args.rounds} paired rounds of {args.prompts} "
          f"prompts × {args.tokens} tokens, one request at a time\n")
    print("| method | ratio per round | median |\n|---|---|---|")
    for name, values in ratios.items():
        print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | "
              f"{statistics.median(values):.2f}× |")


def markdown(report: dict) -> str:
    """Means with 95% bootstrap intervals over problems; under each V-Reason row, its paired
    difference from greedy on the same problems."""
    from clients.experiments.stats import interval_text, mean_interval, paired_difference

    s = report["settings"]
    columns = ("correct", "tokens", "final_phase_entropy", "mean_entropy")
    lines = [
        f"Model {report['model']}, {report['problems']} problems (seed 5, each followed by "
        f"\"{report['instruction']}\"), greedy decoding, "
        f"max_tokens {report['max_tokens']}, {report['concurrency']} requests at a time. "
        f"V-Reason: steps {s['steps']}, lr {s['lr']}, EMA β {s['ema']}, positions prompt unless "
        "marked 'context'. 95% bootstrap intervals over problems; each Δ row is the paired "
        "difference from greedy on the same problems (final-phase entropy over the problems "
        "where both answers have a phase after the peak).", "",
        "| method | accuracy | output tokens | final-phase entropy | mean entropy |",
        "|---|---|---|---|---|",
    ]
    greedy = report["rows"][0]
    for r in report["rows"]:
        cells = [interval_text(mean_interval(r[c]), 1 if c == "tokens" else 3) for c in columns]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        if r is not greedy:
            cells = [interval_text(paired_difference(r[c], greedy[c]), 1 if c == "tokens" else 3)
                     for c in columns]
            lines.append("| Δ vs greedy | " + " | ".join(cells) + " |")
    lat = report["latency"]
    lines += ["", f"Per-token latency, one request at a time, {lat['prompts']} prompts × "
              f"{lat['tokens']} tokens each (ignore_eos), same server, same run; resident "
              f"memory of the server's process tree before the benchmark: "
              f"{lat['rss_mib_before']:.0f} MiB.", "",
              "| method | ms / token | ratio to greedy | RSS after (MiB) |", "|---|---|---|---|"]
    for r in lat["rows"]:
        lines.append(f"| {r['method']} | {r['ms_per_token']:.1f} | {r['ratio']:.2f}× | "
                     f"{r['rss_mib_after']:.0f} |")
    return "\n".join([*lines, "", f"Command: `{report['command']}`"]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.vreason_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole experiment")
    r.add_argument("--out", type=Path, required=True)
    add_model_argument(r)
    r.add_argument("--problems", type=int, default=200)
    r.add_argument("--instruction", choices=INSTRUCTIONS, default="answer",
                   help="what follows each question (problems.INSTRUCTIONS)")
    r.add_argument("--every", type=int, nargs="+", default=[2, 8])
    r.add_argument("--context-every", type=int, nargs="*", default=[2],
                   help="V-Reason on the whole context at these k")
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--latency-prompts", type=int, default=8)
    r.add_argument("--latency-tokens", type=int, default=64)
    t = sub.add_parser("latency", help="only the per-token latency against greedy")
    t.add_argument("--rounds", type=int, default=5)
    add_model_argument(t)
    t.add_argument("--prompts", type=int, default=4)
    t.add_argument("--tokens", type=int, default=64)
    t.add_argument("--every", type=int, nargs="+", default=[2, 8])
    args = parse_recorded(parser, argv)
    (run if args.command == "run" else paired_latency)(args)


if __name__ == "__main__":
    main()
