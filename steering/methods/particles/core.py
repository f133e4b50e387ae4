"""Particle filtering over reasoning steps (Puri et al. 2025, arXiv 2502.01618) with entropic
particle filtering's Entropic Annealing and Look-ahead Modulation (ePF, arXiv 2510.05825).
Engine-free: the filter drives two callables, one that extends particles by a step and one that
scores trajectories.

Weights (Puri et al.): a trajectory's reward s ∈ (0, 1), clipped to [1e-7, 1 - 1e-7], gives the
log-weight w = log(s / (1 - s)). Weights are not cumulative: the newest score replaces the old;
finished particles keep their last weight and take part in resampling (copies stay finished).

Entropic Annealing (ePF; as in its_hub's reference code): with p = softmax(w),
ESS = 1 / Σ p², ratio = ESS / N and progress = t / T, the resampling temperature τ is 1 unless
ratio < ess_threshold and progress < early_phase; then
    ess:     τ = max(1, (1 / ratio)(1 - progress))       (the paper's β_t⁻¹ = N/ESS(t) · (1 - t/T))
    entropy: H_n = H(p) / log N, β = H_n + (1 - H_n) progress, τ = max(1, 1 / β)
    base:    τ = max(1, 2 - progress)
and particles are resampled with softmax(w / τ). ESS is measured on the untempered p.

Look-ahead Modulation (ePF): each unfinished particle's successor step is generated and scored
(w'), the first-stage weight of an auxiliary particle filter; resampling uses w + w' (the odds
multiply), a finished particle uses w + w. The successor is discarded. The paper's exact formula
could not be read (its_hub leaves LaM unimplemented): this is our reading, see docs/particles.md.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch

SCORE_CLIP = 1e-7


class Annealing(StrEnum):
    """Entropic Annealing's rule for the resampling temperature (`NONE`: plain PF)."""

    ESS = "ess"
    ENTROPY = "entropy"
    BASE = "base"
    NONE = "none"


class Resampling(StrEnum):
    SYSTEMATIC = "systematic"  # one uniform offset, evenly spaced points on the CDF
    MULTINOMIAL = "multinomial"  # independent draws


class Selection(StrEnum):
    """How the answer is picked from the final particles."""

    ARGMAX = "argmax"  # the largest untempered weight
    SAMPLE = "sample"  # a draw from softmax(w)


def log_odds(scores: torch.Tensor) -> torch.Tensor:
    """w = log(s / (1 - s)) with s clipped to [1e-7, 1 - 1e-7]."""
    s = scores.double().clamp(SCORE_CLIP, 1 - SCORE_CLIP)
    return torch.log(s) - torch.log1p(-s)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """ESS = 1 / Σ p², p = softmax(w)."""
    p = torch.softmax(log_weights.double(), 0)
    return float(1.0 / p.square().sum())


def annealing_temperature(log_weights: torch.Tensor, step: int, max_steps: int,
                          rule: Annealing, ess_threshold: float, early_phase: float) -> float:
    """ePF's resampling temperature τ_t for step `step` (1-based) of at most `max_steps`."""
    if rule == Annealing.NONE:
        return 1.0
    n = log_weights.numel()
    ratio = effective_sample_size(log_weights) / n
    progress = step / max_steps
    if ratio >= ess_threshold or progress >= early_phase:
        return 1.0
    if rule == Annealing.ESS:
        return max(1.0, (1.0 / ratio) * (1.0 - progress))
    if rule == Annealing.ENTROPY:
        p = torch.softmax(log_weights.double(), 0)
        entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum())
        normalised = entropy / math.log(n) if n > 1 else 1.0
        beta = normalised + (1.0 - normalised) * progress
        return max(1.0, 1.0 / beta) if beta > 0 else math.inf
    return max(1.0, 2.0 - progress)  # Annealing.BASE


def resample(probabilities: torch.Tensor, count: int, scheme: Resampling,
             generator: torch.Generator) -> torch.Tensor:
    """`count` ancestor indices drawn from `probabilities` by `scheme` (systematic has the
    lower variance)."""
    p = probabilities.double() / probabilities.double().sum()
    if scheme == Resampling.MULTINOMIAL:
        return torch.multinomial(p, count, replacement=True, generator=generator)
    offset = torch.rand((), generator=generator, dtype=torch.float64)
    points = (torch.arange(count, dtype=torch.float64) + offset) / count
    cdf = torch.cumsum(p, 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, points, right=True).clamp(max=len(p) - 1)


def self_certainty(entropies: list[float]) -> float:
    """A step's reward from the generator's own distributions: exp(-mean token entropy), in
    (0, 1] (its_hub's entropy signal, with the exact full-vocabulary entropy)."""
    known = [h for h in entropies if h is not None]
    return math.exp(-sum(known) / len(known)) if known else 0.5


@dataclass(frozen=True)
class ParticleSettings:
    n: int = 4
    max_steps: int = 32
    annealing: Annealing = Annealing.ESS
    ess_threshold: float = 0.5
    early_phase: float = 0.5
    lookahead: bool = False
    resampling: Resampling = Resampling.SYSTEMATIC
    select: Selection = Selection.ARGMAX


