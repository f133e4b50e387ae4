"""The experiment behind docs/diffadapt.md: self-label, train a probe, compare strategies.

`run` starts a server on the experiment's model (`--model`, else the bundled one; or uses
--url), self-labels training problems (`steer probe label`), trains the probe (`steer probe
train`), uploads it, and then answers held-out problems with each fixed strategy and with
DiffAdapt, reporting accuracy and mean output tokens with 95% intervals (clients/stats.py).
Fixed strategies send the same framing (instruction, system prompt, prefill), temperature, top-p
and budget the server would pick for that class. Each recipe's results go to OUT/<recipe>/;
OUT/strategies.png plots every recipe run so far.

    python -m clients.experiments.diffadapt_eval run --recipe paper --out docs/diffadapt \\
        --probe-out server/bundled/difficulty-probe-paper.safetensors
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

from clients.cli.probes import label, probe_meta, train, upload
from clients.experiments.problems import Problem, generate, is_correct
from clients.experiments.runs import add_model_argument, experiment_server, parse_recorded, pyplot
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked
from steering.artifacts import write_artifact
from steering.methods.diffadapt.core import CLASSES, Recipe

PROBE_NAME = "diffadapt-eval"


async def answer(url: str, problems: list[Problem], method: str, probe: str, samples: int,
                 max_tokens: int, concurrency: int, continuation: bool | None) -> list[dict]:
    """`samples` answers per problem with one of the probe's recipe's fixed strategies
    (`method` a class name, served by the server without the probe pass), DiffAdapt
    ('diffadapt') or the plain question at temperature 0.8 ('plain'); `continuation` as the
    request's `steering.diffadapt.continuation` (None: the recipe's default)."""
    gate = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def one(problem: Problem) -> dict:
            body: dict = {"n": samples, "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": problem.question}]}
            if method == "plain":
                body["temperature"] = 0.8
            else:
                diffadapt = {"probe": probe, "continuation": continuation}
                if method != "diffadapt":
                    diffadapt["difficulty"] = method
                body["steering"] = {"diffadapt": diffadapt}
            async with gate:
                reply = checked(await client.post("/v1/chat/completions", json=body))
            choices = reply["choices"]
            reports = [c["steering"].get("diffadapt", {}) for c in choices]
            return {"correct": statistics.fmean(
                        is_correct(c["message"]["content"], problem.answer) for c in choices),
                    "tokens": reply["usage"]["completion_tokens"] / len(choices),
                    "continued": statistics.fmean(bool(r.get("continued")) for r in reports),
                    "continues": reports[0].get("continuation") is not None,
                    "class": reports[0].get("difficulty")}

        return list(await asyncio.gather(*(one(p) for p in problems)))


BUNDLED_NAMES = {Recipe.VARIANT: "default", Recipe.PAPER: "paper"}


def make_probe(url: str, args, recipe: Recipe, training: list[Problem]) -> dict:
    """Label the training problems, train the recipe's probe, store it (and write it to
    --probe-out); its labelling and metrics for the report."""
    work = Path(tempfile.mkdtemp(prefix="diffadapt-"))
    started = time.monotonic()
    labelled = label(url, {}, training, recipe, args.max_tokens, 8, args.samples)
    write_text_atomic(work / "labels.json", json.dumps(labelled))
    label_seconds = time.monotonic() - started
    probe, metrics = train(labelled, args.width, 100, 0.3, seed=0)
    meta = probe_meta(BUNDLED_NAMES[recipe], probe, labelled, metrics,
                      f"{args.command_line} (docs/diffadapt.md)",
                      f"DiffAdapt difficulty probe ({recipe.value} recipe) for "
                      f"{labelled['model']}, trained on the project's arithmetic / counting / "
                      "comparison problems")
    if args.probe_out:
        write_artifact(Path(args.probe_out), probe.tensors(), meta)
    upload(url, {}, PROBE_NAME, probe.tensors(), meta)
    counts = {c: sum(r["label"] == c for r in labelled["questions"]) for c in CLASSES}
    return {"label_samples": labelled["samples"], "label_temperature": labelled["temperature"],
            "label_top_p": labelled["top_p"], "thresholds": labelled["thresholds"],
            "label_counts": counts, "label_seconds": label_seconds, "probe": metrics,
            "probe_name": PROBE_NAME}


def stored_probe(url: str, name: str) -> dict:
    """A stored probe's recipe, thresholds and metrics as its training recorded them (no
    relabelling)."""
    probe = checked(httpx.get(f"{url}/v1/steering/probes/{name}"))
    return {"recipe": probe["recipe"], "thresholds": probe["thresholds"],
            "probe": probe["metrics"], "probe_name": name, "probe_source": probe["source"]}


def run(args) -> None:
    """One recipe: label, train and store a probe (or take the stored `--probe`), answer the
    held-out problems with every fixed strategy and with DiffAdapt; `out/<recipe>/results.json`
    keeps every problem's outcome so each comparison gets a paired interval."""
    pyplot()  # the docs extra is there, before the run rather than at its end
    out = Path(args.out)
    training = generate(args.train, seed=1)
    seen = {p.question for p in training}
    held_out = [p for p in generate(args.test * 2, seed=2) if p.question not in seen][:args.test]
    server = None if args.url else experiment_server(args)
    url = args.url or server.base_url
    try:
        if args.probe:
            made = stored_probe(url, args.probe)
            recipe = Recipe(made["recipe"])
        else:
            recipe = Recipe(args.recipe)
            made = make_probe(url, args, recipe, training)
        rows = []
        for method in ("plain", *CLASSES, "diffadapt"):
            started = time.monotonic()
            results = asyncio.run(answer(url, held_out, method, made["probe_name"],
                                         args.eval_samples, args.max_tokens, 8,
                                         args.continuation))
            row = {"method": method, "seconds": time.monotonic() - started,
                   "correct": [r["correct"] for r in results],
                   "tokens": [r["tokens"] for r in results],
                   "continued": statistics.fmean(r["continued"] for r in results)}
            if method == "diffadapt":
                row["classes"] = {c: sum(r["class"] == c for r in results) for c in CLASSES}
                continuation = results[0]["continues"]  # as the server settled it
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("correct", "tokens")}))
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        if server is not None:
            server.stop()
    report = {"model": model, "recipe": recipe.value, "train_questions": len(training),
              "held_out_questions": len(held_out), "eval_samples": args.eval_samples,
              "max_tokens": args.max_tokens, "continuation": continuation,
              "command": args.command_line,
              **made, "strategies": rows}
    write_text_atomic(out / recipe.value / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / recipe.value / "results.md", markdown(report))
    plot([json.loads((out / r.value / "results.json").read_text()) for r in Recipe
          if (out / r.value / "results.json").exists()], out / "strategies.png")
    print(markdown(report))


