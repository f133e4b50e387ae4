"""The experiment behind docs/diffadapt.md: self-label, train a probe, compare strategies.

`run` starts a server on the bundled model (or uses --url), self-labels training problems
(`steer probe label`), trains the probe (`steer probe train`), uploads it, and then answers
held-out problems with each fixed strategy and with DiffAdapt, reporting accuracy and mean
output tokens. Fixed strategies send the same prompt, temperature and budget the server would
pick for that class.

    python -m clients.diffadapt_eval run --out docs/diffadapt \\
        --probe-out server/bundled/difficulty-probe.safetensors
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from clients.http import check
from clients.probes import label, probe_meta, train, upload
from clients.problems import Problem, generate, is_correct, write_text_atomic
from steering.artifacts import write_artifact
from steering.diffadapt import CLASSES, DEFAULT_STRATEGIES

PROBE_NAME = "diffadapt-eval"


async def answer(url: str, problems: list[Problem], method: str, samples: int,
                 max_tokens: int, concurrency: int) -> list[dict]:
    """`samples` answers per problem with a fixed strategy (`method` a class name), DiffAdapt
    ('diffadapt') or the plain question at temperature 0.8 ('plain')."""
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def one(problem: Problem) -> dict:
            body: dict = {"n": samples, "max_tokens": max_tokens}
            question = problem.question
            if method == "diffadapt":
                body["steering"] = {"diffadapt": {"probe": PROBE_NAME}}
            elif method == "plain":
                body["temperature"] = 0.8
            else:
                strategy = DEFAULT_STRATEGIES[method]
                question = strategy.prompt.replace("{question}", question)
                body |= {"temperature": strategy.temperature,
                         "max_tokens": round(strategy.budget * max_tokens)}
            body["messages"] = [{"role": "user", "content": question}]
            async with gate:
                reply = check(await client.post("/v1/chat/completions", json=body))
            choices = reply["choices"]
            return {"correct": statistics.fmean(
                        is_correct(c["message"]["content"], problem.answer) for c in choices),
                    "tokens": reply["usage"]["completion_tokens"] / len(choices),
                    "class": choices[0]["steering"].get("diffadapt", {}).get("difficulty")}

        return list(await asyncio.gather(*(one(p) for p in problems)))


def run(args) -> None:
    from clients.local_server import steer_server

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="diffadapt-"))
    training = generate(args.train, seed=1)
    seen = {p.question for p in training}
    held_out = [p for p in generate(args.test * 2, seed=2) if p.question not in seen][:args.test]
    server = None if args.url else steer_server(work / "server.log")
    url = args.url or server.base_url
    try:
        started = time.monotonic()
        labelled = label(url, {}, training, args.samples, 0.8, args.max_tokens, 8,
                         None, None, None)
        write_text_atomic(work / "labels.json", json.dumps(labelled))
        label_seconds = time.monotonic() - started
        probe, metrics = train(labelled, args.width, 100, 0.3, seed=0)
        meta = probe_meta("default", probe, labelled, metrics,
                          "python -m clients.diffadapt_eval run (docs/diffadapt.md)",
                          "DiffAdapt difficulty probe for the bundled model, trained on the "
                          "project's arithmetic / counting / comparison problems")
        if args.probe_out:
            write_artifact(Path(args.probe_out), probe.tensors(), meta)
        upload(url, {}, PROBE_NAME, probe.tensors(), meta)
        rows = []
        for method in ("plain", *CLASSES, "diffadapt"):
            started = time.monotonic()
            results = asyncio.run(answer(url, held_out, method, args.eval_samples,
                                         args.max_tokens, 8))
            row = {"method": method,
                   "accuracy": statistics.fmean(r["correct"] for r in results),
                   "output_tokens": statistics.fmean(r["tokens"] for r in results),
                   "seconds": time.monotonic() - started}
            if method == "diffadapt":
                row["classes"] = {c: sum(r["class"] == c for r in results) for c in CLASSES}
            rows.append(row)
            print(json.dumps(row))
        model = check(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        if server is not None:
            server.stop()
    counts = {c: sum(r["label"] == c for r in labelled["questions"]) for c in CLASSES}
    report = {"model": model, "train_questions": len(training),
              "held_out_questions": len(held_out), "label_samples": args.samples,
              "eval_samples": args.eval_samples, "max_tokens": args.max_tokens,
              "thresholds": labelled["thresholds"], "label_counts": counts,
              "label_seconds": label_seconds, "probe": metrics, "strategies": rows}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    p = report["probe"]
    lines = [
        f"Model {report['model']}; {report['train_questions']} training problems labelled with "
        f"k = {report['label_samples']} answers each (thresholds α = "
        f"{report['thresholds']['alpha']:.3f}, β = {report['thresholds']['beta']:.3f} nats, "
        f"γ = {report['thresholds']['gamma']:.3f}; classes {report['label_counts']}).", "",
        "| probe (held-out split) | accuracy |", "|---|---|",
        f"| 2-layer MLP | {p['held_out_accuracy']:.3f} |",
        f"| linear head | {p['linear_accuracy']:.3f} |",
        f"| majority class | {p['majority_accuracy']:.3f} |", "",
        f"{report['held_out_questions']} held-out problems, {report['eval_samples']} answers "
        f"each, Max = {report['max_tokens']} tokens:", "",
        "| strategy | accuracy | mean output tokens | wall time (s) |", "|---|---|---|---|",
    ]
    for row in report["strategies"]:
        name = {"plain": "plain question, T = 0.8, Max"}.get(row["method"], row["method"])
        if row["method"] in CLASSES:
            name = f"always {row['method']}"
        if "classes" in row:
            name += f" (picked {row['classes']})"
        lines.append(f"| {name} | {row['accuracy']:.3f} | {row['output_tokens']:.1f} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.diffadapt_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole experiment")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--url", help="use a running server instead of starting one")
    r.add_argument("--probe-out", type=Path, help="also write the probe file here")
    r.add_argument("--train", type=int, default=360, help="training problems")
    r.add_argument("--test", type=int, default=150, help="held-out problems")
    r.add_argument("--samples", type=int, default=6, help="answers per training problem")
    r.add_argument("--eval-samples", type=int, default=2, help="answers per held-out problem")
    r.add_argument("--max-tokens", type=int, default=256, help="the strategies' Max")
    r.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
