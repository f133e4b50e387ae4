"""Particle filtering per request: `core.ParticleFilter` driven by engine requests.

Every iteration sends one engine request per live particle, all at once (vLLM batches them):
the prompt plus the particle's tokens so far, generating until the step delimiter. vLLM's prefix
cache holds the shared prompt and every trajectory's full KV blocks, so a particle re-prefills
only its last partial block and its new step; resampled copies share their ancestor's blocks.

A particle that ends its step before the iteration's slowest starts its next step at once,
ahead of resampling, instead of leaving its place in the batch idle: resampling reads only the
steps already scored, so that next step is a sample from the same distribution the particle's
first copy would draw after resampling, and that copy takes it; a particle no copy descends
from has its step cancelled. Seeded requests do not step ahead (each step's seed follows the
order of the engine calls, which resampling decides), nor does Look-ahead Modulation (its
look-ahead steps are this iteration's, and are discarded).
Rewards: `self_certainty` from the step's per-token entropy (the engine's telemetry), a process
reward model on a second engine (`--prm`), or an external HTTP scorer (`rewards`).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, replace

from steering.errors import InvalidRequest
from steering.methods.particles.core import (
    Particle,
    ParticleFilter,
    ParticleSettings,
    Step,
    StepReport,
    self_certainty,
)
from steering.methods.particles.rewards import HttpScorer, Reward, RewardModel

DEFAULT_PARTICLE_TOKENS = 512  # per particle when the request sets no max_tokens
DEFAULT_MAX_TOTAL_TOKENS = 65536  # n × per-particle tokens (× 2 with look-ahead) per request


@dataclass(frozen=True)
class ParticleConfig:
    """Server-side settings: the reward model and the HTTP scorer (None: asking for that reward
    is a 400) and the size limit."""

    prm: RewardModel | None = None
    scorer: HttpScorer | None = None
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS


@dataclass
class ParticleResult:
    chosen: Particle
    chosen_index: int
    particles: list[Particle]
    reports: list[StepReport]
    generated_tokens: int

    def report(self, options) -> dict:
        steps = [asdict(r) for r in self.reports]
        report = {"n": options.n, "reward": options.reward, "annealing": options.annealing,
                  "lookahead": options.lookahead, "steps": steps,
                  "resamples": sum(r.resampled for r in self.reports),
                  "final_scores": [p.score for p in self.particles],
                  "chosen": self.chosen_index, "generated_tokens": self.generated_tokens}
        if options.return_particles:
            report["particles"] = [{"text": p.text, "score": p.score,
                                    "log_weight": p.log_weight, "finished": p.finished,
                                    "steps": len(p.steps)} for p in self.particles]
        return report


class ParticleRun:
    """One request's particle filter on the engine: its steps run with the request's sampling
    and the other methods' in-engine `steering`; `meters` are the particle metrics."""

    def __init__(self, engine, meters, config: ParticleConfig, options, prompt_ids: list[int],
                 sampling, steering, label: tuple[str, str]) -> None:
        self.engine, self.meters, self.config = engine, meters, config
        self.options, self.prompt_ids, self.label = options, prompt_ids, label
        self.steering = steering
        room = engine.max_model_len - len(prompt_ids)
        budget = sampling.max_tokens or min(DEFAULT_PARTICLE_TOKENS, room)
        self.sampling = engine.admit(prompt_ids, replace(sampling, max_tokens=budget))
        factor = 2 if options.lookahead else 1
        total = options.n * budget * factor
        if total > config.max_total_tokens:
            raise InvalidRequest(
                f"particles: n={options.n} × max_tokens={budget}"
                f"{' × 2 (look-ahead)' if factor == 2 else ''} = {total} tokens exceeds this "
                f"server's limit of {config.max_total_tokens}", "steering.particles.n")
        if options.reward == Reward.HTTP and config.scorer is None:
            raise InvalidRequest("this server has no reward scorer (start it with "
                                 "--reward-url)", "steering.particles.reward")
        if options.reward == Reward.PRM and config.prm is None:
            raise InvalidRequest("this server has no process reward model (start it with "
                                 "--prm PATH)", "steering.particles.reward")
        self.prompt_text = engine.tokenizer.decode(prompt_ids)
        self.generated_tokens = 0
        self._calls = 0
        self._iterations = 0
        self._steps_ahead = sampling.seed is None and not options.lookahead
        # by trajectory so far: one per particle that started it (identical particles are
        # still separate particles, each with its own copies)
        self._ahead: dict[tuple[int, ...], list[asyncio.Future[Step]]] = {}

    async def run(self, on_step=None) -> ParticleResult:
        o = self.options
        settings = ParticleSettings(n=o.n, max_steps=o.max_steps, annealing=o.annealing,
                                    ess_threshold=o.ess_threshold, early_phase=o.early_phase,
                                    lookahead=o.lookahead, resampling=o.resampling,
                                    select=o.select)

        async def observed(report: StepReport) -> None:
            self.meters.ess.labels(*self.label).observe(report.ess / o.n)
            self.meters.temperature.labels(*self.label).observe(report.temperature)
            if report.resampled:
                self.meters.resamples.labels(*self.label).inc()
            if on_step is not None:
                await on_step(report)

        pf = ParticleFilter(settings, seed=self.sampling.seed, on_step=observed)
        try:
            chosen, particles, reports = await pf.run(self._extend, self._score)
        finally:
            self._steps_ahead = False  # a step still running after a failure starts no other
            self._discard(step for steps in self._ahead.values() for step in steps)
        self.meters.steps.labels(*self.label).observe(len(reports))
        return ParticleResult(chosen=chosen, chosen_index=particles.index(chosen),
                              particles=particles, reports=reports,
                              generated_tokens=self.generated_tokens)

    async def _extend(self, particles: list[Particle]) -> list[Step]:
        """One step for each particle: the step it started ahead when it has one, else a new
        engine request; the steps started ahead that no particle takes are cancelled."""
        self._iterations += 1
        ahead, self._ahead = self._ahead, {}
        trajectories = [p.token_ids for p in particles]
        steps = [ahead[key].pop() if ahead.get(key := tuple(done)) else None
                 for done in trajectories]
        self._discard(step for unclaimed in ahead.values() for step in unclaimed)
        self.meters.steps_ahead.labels(*self.label, "taken").inc(
            sum(step is not None for step in steps))
        return list(await asyncio.gather(*(
            self._then_ahead(done, step or asyncio.ensure_future(self._step(done)))
            for done, step in zip(trajectories, steps))))

    async def _then_ahead(self, done: list[int], step: asyncio.Future[Step]) -> Step:
        """`step` once it has ended; a particle that goes on starts its next step at once."""
        ended = await step
        self.generated_tokens += len(ended.token_ids)
        trajectory = tuple(done + ended.token_ids)
        if (self._steps_ahead and not ended.finished
                and self._iterations < self.options.max_steps):
            self._ahead.setdefault(trajectory, []).append(
                asyncio.ensure_future(self._step(list(trajectory))))
        return ended

    def _discard(self, steps) -> None:
        for step in steps:
            step.cancel()
            step.add_done_callback(_retrieved)
            self.meters.steps_ahead.labels(*self.label, "discarded").inc()

    async def _step(self, done: list[int]) -> Step:
        left = self.sampling.max_tokens - len(done)
        seed = self.sampling.seed
        self._calls += 1
        options = replace(self.sampling, max_tokens=left,
                          stop=(self.options.step_delimiter,), include_stop_str_in_output=True,
                          seed=None if seed is None else seed + 7919 * self._calls)
        ended = None
        async for ended in self.engine.generate(self.prompt_ids + done, options, self.steering,
                                                deltas=False):
            pass  # the step arrives once, when it ends: no per-token work in this process
        text, tokens = ended.text, ended.token_ids
        entropy, varentropy = ended.trace.window(0, len(tokens))
        finish, stop_reason = ended.finish_reason, ended.stop_reason
        at_delimiter = finish == "stop" and stop_reason == self.options.step_delimiter
        finished = (not at_delimiter or len(tokens) >= left
                    or any(pattern in text for pattern in self.options.stop))
        return Step(text=text, token_ids=tokens, entropy=entropy, varentropy=varentropy,
                    finished=finished)

    async def _score(self, particles: list[Particle]) -> list[float]:
        if self.options.reward == Reward.HTTP:
            return await self.config.scorer(self.prompt_text, [p.text for p in particles])
        if self.options.reward == Reward.PRM:
            return await self.config.prm.score([self.prompt_text + p.text for p in particles])
        return [self_certainty(p.steps[-1].entropy) for p in particles]


def _retrieved(step: asyncio.Future) -> None:
    """A discarded step's outcome, read so that its error (if it ended in one) is not
    reported as never retrieved."""
    if not step.cancelled():
        step.exception()