def markdown(report: dict) -> str:
    from clients.experiments.stats import interval_text, mean_interval, paired_difference

    p = report["probe"]
    t = report["thresholds"]
    thresholds = f"α = {t['alpha']:.3f}, β = {t['beta']:.3f} nats, γ = {t['gamma']:.3f}"
    if "label_counts" in report:
        made = (f"{report['train_questions']} training problems labelled with k = "
                f"{report['label_samples']} answers each (T = {report['label_temperature']}, "
                f"top-p {report['label_top_p']}; thresholds {thresholds}; classes "
                f"{report['label_counts']})")
    else:
        made = (f"the stored probe '{report['probe_name']}' ({report['probe_source']}; "
                f"thresholds {thresholds}), its metrics as recorded when it was trained")
    f1 = p.get("held_out_macro_f1")
    cut_off = ("continued after the authors' prefix" if report["continuation"]
               else "left as it is")
    lines = [
        f"Recipe **{report['recipe']}**, model {report['model']}; {made}.", "",
        "| probe (held-out split) | accuracy | macro-F1 |", "|---|---|---|",
        f"| 2-layer MLP | {p['held_out_accuracy']:.3f} | "
        f"{'' if f1 is None else f'{f1:.3f}'} |",
        f"| linear head | {p['linear_accuracy']:.3f} | |",
        f"| majority class | {p['majority_accuracy']:.3f} | |", "",
        f"{report['held_out_questions']} held-out problems, {report['eval_samples']} answers "
        f"each, Max = {report['max_tokens']} tokens, an answer its budget cut off {cut_off}; 95% "
        "bootstrap intervals over problems, and paired against always-normal (the same "
        f"problems). Command: `{report['command']}`", "",
        "| strategy | accuracy | Δ accuracy vs normal | mean output tokens | Δ tokens vs normal "
        "| continued | wall time (s) |", "|---|---|---|---|---|---|---|",
    ]
    normal = next(r for r in report["strategies"] if r["method"] == "normal")
    for row in report["strategies"]:
        name = {"plain": "plain question, T = 0.8, Max"}.get(row["method"], row["method"])
        if row["method"] in CLASSES:
            name = f"always {row['method']}"
        if "classes" in row:
            name += f" (picked {row['classes']})"
        cells = [name, interval_text(mean_interval(row["correct"])), "",
                 interval_text(mean_interval(row["tokens"]), 1), "",
                 f"{row['continued']:.2f}", f"{row['seconds']:.0f}"]
        if row is not normal:
            cells[2] = interval_text(paired_difference(row["correct"], normal["correct"]))
            cells[4] = interval_text(paired_difference(row["tokens"], normal["tokens"]), 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: Path) -> None:
    """Accuracy against output tokens per strategy, one panel per recipe, with intervals."""
    plt = pyplot()

    from clients.experiments.stats import mean_interval

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.5), squeeze=False)
    for ax, report in zip(axes[0], reports):
        for row in report["strategies"]:
            acc, tokens = mean_interval(row["correct"]), mean_interval(row["tokens"])
            ax.errorbar(tokens[0], acc[0],
                        xerr=[[tokens[0] - tokens[1]], [tokens[2] - tokens[0]]],
                        yerr=[[acc[0] - acc[1]], [acc[2] - acc[0]]], fmt="o", capsize=3,
                        label=row["method"])
        ax.set_title(f"DiffAdapt, {report['recipe']} recipe, {report['model']}")
        ax.set_xlabel("mean output tokens")
        ax.set_ylabel("accuracy (95% bootstrap interval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.diffadapt_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole experiment")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--url", help="use a running server instead of starting one")
    add_model_argument(r)
    r.add_argument("--probe-out", type=Path, help="also write the probe file here")
    r.add_argument("--train", type=int, default=360, help="training problems")
    r.add_argument("--test", type=int, default=150, help="held-out problems")
    r.add_argument("--recipe", choices=[r.value for r in Recipe], default=Recipe.VARIANT.value)
    r.add_argument("--probe", help="evaluate this stored probe (its recipe) instead of "
                   "labelling and training one")
    r.add_argument("--continuation", action=argparse.BooleanOptionalAction, default=None,
                   help="continue answers cut off by their budget (default: the recipe's)")
    r.add_argument("--samples", type=int, default=6, help="answers per training problem")
    r.add_argument("--eval-samples", type=int, default=2, help="answers per held-out problem")
    r.add_argument("--max-tokens", type=int, default=256, help="the strategies' Max")
    r.add_argument("--width", type=int, help="default: the recipe's")
    run(parse_recorded(parser, argv))


if __name__ == "__main__":
    main()
