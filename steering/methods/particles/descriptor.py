"""The particle filter's descriptor: `steering.particles`, its server options (rewards, limits),
its conflicts, metrics, and the orchestration that answers the request."""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, Field

from steering.errors import InvalidRequest
from steering.methods.base import Answer, Method, Outcome, Progress, ReportModel, StrictModel
from steering.methods.particles.core import Annealing, Resampling, Selection, StepReport
from steering.methods.particles.rewards import HttpScorer, Reward, RewardModel, reward_engine_args
from steering.methods.particles.run import DEFAULT_MAX_TOTAL_TOKENS, ParticleConfig, ParticleRun

MAX_PARTICLES = 64
MAX_PARTICLE_STEPS = 256
MAX_STOP_SEQUENCES = 8


class ParticleOptions(StrictModel):
    """(Entropic) particle filtering over reasoning steps (Puri et al. 2025; ePF, arXiv
    2510.05825): `n` particles, each extended one step (up to `step_delimiter`) per iteration,
    weighted by a reward and resampled."""

    model_config = ConfigDict(title="Particle filter (ePF)")

    n: Annotated[int, Field(ge=1, le=MAX_PARTICLES)] = 4
    step_delimiter: Annotated[str, Field(min_length=1, max_length=32)] = "\n\n"
    max_steps: Annotated[int, Field(ge=1, le=MAX_PARTICLE_STEPS)] = 32
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                    Field(max_length=MAX_STOP_SEQUENCES)] = Field(
        default=[], description="a step containing one of these finishes its particle")
    reward: Reward = Reward.SELF_CERTAINTY
    annealing: Annealing = Annealing.ESS
    ess_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    early_phase: Annotated[float, Field(ge=0, le=1)] = 0.5
    lookahead: bool = False
    resampling: Resampling = Resampling.SYSTEMATIC
    select: Selection = Selection.ARGMAX
    return_particles: bool = False


class ParticleSummary(ReportModel):
    text: str
    score: float
    log_weight: float
    finished: bool
    steps: int


class ParticlesReport(ReportModel):
    """The run's (`run.ParticleResult.report`); a streamed run's progress chunks carry only
    `progress`."""

    n: int | None = None
    reward: str | None = None
    annealing: str | None = None
    lookahead: bool | None = None
    steps: list[StepReport] | None = None
    resamples: int | None = None
    final_scores: list[float] | None = None
    chosen: int | None = None
    generated_tokens: int | None = None
    particles: list[ParticleSummary] | None = None  # with `return_particles`
    progress: StepReport | None = None


@dataclass(frozen=True)
class ParticleMeters:
    ess: object
    temperature: object
    steps: object
    resamples: object
    steps_ahead: object


class Particles(Method):
    name = "particles"
    report_model = ParticlesReport
    orchestrates = True
    in_orchestration = False

    def fields(self):
        return {"particles": (ParticleOptions | None, None)}

    def add_arguments(self, parser) -> None:
        parser.add_argument("--prm", type=Path, default=os.environ.get("STEER_PRM"),
                            help="a process reward model folder (a "
                            "'...ForSequenceClassification' checkpoint) served on a second "
                            "engine for steering.particles reward 'prm'")
        parser.add_argument("--reward-url", default=os.environ.get("STEER_REWARD_URL"),
                            help="an HTTP reward scorer for steering.particles reward 'http' "
                            "(contract in docs/particles.md)")
        parser.add_argument("--reward-timeout", type=float, default=10.0,
                            help="seconds per reward-scorer call")
        parser.add_argument("--reward-retries", type=int, default=1,
                            help="retries after a failed reward-scorer call")
        parser.add_argument("--particles-max-tokens", type=int,
                            default=DEFAULT_MAX_TOTAL_TOKENS,
                            help="largest n × max_tokens (× 2 with look-ahead) one particle-"
                            "filter request may ask for")

    def configure(self, args) -> tuple[Path | None, ParticleConfig]:
        scorer = HttpScorer(args.reward_url, args.reward_timeout, args.reward_retries) \
            if args.reward_url else None
        if args.prm is not None and not Path(args.prm).is_dir():
            raise ValueError(f"--prm {args.prm}: not a local folder")
        return args.prm, ParticleConfig(scorer=scorer, max_total_tokens=args.particles_max_tokens)

    async def start(self, config, services) -> ParticleConfig:
        prm_path, particles = config or (None, ParticleConfig())
        if prm_path is None:
            return particles
        prm = RewardModel(reward_engine_args(prm_path, services.engine.engine_args))
        await prm.start()
        return ParticleConfig(prm=prm, scorer=particles.scorer,
                              max_total_tokens=particles.max_total_tokens)

    def stop(self, state: ParticleConfig) -> None:
        if state.prm is not None:
            state.prm.shutdown()

    def read(self, request) -> ParticleOptions | None:
        return request.steering.particles if request.steering else None

    def check(self, options, request, plan) -> None:
        """What particle filtering cannot combine with, as 400s naming both fields, before
        any work."""
        if (request.n or 1) != 1:
            raise InvalidRequest(f"with {self.param}, set the particle count in "
                                 f"{self.param}.n; n must be 1", "n")
        if request.stop_list:
            raise InvalidRequest(f"with {self.param}, use {self.param}.stop", "stop")
        self.check_orchestration(request, plan)

    def sequences(self, options: ParticleOptions, requested: int) -> int:
        return options.n

    def metrics(self, registry) -> ParticleMeters:
        from prometheus_client import Counter, Histogram

        labels = ("model", "method")
        return ParticleMeters(
            ess=Histogram("steer_particle_ess_ratio", "Effective sample size / particles, per "
                          "particle-filter iteration (before resampling)", labels,
                          buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                          registry=registry),
            temperature=Histogram("steer_particle_temperature", "Resampling temperature per "
                                  "particle-filter iteration (1 = no annealing)", labels,
                                  buckets=(1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0),
                                  registry=registry),
            steps=Histogram("steer_particle_steps", "Particle-filter iterations per request",
                            labels, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                            registry=registry),
            resamples=Counter("steer_particle_resamples", "Particle-filter resampling events",
                              labels, registry=registry),
            steps_ahead=Counter("steer_particle_steps_ahead", "Particle steps started ahead of "
                                "resampling, by outcome: taken by a resampled particle, or "
                                "discarded (cancelled)", (*labels, "outcome"),
                                registry=registry))

    def answer(self, options: ParticleOptions, job):
        """One progress event per iteration, then the selected particle."""
        run = ParticleRun(job.engine, job.meters, job.state, options, job.prompt_ids,
                          job.sampling, job.steering, job.label)
        return self._events(run, options)

    async def _events(self, run: ParticleRun, options: ParticleOptions):
        progress: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(run.run(on_step=progress.put))
        task.add_done_callback(lambda _: progress.put_nowait(None))
        try:
            while (step := await progress.get()) is not None:
                yield Progress(asdict(step))
            result = await task
        finally:
            task.cancel()
        chosen = result.chosen
        entropy = [h for s in chosen.steps for h in s.entropy]
        varentropy = [v for s in chosen.steps for v in s.varentropy]
        reason = "length" if len(chosen.token_ids) >= run.sampling.max_tokens else "stop"
        yield Answer(text=chosen.text, token_ids=chosen.token_ids, entropy=entropy,
                     varentropy=varentropy, finish_reason=reason,
                     section=result.report(options), generated_tokens=result.generated_tokens)

    def report(self, options, outcome: Outcome) -> dict | None:
        return outcome.collected.get(self.name)  # the answer's section (`Answer.section`)