@dataclass(frozen=True)
class Step:
    """One generated step of one particle."""

    text: str
    token_ids: list[int]
    entropy: list[float | None]
    varentropy: list[float | None]
    finished: bool  # end of sequence, a stop pattern, or the particle's token budget


@dataclass
class Particle:
    steps: list[Step] = field(default_factory=list)
    log_weight: float = 0.0
    score: float = 0.5
    finished: bool = False

    @property
    def token_ids(self) -> list[int]:
        return [t for step in self.steps for t in step.token_ids]

    @property
    def text(self) -> str:
        return "".join(step.text for step in self.steps)

    def extended(self, step: Step) -> Particle:
        return replace(self, steps=[*self.steps, step])

    def copy(self) -> Particle:
        return replace(self, steps=list(self.steps))


@dataclass(frozen=True)
class StepReport:
    """What one iteration did: particles extended, ESS before resampling, the temperature used,
    whether it resampled (every iteration but a last one where all particles finished), how
    many distinct ancestors survived, the best score so far."""

    step: int
    live: int
    ess: float
    temperature: float
    resampled: bool
    distinct_ancestors: int
    best_score: float
    weights: list[float]  # each particle's normalised weight, softmax of its log-weight
    ancestors: list[int]  # the particle each new one copies (empty when not resampled)


Extend = Callable[[list[Particle]], Awaitable[list[Step]]]
Score = Callable[[list[Particle]], Awaitable[list[float]]]


class ParticleFilter:
    """Runs (e)PF: `run(extend, score)` returns the chosen particle, all final particles and
    one report per iteration. `extend` generates one step for each given particle (all in one
    engine batch); `score` returns each trajectory's reward in [0, 1]."""

    def __init__(self, settings: ParticleSettings, seed: int | None = None,
                 on_step: Callable[[StepReport], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else torch.seed())
        self.on_step = on_step
        self.best_score = 0.0

    async def run(self, extend: Extend,
                  score: Score) -> tuple[Particle, list[Particle], list[StepReport]]:
        s = self.settings
        particles = [Particle() for _ in range(s.n)]
        reports: list[StepReport] = []
        for step in range(1, s.max_steps + 1):
            live = [i for i, p in enumerate(particles) if not p.finished]
            if not live:
                break
            grown = await extend([particles[i] for i in live])
            for i, new_step in zip(live, grown):
                particles[i] = particles[i].extended(new_step)
                particles[i].finished = new_step.finished or step == s.max_steps
            await self._weigh([particles[i] for i in live], score)
            weights = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
            if all(p.finished for p in particles):
                reports.append(await self._report(step, len(live), weights, 1.0, [],
                                                  particles))
                break
            resampling_weights = weights + await self._lookahead(particles, extend, score) \
                if s.lookahead else weights
            temperature = annealing_temperature(weights, step, s.max_steps, s.annealing,
                                                s.ess_threshold, s.early_phase)
            probabilities = torch.softmax(resampling_weights / temperature, 0)
            ancestors = resample(probabilities, s.n, s.resampling, self.generator)
            particles = [particles[i].copy() for i in ancestors.tolist()]
            reports.append(await self._report(step, len(live), weights, temperature,
                                              ancestors.tolist(), particles))
        return self._select(particles), particles, reports

    async def _weigh(self, particles: list[Particle], score: Score) -> None:
        scores = await score(particles)
        weights = log_odds(torch.tensor(scores, dtype=torch.float64)).tolist()
        for particle, value, weight in zip(particles, scores, weights):
            particle.score, particle.log_weight = float(value), weight

    async def _lookahead(self, particles: list[Particle], extend: Extend,
                         score: Score) -> torch.Tensor:
        """Each particle's look-ahead log-weight: its successor's for unfinished particles
        (successors discarded), its own for finished ones."""
        extra = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
        live = [i for i, p in enumerate(particles) if not p.finished]
        successors = [particles[i].extended(step) for i, step in
                      zip(live, await extend([particles[i] for i in live]))]
        scores = await score(successors)
        extra[live] = log_odds(torch.tensor(scores, dtype=torch.float64))
        return extra

    async def _report(self, step: int, live: int, weights: torch.Tensor, temperature: float,
                      ancestors: list[int], particles: list[Particle]) -> StepReport:
        self.best_score = max(self.best_score, *(p.score for p in particles))
        report = StepReport(step=step, live=live, ess=effective_sample_size(weights),
                            temperature=temperature, resampled=bool(ancestors),
                            distinct_ancestors=len(set(ancestors)) if ancestors
                            else len(particles), best_score=self.best_score,
                            weights=torch.softmax(weights, 0).tolist(), ancestors=ancestors)
        if self.on_step is not None:
            await self.on_step(report)
        return report

    def _select(self, particles: list[Particle]) -> Particle:
        """Argmax of the untempered weights, or a draw from softmax(w)."""
        weights = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
        if self.settings.select == Selection.SAMPLE:
            index = int(torch.multinomial(torch.softmax(weights, 0), 1,
                                          generator=self.generator))
        else:
            index = int(weights.argmax())
        return particles[index]
