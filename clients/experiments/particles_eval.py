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
    python -m clients.experiments.particles_eval its-hub --rounds 3   (against its_hub's ePF)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from clients.bench.reward_scorer import ScorerHandler, scorer_url
from clients.experiments.problems import INSTRUCTIONS, KINDS, Problem, generate, is_correct
from clients.experiments.runs import (
    add_model_argument,
    experiment_server,
    gather_bounded,
    paired_order,
    parse_recorded,
    pyplot,
)
from clients.files import save_figure, write_text_atomic
from clients.sdk import checked

METHODS = {
    "best-of-n": None,
    "PF": {"annealing": "none", "resampling": "multinomial"},
    "ePF (EA)": {"annealing": "ess", "resampling": "systematic"},
    "ePF (EA + LaM)": {"annealing": "ess", "resampling": "systematic", "lookahead": True},
}


async def solve(url: str, problems: list[Problem], method: str, n: int, args) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(problem: Problem) -> tuple[bool, int]:
            body = {"messages": [{"role": "user", "content": problem.question}],
                    "max_tokens": args.max_tokens, "temperature": 0.8}
            if method == "best-of-n":
                body |= {"n": n, "steering": {"return_entropy": True}}
            else:
                reward = {"reward": "http"} if args.reward == "arithmetic" else {}
                body["steering"] = {"particles": {
                    "n": n, "step_delimiter": args.delimiter, "max_steps": args.max_steps,
                    **reward, **METHODS[method]}}
            reply = checked(await client.post("/v1/chat/completions", json=body))
            if method == "best-of-n":
                best = max(reply["choices"], key=WHOLE_ANSWER_REWARDS[args.reward])
                text = best["message"]["content"]
            else:
                text = reply["choices"][0]["message"]["content"]
            return is_correct(text, problem.answer), reply["usage"]["completion_tokens"]

        started = time.monotonic()
        results = await gather_bounded([one(p) for p in problems], args.concurrency)
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


# Best-of-n keeps the choice its reward scores highest: the particles' reward on whole answers.
WHOLE_ANSWER_REWARDS = {
    "self-certainty": lambda choice: certainty(choice["steering"]),
    "arithmetic": lambda choice: arithmetic_reward(choice["message"]["content"]),
}


def run(args) -> None:
    pyplot()  # the docs extra is there, before the run rather than at its end
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = generate(args.problems, seed=3, kinds=tuple(args.kinds),
                        instruction=args.instruction)
    rows = []
    with ExitStack() as stack:
        extra = (("--reward-url", stack.enter_context(scorer_url(ArithmeticScorer)))
                 if args.reward == "arithmetic" else ())
        if args.url and extra:
            raise SystemExit("--reward arithmetic starts its own server (with the scorer)")
        server = None if args.url else experiment_server(args, *extra)
        url = args.url or server.base_url
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
              "concurrency": args.concurrency, "reward": args.reward,
              "kinds": args.kinds, "instruction": INSTRUCTIONS[args.instruction],
              "command": args.command_line,
              "rows": rows}
    write_text_atomic(out / "results.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "results.md", markdown(report))
    plot(report, out / "accuracy.png")
    print(markdown(report))


class EngineWatch:
    """What the engine did while a method ran, from the server's Prometheus metrics: the batch
    (requests running, sampled every `every` seconds) and the counters' increase (engine
    requests, prompt tokens, prefix-cache hits)."""

    COUNTERS = {"requests": "vllm:request_success_total",
                "generated_tokens": "vllm:generation_tokens_total",
                "prompt_tokens": "vllm:prompt_tokens_total",
                "cache_queries": "vllm:prefix_cache_queries_total",
                "cache_hits": "vllm:prefix_cache_hits_total"}

    def __init__(self, url: str, every: float = 0.25) -> None:
        self.url, self.every = url, every
        self.running: list[float] = []

    def _read(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        values: dict[str, float] = {}
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    async def _sample(self) -> None:
        while True:
            values = await asyncio.to_thread(self._read)
            self.running.append(values.get("vllm:num_requests_running", 0.0))
            await asyncio.sleep(self.every)

    async def watch(self, work) -> tuple[object, dict]:
        """Run `work` (a coroutine); returns its result and what the engine did meanwhile."""
        before = await asyncio.to_thread(self._read)
        sampler = asyncio.create_task(self._sample())
        try:
            result = await work
        finally:
            sampler.cancel()
        after = await asyncio.to_thread(self._read)
        done = {key: after.get(name, 0.0) - before.get(name, 0.0)
                for key, name in self.COUNTERS.items()}
        return result, {"mean_running": statistics.fmean(self.running or [0.0]),
                        "engine_requests": done["requests"],
                        "generated_tokens": done["generated_tokens"],
                        "prefilled_tokens": done["prompt_tokens"] - done["cache_hits"],
                        "cache_hit_rate": done["cache_hits"] / max(done["cache_queries"], 1)}


def throughput(args) -> None:
    """Only the benchmark: ePF (EA) against best-of-n at each n, in paired rounds on one server
    (the order alternates between rounds; extra `steer serve` arguments after `--`), with what
    the engine did for each (batch occupancy, prefill, prefix-cache hits)."""
    problems = generate(args.problems, seed=3)
    server = experiment_server(args, *args.server_args)
    ratios: dict[int, list[float]] = {n: [] for n in args.n}
    try:
        for round_ in range(args.rounds):
            for n in args.n:
                methods = paired_order(("best-of-n", "ePF (EA)"), round_)
                rows = {}
                for method in methods:
                    watch = EngineWatch(server.base_url)
                    row, engine = asyncio.run(watch.watch(
                        solve(server.base_url, problems, method, n, args)))
                    rows[method] = {"tokens_per_second": row["tokens_per_second"],
                                    "generated_tokens": sum(row["tokens"]), **engine}
                ratio = (rows["ePF (EA)"]["tokens_per_second"]
                         / rows["best-of-n"]["tokens_per_second"])
                ratios[n].append(ratio)
                print(json.dumps({"round": round_, "n": n, "ratio": ratio, **rows}), flush=True)
    finally:
        server.stop()
    for n, values in ratios.items():
        print(json.dumps({"n": n, "ratios": values, "median": statistics.median(values)}))


EQUATION = re.compile(r"(-?\d+(?:\s*[-+]\s*\d+)+)\s*=\s*(-?\d+)")


def arithmetic_reward(text: str) -> float:
    """A rule-based process reward for sums: every `a ± b ± ... = c` written so far is
    checked; s = (right + 1) / (checked + 2), so a trajectory with no equation scores 0.5 and
    each wrong line pulls it down. It checks the work, not the answer (it knows no answer)."""
    checked = right = 0
    for left, result in EQUATION.findall(text):
        terms = re.findall(r"[-+]?\s*\d+", left)
        checked += 1
        right += sum(int(t.replace(" ", "")) for t in terms) == int(result)
    return (right + 1) / (checked + 2)


class ArithmeticScorer(ScorerHandler):
    def scores(self, trajectories: list[str]) -> list[float]:
        return [arithmetic_reward(t) for t in trajectories]


async def server_epf(url: str, problems: list[Problem], args) -> list[str]:
    """The server's ePF (EA), the scorer called by the server once per iteration."""
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        async def one(problem: Problem) -> str:
            reply = checked(await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": problem.question}],
                "max_tokens": args.steps * args.step_tokens, "temperature": args.temperature,
                "steering": {"particles": {
                    "n": args.n, "step_delimiter": "\n", "max_steps": args.steps,
                    "reward": "http", "annealing": "ess", "resampling": "systematic"}}}))
            return reply["choices"][0]["message"]["content"]

        return await gather_bounded([one(p) for p in problems], args.concurrency)


