"""A text multi-armed-bandit task for EAST, and the experiment behind docs/east.md.

Each prompt shows a history of pulls of K slot machines (Gaussian rewards) and asks which
machine to pull next, answered with one letter. `runs` logs agents playing it (each step's
prompt holds the run's own pulls so far), the data of the paper's Eq. 1. `run` starts a server
on the bundled model and compares, on the same held-out prompts, the paper's recipe (logged
runs, per-run centring, the raw vector) and its shuffled control with this project's variant
(random histories, global centring, rescaled): action entropy and valid-action rate at each
scale β, with paired bootstrap intervals (Rahn et al. 2024).

    python -m clients.experiments.bandit prompts --count 40 --seed 0 > prompts.jsonl
    python -m clients.experiments.bandit runs --url URL --runs 16 --steps 8 > runs.jsonl
    python -m clients.experiments.bandit run --out docs/east
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from clients.cli.options import add_server_arguments, auth_headers
from clients.experiments.runs import add_model_argument, experiment_server, pyplot
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked

ARMS = "ABCDE"
ACTION_PATTERN = r"\b([A-E])\b"
MAX_TOKENS = 8


def history_prompt(names: str, pulls: list[tuple[str, float]]) -> list[dict]:
    """The chat prompt of one step: the machines and the pulls so far."""
    lines = [f"Pull {t + 1}: machine {arm}, reward {reward:.2f}"
             for t, (arm, reward) in enumerate(pulls)] or ["No pulls yet."]
    text = (f"You are playing a game with {len(names)} slot machines: {', '.join(names)}. Each "
            "pull gives a random reward; you want the most reward in total.\n"
            + "\n".join(lines)
            + "\nWhich machine do you pull next? Answer with one letter only.")
    return [{"role": "user", "content": text}]


def bandit_prompt(rng: random.Random, arms: int, pulls: int) -> dict:
    """One chat prompt: a random Gaussian bandit and a random history of pulls."""
    means = [rng.gauss(0.5, 0.25) for _ in range(arms)]
    history = []
    for _ in range(pulls):
        arm = rng.randrange(arms)
        history.append((ARMS[arm], rng.gauss(means[arm], 0.2)))
    return {"messages": history_prompt(ARMS[:arms], history), "arms": arms}


def machine_named(text: str, names: str) -> str | None:
    """The machine a reply names (the first letter ACTION_PATTERN finds), None unless it is
    one of `names`."""
    match = re.search(ACTION_PATTERN, text)
    return match.group(1) if match and match.group(1) in names else None


def make_prompts(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [bandit_prompt(rng, rng.choice([2, 3, 4, 5]), rng.randint(3, 8)) for _ in range(count)]


async def log_runs(url: str, headers: dict, runs: int, steps: int, arms: int, seed: int,
                   concurrency: int = 4) -> list[dict]:
    """Agents playing the bandit, as the paper's vectors are computed from (Eq. 1 sums over
    runs k and their steps t): run k has its own machines; at step t its prompt holds its own
    t pulls so far, one sampled reply picks the machine, and the reward is drawn from it. A
    reply naming no machine pulls one at random (so the run goes on) and is counted."""
    names = ARMS[:arms]
    semaphore = asyncio.Semaphore(concurrency)
    records: list[dict] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def run(k: int) -> None:
            rng = random.Random(f"{seed}-{k}")
            means = [rng.gauss(0.5, 0.25) for _ in range(arms)]
            history: list[tuple[str, float]] = []
            for t in range(steps):
                messages = history_prompt(names, history)
                async with semaphore:
                    r = await client.post("/v1/chat/completions", json={
                        "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 1.0,
                        "seed": rng.randrange(2**31)})
                r.raise_for_status()
                chosen = machine_named(r.json()["choices"][0]["message"]["content"], names)
                records.append({"messages": messages, "arms": arms, "run": k, "step": t,
                                "chosen": chosen})
                arm = names.index(chosen) if chosen else rng.randrange(arms)
                history.append((names[arm], rng.gauss(means[arm], 0.2)))

        await asyncio.gather(*(run(k) for k in range(runs)))
    return sorted(records, key=lambda r: (r["run"], r["step"]))


async def sample_actions(url: str, headers: dict, records: list[dict], samples: int,
                         steering: dict | None, concurrency: int = 4) -> list[list[str | None]]:
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
            return [machine_named(choice["message"]["content"], ARMS[:record["arms"]])
                    for choice in r.json()["choices"]]
        return await asyncio.gather(*(one(i, rec) for i, rec in enumerate(records)))


# Scales of each vector in the experiment. The variant's vector has the mean activation norm,
# so its β is relative; the paper's is Eq. 1's raw vector, whose β = 2 is the paper's.
VARIANT_BETAS = (0.25, 0.5, 1.0, 2.0)
PAPER_BETAS = (2.0, 20.0, 200.0)


def per_prompt(actions: list[list[str | None]]) -> tuple[list[float], list[float]]:
    """Each prompt's action entropy (NaN when no sampled action was valid) and valid rate."""
    from steering.methods.east.core import action_entropy

    entropies = [action_entropy(a) for a in actions]
    return ([math.nan if h is None else h for h in entropies],
            [sum(x is not None for x in a) / len(a) for a in actions])


