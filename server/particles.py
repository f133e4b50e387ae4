"""Particle filtering per request: `steering.particles.ParticleFilter` driven by engine requests.

Every iteration sends one engine request per live particle, all at once (vLLM batches them):
the prompt plus the particle's tokens so far, generating until the step delimiter. vLLM's prefix
cache holds the shared prompt and every trajectory's full KV blocks, so a particle re-prefills
only its last partial block and its new step; resampled copies share their ancestor's blocks.
Rewards: `self_certainty` from the step's per-token entropy (the engine's telemetry), a process
reward model on a second engine (`--prm`), or an external HTTP scorer.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass, replace

import httpx

from server.engine import Engine, RewardModel, SamplingOptions
from server.errors import InvalidRequest, UpstreamError
from server.metrics import SteerMetrics
from server.protocol import ParticleOptions
from steering.particles import (
    Particle,
    ParticleFilter,
    ParticleSettings,
    Step,
    StepReport,
    self_certainty,
)

logger = logging.getLogger("entropy_steer.particles")

DEFAULT_PARTICLE_TOKENS = 512  # per particle when the request sets no max_tokens
DEFAULT_MAX_TOTAL_TOKENS = 65536  # n × per-particle tokens (× 2 with look-ahead) per request


@dataclass(frozen=True)
class HttpScorer:
    """An external reward service. Contract: POST `url` with
    {"prompt": str, "trajectories": [str, ...]} → 200 {"scores": [float in [0, 1], ...]}, one
    score per trajectory (the partial answer so far). Each call has `timeout` seconds and is
    retried `retries` times on connection errors, timeouts and 5xx."""

    url: str
    timeout: float = 10.0
    retries: int = 1

    async def __call__(self, prompt: str, trajectories: list[str]) -> list[float]:
        last = "no attempt"
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for _ in range(self.retries + 1):
                try:
                    reply = await client.post(self.url, json={"prompt": prompt,
                                                              "trajectories": trajectories})
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    continue
                if reply.status_code >= 500:
                    last = f"HTTP {reply.status_code}"
                    continue
                return self._scores(reply, len(trajectories))
        raise UpstreamError(f"the reward scorer at {self.url} failed: {last}")

    def _scores(self, reply: httpx.Response, count: int) -> list[float]:
        try:
            if reply.status_code != 200:
                raise ValueError(f"HTTP {reply.status_code}")
            scores = reply.json()["scores"]
            if len(scores) != count or not all(
                    isinstance(s, (int, float)) and 0 <= s <= 1 for s in scores):
                raise ValueError(f"expected {count} scores in [0, 1]")
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"the reward scorer at {self.url} answered badly: {exc}") \
                from None
        return [float(s) for s in scores]


@dataclass(frozen=True)
class ParticleConfig:
    """Server-side settings: the reward model and the HTTP scorer (None: asking for that reward
    is a 400) and the size limit."""

    prm: RewardModel | None = None
    scorer: HttpScorer | None = None
    max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS


# The request fields the particle filter honours; any other field set is a 400, never dropped.
PARTICLE_FIELDS = frozenset({
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stream",
    "stream_options", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "return_token_ids",
    "typical_p", "steering", "user", "metadata", "store", "service_tier", "request_id",
    "logprobs", "top_logprobs", "stop", "echo", "add_generation_prompt", "priority",
})


def reject_conflicts(body, plan) -> None:
    """What particle filtering cannot combine with, as 400s naming both fields, before any
    work."""
    if (body.n or 1) != 1:
        raise InvalidRequest("with steering.particles, set the particle count in "
                             "steering.particles.n; n must be 1", "n")
    if body.stop_list:
        raise InvalidRequest("with steering.particles, use steering.particles.stop", "stop")
    if body.logprobs not in (None, False) or getattr(body, "echo", False):
        field = "echo" if getattr(body, "echo", False) else "logprobs"
        raise InvalidRequest(f"{field} is not available with steering.particles", field)
    unsupported = sorted(set(body.model_fields_set) - PARTICLE_FIELDS)
    if unsupported:
        raise InvalidRequest(f"steering.particles does not combine with {', '.join(unsupported)}"
                             " (the particle filter runs its own engine requests step by step)",
                             unsupported[0])
    others = plan.not_with_particles()
    if others:
        raise InvalidRequest(f"steering.particles does not combine with {', '.join(others)}",
                             "steering.particles")


@dataclass
class ParticleResult:
    chosen: Particle
    chosen_index: int
    particles: list[Particle]
    reports: list[StepReport]
    text: str
    generated_tokens: int

    def report(self, options: ParticleOptions) -> dict:
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
    """One request's particle filter on the engine."""

    def __init__(self, engine: Engine, metrics: SteerMetrics, config: ParticleConfig,
                 options: ParticleOptions, prompt_ids: list[int], sampling: SamplingOptions,
                 label: tuple[str, str]) -> None:
        self.engine, self.metrics, self.config = engine, metrics, config
        self.options, self.prompt_ids, self.label = options, prompt_ids, label
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
        if options.reward == "http" and config.scorer is None:
            raise InvalidRequest("this server has no reward scorer (start it with "
                                 "--reward-url)", "steering.particles.reward")
        if options.reward == "prm" and config.prm is None:
            raise InvalidRequest("this server has no process reward model (start it with "
                                 "--prm PATH)", "steering.particles.reward")
        self.prompt_text = engine.tokenizer.decode(prompt_ids)
        self.generated_tokens = 0
        self._calls = 0

    async def run(self, on_step=None) -> ParticleResult:
        o = self.options
        settings = ParticleSettings(n=o.n, max_steps=o.max_steps, annealing=o.annealing,
                                    ess_threshold=o.ess_threshold, early_phase=o.early_phase,
                                    lookahead=o.lookahead, resampling=o.resampling,
                                    select=o.select)

        async def observed(report: StepReport) -> None:
            self.metrics.particle_ess.labels(*self.label).observe(report.ess / o.n)
            self.metrics.particle_temperature.labels(*self.label).observe(report.temperature)
            if report.resampled:
                self.metrics.particle_resamples.labels(*self.label).inc()
            if on_step is not None:
                await on_step(report)

        pf = ParticleFilter(settings, seed=self.sampling.seed, on_step=observed)
        chosen, particles, reports = await pf.run(self._extend, self._score)
        self.metrics.particle_steps.labels(*self.label).observe(len(reports))
        return ParticleResult(chosen=chosen, chosen_index=particles.index(chosen),
                              particles=particles, reports=reports,
                              text=self.engine.tokenizer.decode(chosen.token_ids),
                              generated_tokens=self.generated_tokens)

    async def _extend(self, particles: list[Particle]) -> list[Step]:
        return list(await asyncio.gather(*(self._step(p) for p in particles)))

    async def _step(self, particle: Particle) -> Step:
        done = particle.token_ids
        left = self.sampling.max_tokens - len(done)
        seed = self.sampling.seed
        self._calls += 1
        options = replace(self.sampling, max_tokens=left,
                          stop=(self.options.step_delimiter,), include_stop_str_in_output=True,
                          seed=None if seed is None else seed + 7919 * self._calls)
        text, tokens, entropy, varentropy, finish, stop_reason = "", [], [], [], None, None
        async for delta in self.engine.generate(self.prompt_ids + done, options,
                                                entropy_per_delta=False):
            text += delta.text
            tokens += delta.token_ids
            if delta.trace is not None:
                entropy, varentropy = delta.trace.window(0, len(tokens))
            finish, stop_reason = delta.finish_reason, delta.stop_reason
        self.generated_tokens += len(tokens)
        at_delimiter = finish == "stop" and stop_reason == self.options.step_delimiter
        finished = (not at_delimiter or len(tokens) >= left
                    or any(pattern in text for pattern in self.options.stop))
        return Step(text=text, token_ids=tokens, entropy=entropy, varentropy=varentropy,
                    finished=finished)

    async def _score(self, particles: list[Particle]) -> list[float]:
        if self.options.reward == "http":
            return await self.config.scorer(self.prompt_text, [p.text for p in particles])
        if self.options.reward == "prm":
            return await self.config.prm.score([self.prompt_text + p.text for p in particles])
        return [self_certainty(p.steps[-1].entropy) for p in particles]