async def its_hub_epf(url: str, scorer: str, problems: list[Problem], args) -> list[str]:
    """its_hub's `EntropicParticleFiltering` (same annealing rule and resampling) driving the
    same engine from the client, as its users run it against `vllm serve`: one chat request
    per particle per step, the trajectory re-sent as an assistant prefix, the same scorer
    called over HTTP once per step with every particle."""
    from its_hub import AbstractProcessRewardModel, OpenAICompatibleLanguageModel, StepGeneration
    from its_hub.core.algorithms.particle_gibbs import EntropicParticleFiltering

    model = checked(httpx.get(f"{url}/v1/models"))["data"][0]["id"]
    async with httpx.AsyncClient(timeout=600) as client:
        class HttpReward(AbstractProcessRewardModel):
            async def ascore(self, prompt, steps: list[str]) -> list[float]:
                answer = checked(await client.post(scorer, json={
                    "prompt": str(prompt), "trajectories": steps}))
                return answer["scores"]

            def score(self, prompt, steps):
                raise NotImplementedError("asynchronous only")

        lm = OpenAICompatibleLanguageModel(
            endpoint=f"{url}/v1", api_key="none", model_name=model,
            max_completion_tokens=args.step_tokens, temperature=args.temperature, max_tries=1)
        generation = StepGeneration(max_steps=args.steps, step_token="\n",
                                    temperature=args.temperature,
                                    include_stop_str_in_output=True)
        algorithm = EntropicParticleFiltering(generation, HttpReward())

        async def one(problem: Problem) -> str:
            answer = await algorithm.ainfer(lm, problem.question, budget=args.n)
            return answer["content"] if isinstance(answer, dict) else str(answer)

        return await gather_bounded([one(p) for p in problems], args.concurrency)