def plot(rows: list[dict], path: Path, model: str) -> None:
    plt = pyplot()

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    for vector, marker in (("variant", "o-"), ("paper", "s-"), ("shuffled", "^--")):
        mine = [r for r in rows if r["vector"] in (vector, "none")]
        betas = [r["beta"] for r in mine]
        for ax, key in ((top, "action_entropy"), (bottom, "valid_action_rate")):
            mean = [r[key][0] for r in mine]
            ax.errorbar(betas, mean, yerr=[[m - r[key][1] for m, r in zip(mean, mine)],
                                           [r[key][2] - m for m, r in zip(mean, mine)]],
                        fmt=marker, capsize=3, label=vector)
    top.set_ylabel("action entropy (nats)")
    bottom.set_ylabel("valid-action rate")
    bottom.set_xscale("symlog", linthresh=0.25)
    bottom.set_xlabel("EAST scale β (variant: relative to the activation norm; paper: raw)")
    top.legend()
    top.set_title(f"EAST on {model}, text bandit, 95% bootstrap intervals")
    fig.tight_layout()
    save_figure(fig, path)


def run(args) -> None:
    """Both recipes side by side on the same held-out prompts and sampling seeds (so every
    comparison with the unsteered row is paired by prompt): the variant (random histories,
    global centring, rescaled), the paper's (logged runs, Eq. 1, raw) and its shuffled
    control."""
    pyplot()  # the docs extra is there, before the run rather than at its end
    from clients.cli.vectors import east_from_samples, sample_east, upload
    from clients.experiments.stats import interval_text, mean_interval, paired_difference
    from steering.methods.east.core import Centring

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = make_prompts(args.train, seed=1), make_prompts(args.test, seed=2)
    work = Path(tempfile.mkdtemp(prefix="steer-bandit-"))
    server = experiment_server(args, log=work / "server.log")
    url, headers = server.base_url, {}
    started = time.time()

    def measure(vector: str, beta: float) -> dict:
        steering = {"east": {"vector": f"bandit-{vector}", "scale": beta}} if beta else None
        entropies, valid = per_prompt(asyncio.run(sample_actions(url, headers, test,
                                                                 args.samples, steering)))
        row = {"vector": vector, "beta": beta, "entropies": entropies, "valid": valid}
        print(f"{vector:8s} beta {beta:6.2f}  action entropy {mean_interval(entropies)[0]:.3f}"
              f"  valid {sum(valid) / len(valid):.2f}", flush=True)
        return row

    try:
        variant_samples = sample_east(url, headers, train, args.layer, args.samples,
                                      ACTION_PATTERN, MAX_TOKENS, 1.0, 4)
        runs = asyncio.run(log_runs(url, headers, args.runs, args.steps, 2, seed=3))
        paper_samples = sample_east(url, headers, runs, args.layer, args.samples,
                                    ACTION_PATTERN, MAX_TOKENS, 1.0, 4)
        vectors = {
            "variant": east_from_samples(variant_samples, Centring.GLOBAL, True),
            "paper": east_from_samples(paper_samples, Centring.RUN, False),
            "shuffled": east_from_samples(paper_samples, Centring.RUN, False, shuffle_seed=0),
        }
        for name, (vector, stats) in vectors.items():
            upload(url, headers, f"bandit-{name}", vector, args.layer, "east",
                   f"clients.bandit run: {json.dumps(stats)}", f"EAST bandit, {name} recipe")
        write_text_atomic(out / "explore.json",
                          json.dumps([float(v) for v in vectors["variant"][0]]))
        unsteered = measure("none", 0.0)
        rows = [unsteered]
        for name, betas in (("variant", VARIANT_BETAS), ("paper", PAPER_BETAS),
                            ("shuffled", PAPER_BETAS)):
            rows += [measure(name, beta) for beta in betas]
        model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    finally:
        server.stop()
    for row in rows:
        row["action_entropy"] = mean_interval(row["entropies"])
        row["valid_action_rate"] = mean_interval(row["valid"])
        row["entropy_change"] = paired_difference(row["entropies"], unsteered["entropies"])
        row["valid_change"] = paired_difference(row["valid"], unsteered["valid"])
    for row in rows:  # JSON has no NaN: a prompt without a valid action is null
        row["entropies"] = [None if math.isnan(h) else h for h in row["entropies"]]
    chosen = [r["chosen"] for r in runs]
    result = {"model": model, "layer": args.layer, "samples_per_prompt": args.samples,
              "train_prompts": args.train, "test_prompts": args.test,
              "runs": {"runs": args.runs, "steps": args.steps, "arms": 2,
                       "valid_choice_rate": sum(c is not None for c in chosen) / len(chosen)},
              "vectors": {name: stats for name, (_, stats) in vectors.items()},
              "grid": rows, "seconds": round(time.time() - started)}
    write_text_atomic(out / "results.json", json.dumps(result, indent=2))
    table = ["| vector | β | action entropy (nats) | Δ vs unsteered | valid-action rate "
             "| Δ vs unsteered |", "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {r['vector']} | {r['beta']:g} | {interval_text(r['action_entropy'])} | "
              f"{interval_text(r['entropy_change'])} | "
              f"{interval_text(r['valid_action_rate'], 2)} | "
              f"{interval_text(r['valid_change'], 2)} |" for r in rows]
    write_text_atomic(out / "results.md", "\n".join(table) + "\n")
    print("\n".join(table))
    plot(rows, out / "entropy_vs_beta.png", model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clients.experiments.bandit",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts", help="write bandit prompts as JSONL to stdout")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="the whole experiment (on the bundled model unless "
                       "--model)")
    add_model_argument(r)
    r.add_argument("--out", default="docs/east")
    r.add_argument("--layer", type=int, default=15)
    r.add_argument("--train", type=int, default=48)
    r.add_argument("--test", type=int, default=32)
    r.add_argument("--samples", type=int, default=12, help="completions per prompt")
    r.add_argument("--runs", type=int, default=16, help="the paper recipe's logged runs")
    r.add_argument("--steps", type=int, default=8, help="steps per logged run")
    g = sub.add_parser("runs", help="log agents' runs against a server as JSONL to stdout "
                       "(the input of `steer vectors compute east --centring run`)")
    add_server_arguments(g)
    g.add_argument("--runs", type=int, default=16)
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--arms", type=int, default=2, choices=range(2, len(ARMS) + 1))
    g.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "prompts":
        for record in make_prompts(args.count, args.seed):
            sys.stdout.write(json.dumps(record) + "\n")
    elif args.command == "runs":
        for record in asyncio.run(log_runs(args.url.rstrip("/"), auth_headers(args), args.runs,
                                           args.steps, args.arms, args.seed)):
            sys.stdout.write(json.dumps(record) + "\n")
    else:
        run(args)


if __name__ == "__main__":
    main()
