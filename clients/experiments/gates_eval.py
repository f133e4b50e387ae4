"""The experiments behind docs/gates.md, on the bundled model unless --model (one server for both).

bandit: on the text bandit's held-out prompts (`clients.bandit`), no steering vs EAST on every
token vs EAST switched on by a gate only while the model is over-confident (next-token entropy
below `--below` nats), at each scale β: action entropy and valid-action rate, paired (same
prompts, same seeds in every arm).

stories: fixed temperatures vs dynamic temperature vs an entropy-gated temperature on story
prompts: distinct-2 (unique token bigrams / bigrams), 3-gram repetition (share of token 3-grams
already seen earlier in the same text) and the mean per-token log-likelihood of the text under
the model at T = 1 (vLLM's raw logprobs of the sampled tokens, a fluency proxy), each as mean ±
standard error over prompts × samples, paired seeds.

Each arm's difference from its baseline (bandit: no steering; stories: T = 1.0, the temperature
the entropy-driven arms start from) is paired over the same units (prompts; prompt × seed), with
a 95% percentile-bootstrap interval. The tables record the command that made them.

    python -m clients.experiments.gates_eval --out docs/gates
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

import httpx

from clients.experiments.bandit import make_prompts, sample_actions
from clients.experiments.runs import (
    add_model_argument,
    experiment_server,
    parse_recorded,
    pyplot,
)
from clients.experiments.stats import interval_text, paired_difference
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked
from steering.methods.east.core import action_entropy

STORY_PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Tell a story about a dragon who is afraid of heights.",
    "Write a story that begins: The last train left without her.",
    "Tell a bedtime story about a fox and a lantern.",
    "Write a short story set on a ship lost in fog.",
    "Tell a story about a robot learning to paint.",
    "Write a story about two friends who find a map.",
    "Tell a story about a village where it never stops snowing.",
]
STORY_ARMS = {  # name → request sampling and steering
    "T = 0.7": {"temperature": 0.7},
    "T = 1.0": {"temperature": 1.0},
    "T = 1.3": {"temperature": 1.3},
    "dynatemp T = 1.0 ± 0.5": {"temperature": 1.0, "steering": {"dynatemp": {"range": 0.5}}},
    "gate: H > 3 → T = 0.6 (hold 2)": {"temperature": 1.0, "steering": {"gates": [
        {"signal": "entropy", "above": 3.0, "hold": 2, "then": {"temperature": 0.6}}]}},
}


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return (values[0] if values else math.nan), math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def per_prompt(actions: list[list[str | None]]) -> list[dict]:
    """Per prompt: its action entropy (None: no valid action) and valid-action share."""
    return [{"entropy": action_entropy(a), "valid": sum(x is not None for x in a) / len(a)}
            for a in actions]


def bandit(url: str, args) -> list[dict]:
    records = make_prompts(args.test, seed=2)  # clients.bandit's held-out prompts
    arms = [("none", 0.0, None)]  # β does not apply: measured once
    for beta in args.betas:
        east = {"vector": args.vector, "scale": beta}
        arms += [("EAST always", beta, {"east": east}),
                 (f"EAST gated (H < {args.below:g})", beta, {"gates": [{
                     "signal": "entropy", "below": args.below, "hold": args.hold,
                     "then": {"east": east}}]})]
    rows = []
    for arm, beta, steering in arms:
        prompts = per_prompt(asyncio.run(sample_actions(url, {}, records, args.samples,
                                                        steering)))
        units = {"action_entropy": [math.nan if p["entropy"] is None else p["entropy"]
                                    for p in prompts],
                 "valid_action_rate": [p["valid"] for p in prompts]}
        h, h_se = mean_se(units["action_entropy"])
        v, v_se = mean_se(units["valid_action_rate"])
        rows.append({"arm": arm, "beta": beta, "action_entropy": h, "action_entropy_se": h_se,
                     "valid_action_rate": v, "valid_action_rate_se": v_se, "units": units})
        print(f"bandit {arm:24s} beta {beta:5.2f}  entropy {h:.3f} ± {h_se:.3f}  "
              f"valid {v:.2f} ± {v_se:.2f}", flush=True)
    return rows


def repetition_3gram(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else math.nan


def distinct_2(tokens: list[int]) -> float:
    grams = [tuple(tokens[i:i + 2]) for i in range(len(tokens) - 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def stories(url: str, args) -> list[dict]:
    rows = []

    async def go():
        semaphore = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            async def one(prompt_index: int, sample: int, arm: dict) -> dict:
                body = {"messages": [{"role": "user", "content": STORY_PROMPTS[prompt_index]}],
                        "max_tokens": args.story_tokens, "seed": 100 * prompt_index + sample,
                        "logprobs": True, "return_token_ids": True, **arm}
                async with semaphore:
                    r = await client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                choice = r.json()["choices"][0]
                tokens = choice["token_ids"]
                logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
                return {"distinct_2": distinct_2(tokens), "rep_3": repetition_3gram(tokens),
                        "loglik": statistics.fmean(logprobs) if logprobs else math.nan,
                        "tokens": len(tokens)}

            for name, arm in STORY_ARMS.items():
                texts = await asyncio.gather(*(one(p, s, arm)
                                               for p in range(len(STORY_PROMPTS))
                                               for s in range(args.story_samples)))
                row = {"arm": name, "units": {}}
                for key in ("distinct_2", "rep_3", "loglik", "tokens"):
                    row["units"][key] = [t[key] for t in texts]  # in prompt × seed order
                    row[key], row[f"{key}_se"] = mean_se(row["units"][key])
                rows.append(row)
                print(f"stories {name:32s} distinct-2 {row['distinct_2']:.3f}  "
                      f"rep-3 {row['rep_3']:.3f}  loglik {row['loglik']:.3f}", flush=True)

    asyncio.run(go())
    return rows


def plot(rows: list[dict], path: Path, model: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    none = next(r for r in rows if r["arm"] == "none")
    for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != "none"):
        mine = [r for r in rows if r["arm"] == arm]
        betas = [r["beta"] for r in mine]
        left.errorbar(betas, [r["action_entropy"] for r in mine],
                      [r["action_entropy_se"] for r in mine], marker="o", capsize=3, label=arm)
        right.errorbar(betas, [r["valid_action_rate"] for r in mine],
                       [r["valid_action_rate_se"] for r in mine], marker="s", capsize=3,
                       label=arm)
    for ax, key, label in ((left, "action_entropy", "mean action entropy (nats)"),
                           (right, "valid_action_rate", "valid-action rate")):
        ax.axhline(none[key], color="grey", linestyle=":", label="none")
        ax.set_xlabel("EAST scale β")
        ax.set_ylabel(label)
    right.set_ylim(0, 1.05)
    left.legend(fontsize=8)
    fig.suptitle(f"Gated vs always-on EAST, text bandit, {model}")
    fig.tight_layout()
    save_figure(fig, path)


def table(rows: list[dict], columns: list[tuple[str, str]], baseline: str) -> str:
    """Each column as mean ± standard error, then each as the paired difference from the
    `baseline` arm over the same units, with its 95% interval."""
    base = next(r for r in rows if r["arm"] == baseline)
    titles = [title for _, title in columns] + [f"Δ {title} vs {baseline}"
                                                 for _, title in columns]
    lines = ["| arm | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for r in rows:
        name = f"{r['arm']}, β {r['beta']:g}" if r.get("beta") else r["arm"]
        cells = [f"{r[k]:.3f} ± {r[k + '_se']:.3f}" for k, _ in columns]
        cells += [interval_text(paired_difference(r["units"][k], base["units"][k]))
                  for k, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.gates_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/gates")
    add_model_argument(parser)
    parser.add_argument("--test", type=int, default=32, help="bandit prompts")
    parser.add_argument("--samples", type=int, default=12, help="actions per bandit prompt")
    parser.add_argument("--betas", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--below", type=float, default=1.0,
                        help="the gate's entropy threshold (nats)")
    parser.add_argument("--hold", type=int, default=1)
    parser.add_argument("--story-samples", type=int, default=4)
    parser.add_argument("--story-tokens", type=int, default=96)
    parser.add_argument("--vector", default="explore",
                        help="the stored EAST vector the bandit arms use (the bundled model's "
                        "explore; the second model ships bandit)")
    args = parse_recorded(parser, argv)
    pyplot()  # the docs extra is there, before the run rather than at its end
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = experiment_server(args)
    started = time.time()
    try:
        bandit_rows = bandit(server.base_url, args)
        story_rows = stories(server.base_url, args)
        model = checked(httpx.get(f"{server.base_url}/v1/models"))["data"][0]["id"]
    finally:
        server.stop()
    result = {"model": model, "command": args.command_line,
              "bandit": {"vector": args.vector, "test_prompts": args.test,
                         "samples_per_prompt": args.samples, "gate_below": args.below,
                         "gate_hold": args.hold, "rows": bandit_rows},
              "stories": {"prompts": len(STORY_PROMPTS), "samples_per_prompt":
                          args.story_samples, "max_tokens": args.story_tokens,
                          "rows": story_rows},
              "seconds": round(time.time() - started)}
    write_text_atomic(out / "results.json", json.dumps(result, indent=2))
    markdown = (f"```bash\n{args.command_line}\n```\n\n"
                + table(bandit_rows, [("action_entropy", "action entropy (nats)"),
                                      ("valid_action_rate", "valid-action rate")], "none")
                + "\n\n" + table(story_rows, [("distinct_2", "distinct-2"),
                                              ("rep_3", "3-gram repetition"),
                                              ("loglik", "log-likelihood / token at T = 1")],
                                   "T = 1.0"))
    write_text_atomic(out / "results.md", markdown + "\n")
    print(markdown)
    plot(bandit_rows, out / "bandit.png", model)
    print(f"plot: {out / 'bandit.png'}")


if __name__ == "__main__":
    main()