def versus_its_hub(args) -> None:
    """The server's ePF against its_hub's client-side ePF on one server (its_hub's requests
    are plain chat completions, which this server answers as `vllm serve` does), the same
    problems, scorer, n, steps, temperature and step budget, in paired rounds (the order
    alternates): the speed-up in wall time and in generated tokens per second (its_hub's
    step generation runs every particle to `steps` + 1 steps and past the end of its answer;
    the server's particle ends at the end of its answer), accuracy, and what the engine did."""
    problems = generate(args.problems, seed=5, kinds=("sum",), levels=(3,))
    ratios = []
    with scorer_url(ArithmeticScorer) as scorer:
        server = experiment_server(args, "--reward-url", scorer)
        try:
            for round_ in range(args.rounds):
                sides = paired_order(("server", "its_hub"), round_)
                rows = {}
                for side in sides:
                    work = (server_epf(server.base_url, problems, args) if side == "server"
                            else its_hub_epf(server.base_url, scorer, problems, args))
                    started = time.monotonic()
                    texts, engine = asyncio.run(EngineWatch(server.base_url).watch(work))
                    seconds = time.monotonic() - started
                    rows[side] = {
                        "seconds": seconds,
                        "accuracy": statistics.fmean(is_correct(t, p.answer)
                                                     for t, p in zip(texts, problems)),
                        "tokens_per_second": engine["generated_tokens"] / seconds, **engine}
                ratio = {"time": rows["its_hub"]["seconds"] / rows["server"]["seconds"],
                         "tokens_per_second": rows["server"]["tokens_per_second"]
                         / rows["its_hub"]["tokens_per_second"]}
                ratios.append(ratio)
                print(json.dumps({"round": round_, "server_speed_up": ratio, **rows}),
                      flush=True)
        finally:
            server.stop()
    print(json.dumps({key: {"ratios": [r[key] for r in ratios],
                            "median": statistics.median(r[key] for r in ratios)}
                      for key in ratios[0]}))


def markdown(report: dict) -> str:
    """The table: accuracy and tokens with 95% bootstrap intervals over problems, and each
    particle method paired against best-of-n and against PF at the same n (the same
    problems)."""
    from clients.experiments.stats import interval_text, mean_interval, paired_difference

    lines = [
        f"Model {report['model']}, {report['problems']} problems (seed 3; kinds "
        f"{', '.join(report['kinds'])}; each followed by \"{report['instruction']}\"), "
        f"temperature 0.8, max_tokens {report['max_tokens']} per particle, step delimiter "
        f"{json.dumps(report['delimiter'])}, max_steps {report['max_steps']}, "
        f"{report['concurrency']} requests at a time; reward: {report['reward']} (best-of-n "
        "keeps the answer it scores highest). 95% bootstrap intervals over problems; Δ "
        "columns are paired differences on the same problems.", "",
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
              f"same prompts in the same run: {ratios}.", "", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Accuracy per method with its 95% interval, one group per particle count."""
    plt = pyplot()

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
    add_model_argument(r)
    r.add_argument("--problems", type=int, default=100)
    r.add_argument("--n", type=int, nargs="+", default=[1, 4, 8])
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--max-steps", type=int, default=8)
    r.add_argument("--delimiter", default="\n")
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--reward", choices=WHOLE_ANSWER_REWARDS, default="self-certainty",
                   help="the particles' reward: self-certainty (in the server), or arithmetic: "
                   "the rule-based per-line check of sums, served over HTTP (--reward-url)")
    r.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    r.add_argument("--instruction", choices=INSTRUCTIONS, default="answer",
                   help="what follows each question (problems.INSTRUCTIONS)")
    t = sub.add_parser("throughput", help="only the ePF / best-of-n throughput ratio")
    t.add_argument("--problems", type=int, default=24)
    add_model_argument(t)
    t.add_argument("--n", type=int, nargs="+", default=[8])
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--max-steps", type=int, default=8)
    t.add_argument("--delimiter", default="\n")
    t.add_argument("--concurrency", type=int, default=4)
    t.add_argument("server_args", nargs="*", help="extra `steer serve` arguments (after --)")
    t.set_defaults(reward="self-certainty")
    v = sub.add_parser("its-hub", help="the server's ePF against its_hub's client-side ePF")
    v.add_argument("--problems", type=int, default=12, help="three-number sums (level 3)")
    add_model_argument(v)
    v.add_argument("--n", type=int, default=4)
    v.add_argument("--steps", type=int, default=4)
    v.add_argument("--step-tokens", type=int, default=40)
    v.add_argument("--temperature", type=float, default=0.8)
    v.add_argument("--rounds", type=int, default=3)
    v.add_argument("--concurrency", type=int, default=1, help="problems at a time")
    args = parse_recorded(parser, argv)
    {"run": run, "throughput": throughput, "its-hub": versus_its_hub}[args.command](args)


if __name__ == "__main__":
    main()
