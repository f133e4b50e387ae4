"""A text multi-armed-bandit task for EAST, and the experiment behind docs/east.md.

Each prompt shows a history of pulls of K slot machines (Gaussian rewards) and asks which
machine to pull next, answered with one letter. `run` starts a server on the bundled model,
computes an EAST vector from training prompts (`steer vectors compute east`), then on held-out
prompts samples actions at each scale β and reports the action entropy and the valid-action
rate, as in the paper's bandit experiments (Rahn et al. 2024).

    python -m clients.bandit prompts --count 40 --seed 0 > prompts.jsonl
    python -m clients.bandit run --out docs/east
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ARMS = "ABCDE"
ACTION_PATTERN = r"\b([A-E])\b"
MAX_TOKENS = 8


def bandit_prompt(rng: random.Random, arms: int, pulls: int) -> dict:
    """One chat prompt: a random Gaussian bandit and a random history of pulls."""
    means = [rng.gauss(0.5, 0.25) for _ in range(arms)]
    names = ARMS[:arms]
    lines = []
    for t in range(pulls):
        arm = rng.randrange(arms)
        lines.append(f"Pull {t + 1}: machine {names[arm]}, reward {rng.gauss(means[arm], 0.2):.2f}")
    text = (f"You are playing a game with {arms} slot machines: {', '.join(names)}. Each pull "
            "gives a random reward; you want the most reward in total.\n"
            + "\n".join(lines)
            + "\nWhich machine do you pull next? Answer with one letter only.")
    return {"messages": [{"role": "user", "content": text}], "arms": arms}


def make_prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [bandit_prompt(rng, rng.choice([2, 3, 4, 5]), rng.randint(3, 8)) for _ in range(count)]


async def sample_actions(url: str, headers: dict, records: list[dict], samples: int,
                         steering: dict | None, concurrency: int = 4) -> list[list[str | None]]:
    pattern = re.compile(ACTION_PATTERN)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def one(i: int, record: dict):
            body = {"messages": record["messages"], "n": samples, "max_tokens": MAX_TOKENS,
                    "temperature": 1.0, "seed": 1000 + i}
            if steering:
                body["steering"] = steering
            async with semaphore:
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            valid = set(ARMS[: record["arms"]])
            actions = []
            for choice in r.json()["choices"]:
                m = pattern.search(choice["message"]["content"])
                actions.append(m.group(1) if m and m.group(1) in valid else None)
            return actions
        return await asyncio.gather(*(one(i, rec) for i, rec in enumerate(records)))


def summarise(actions: list[list[str | None]]) -> dict:
    from steering.east import action_entropy

    entropies = [h for h in (action_entropy(a) for a in actions) if h is not None]
    total = sum(len(a) for a in actions)
    valid = sum(x is not None for a in actions for x in a)
    return {"action_entropy": statistics.fmean(entropies) if entropies else math.nan,
            "valid_action_rate": valid / total}


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    betas = [r["beta"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(betas, [r["action_entropy"] for r in rows], "o-", label="action entropy (nats)")
    ax.set_xlabel("EAST scale β")
    ax.set_ylabel("mean action entropy (nats)")
    ax2 = ax.twinx()
    ax2.plot(betas, [r["valid_action_rate"] for r in rows], "s--", color="tab:orange",
             label="valid-action rate")
    ax2.set_ylabel("valid-action rate")
    ax2.set_ylim(0, 1.05)
    fig.legend(loc="lower left", bbox_to_anchor=(0.12, 0.15))
    ax.set_title("EAST on SmolLM2-135M-Instruct, text bandit (held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(args) -> None:
    from clients.local_server import steer_server
    from clients.vectors import compute_east, upload

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_prompts(args.train, seed=1), make_prompts(args.test, seed=2)
    work = Path(tempfile.mkdtemp(prefix="steer-bandit-"))
    server = steer_server(work / "server.log")
    url, headers = server.base_url, {}
    started = time.time()
    try:
        vector, stats = compute_east(url, headers, train, args.layer, args.samples,
                                     ACTION_PATTERN, MAX_TOKENS, 1.0, 4, center=True)
        upload(url, headers, "explore", vector, args.layer, "east",
               f"bandit train prompts (seed 1, {args.train}): {json.dumps(stats)}",
               "EAST vector from the project's text bandit task")
        (out / "explore.json").write_text(json.dumps([float(v) for v in vector]))
        rows = []
        for beta in args.betas:
            steering = {"east": {"vector": "explore", "scale": beta}} if beta else None
            summary = summarise(asyncio.run(sample_actions(url, headers, test, args.samples,
                                                           steering)))
            rows.append({"beta": beta, **summary})
            print(f"beta {beta:6.2f}  action entropy {summary['action_entropy']:.3f}  "
                  f"valid {summary['valid_action_rate']:.2f}", flush=True)
    finally:
        server.stop()
    result = {"layer": args.layer, "samples_per_prompt": args.samples, "train_prompts":
              args.train, "test_prompts": args.test, "vector": stats, "grid": rows,
              "seconds": round(time.time() - started)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    table = ["| β | mean action entropy (nats) | valid-action rate |", "|---:|---:|---:|"]
    table += [f"| {r['beta']:g} | {r['action_entropy']:.3f} | {r['valid_action_rate']:.2f} |"
              for r in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    if plot(rows, out / "entropy_vs_beta.png"):
        print(f"plot: {out / 'entropy_vs_beta.png'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.bandit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="write bandit prompts as JSONL to stdout")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="the whole experiment on the bundled model")
    r.add_argument("--out", default="docs/east")
    r.add_argument("--layer", type=int, default=15)
    r.add_argument("--train", type=int, default=48)
    r.add_argument("--test", type=int, default=32)
    r.add_argument("--samples", type=int, default=12)
    r.add_argument("--betas", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 4],
                   help="scales; the vector has the mean activation norm, so β is relative")
    args = parser.parse_args(argv)
    if args.command == "prompts":
        for record in make_prompts(args.count, args.seed):
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        run(args)


if __name__ == "__main__":
    main()
