"""From a validated request to finished choices: the steering plan, fan-out over prompts × n,
the per-choice steering report, and the metrics. Shared by both generation routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

from server.diffadapt import Decision
from server.engine import ChoiceDelta, EastSpec, Engine, SamplingOptions, TokenLogprob
from server.metrics import SteerMetrics
from server.protocol import DiffAdaptOptions, GenerationRequest, ParticleOptions
from steering.vreason import VReasonConfig


@dataclass(frozen=True)
class Plan:
    """Which steering methods a request uses, with their parameters."""

    typical_p: float | None
    return_entropy: bool
    east: tuple[EastSpec, ...] = ()
    capture_layers: tuple[int, ...] = ()
    capture_final: bool = False
    diffadapt: DiffAdaptOptions | None = None
    particles: ParticleOptions | None = None
    vreason: VReasonConfig | None = None

    @classmethod
    def of(cls, request: GenerationRequest) -> Plan:
        mass = request.typical_mass
        east = tuple(EastSpec(vector=o.vector, scale=o.scale,
                              layers=tuple(o.layers) if o.layers else None,
                              all_positions=o.positions == "all")
                     for o in request.east_options)
        steering = request.steering
        capture = (steering.return_hidden_states if steering else None) or []
        vreason = steering.vreason if steering else None
        return cls(typical_p=mass if mass is not None and mass < 1 else None,
                   return_entropy=request.return_entropy, east=east,
                   capture_layers=tuple(dict.fromkeys(x for x in capture if x != "final")),
                   capture_final="final" in capture,
                   diffadapt=steering.diffadapt if steering else None,
                   particles=steering.particles if steering else None,
                   vreason=VReasonConfig(**vreason.model_dump()) if vreason else None)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(name for name, used in (("diffadapt", self.diffadapt is not None),
                                             ("east", bool(self.east)),
                                             ("particles", self.particles is not None),
                                             ("typical", self.typical_p is not None),
                                             ("vreason", self.vreason is not None)) if used)

    @property
    def label(self) -> str:
        """Metric label: the methods joined by '+', or 'none'."""
        return "+".join(self.methods) or "none"


def sampling_options(request: GenerationRequest, plan: Plan, max_tokens: int | None,
                     logprobs: int | None, choice: int,
                     decision: Decision | None = None) -> SamplingOptions:
    """One choice's engine options; a DiffAdapt decision sets the budget and temperature."""
    return SamplingOptions(
        max_tokens=decision.max_tokens if decision else max_tokens,
        temperature=decision.strategy.temperature if decision else request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        seed=None if request.seed is None else request.seed + choice,
        stop=tuple(request.stop_list),
        logprobs=logprobs,
        typical_p=plan.typical_p,
        east=plan.east,
        capture_layers=plan.capture_layers,
        capture_final=plan.capture_final,
        vreason=plan.vreason,
        ignore_eos=request.ignore_eos,
    )


@dataclass
class ChoiceResult:
    """A choice's output accumulated over its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    entropy: list[float | None] = field(default_factory=list)
    varentropy: list[float | None] = field(default_factory=list)
    hidden_states: dict[int | str, list[float]] | None = None
    vreason: dict | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason = delta.finish_reason
        if delta.hidden_states is not None:
            self.hidden_states = delta.hidden_states
        if delta.vreason is not None:
            self.vreason = delta.vreason
        if delta.trace is not None:
            self.entropy, self.varentropy = delta.trace.window(0, len(self.token_ids))


def _summary(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "max": None, "last": None}
    return {"mean": sum(known) / len(known), "max": max(known), "last": known[-1]}


def steering_report(plan: Plan, result: ChoiceResult, options: SamplingOptions,
                    decision: Decision | None) -> dict:
    """The per-choice `steering` object of a finished choice (`options` as admitted)."""
    report: dict = {"methods": list(plan.methods)}
    if decision is not None:
        report["diffadapt"] = decision.report()
    if plan.typical_p is not None:
        report["typical"] = {"p": plan.typical_p}
    if options.east:
        report["east"] = [{"vector": e.vector, "scale": e.scale, "layers": list(e.layers),
                           "positions": "all" if e.all_positions else "generated"}
                          for e in options.east]
    if options.vreason is not None:
        report["vreason"] = {**asdict(options.vreason), **(result.vreason or {})}
    report["entropy"] = _summary(result.entropy)
    report["varentropy"] = _summary(result.varentropy)
    if plan.return_entropy:
        report["token_entropy"] = result.entropy
        report["token_varentropy"] = result.varentropy
    if result.hidden_states is not None:
        report["hidden_states"] = {str(k): v for k, v in result.hidden_states.items()}
    return report


class Generation:
    """One HTTP request's choices, run concurrently on the engine and merged into one stream."""

    def __init__(self, engine: Engine, metrics: SteerMetrics, model: str, plan: Plan,
                 jobs: list[tuple[list[int], SamplingOptions]], stream_entropy: bool,
                 decisions: list[Decision] | None = None):
        self.engine, self.metrics, self.model, self.plan = engine, metrics, model, plan
        self.jobs = [(prompt, engine.admit(prompt, options)) for prompt, options in jobs]
        self.decisions = decisions or [None] * len(jobs)  # DiffAdapt's, one per job
        self.stream_entropy = stream_entropy
        self.arrival = time.monotonic()
        self.results = [ChoiceResult(index=i) for i in range(len(jobs))]
        self.prompt_tokens = sum(len(prompt) for prompt, _ in jobs)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    def report(self, index: int) -> dict:
        return steering_report(self.plan, self.results[index], self.jobs[index][1],
                               self.decisions[index])

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def deltas(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """(choice index, delta) as they come; cancelling the consumer aborts every choice."""
        labels = (self.model, self.plan.label)
        self.metrics.requests.labels(*labels).inc()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run(index: int, prompt: list[int], options: SamplingOptions) -> None:
            try:
                async for delta in self.engine.generate(
                    prompt, options, entropy_per_delta=self.stream_entropy
                ):
                    await queue.put((index, delta))
            except BaseException as exc:
                await queue.put((index, exc))
                raise
            finally:
                await queue.put((index, done))

        tasks = [asyncio.create_task(run(i, p, o)) for i, (p, o) in enumerate(self.jobs)]
        first_token_seen = False
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                if not first_token_seen and item.token_ids:
                    first_token_seen = True
                    self.metrics.ttft.labels(*labels).observe(time.monotonic() - self.arrival)
                result = self.results[index]
                result.add(item)
                if item.finish_reason is not None:
                    self.metrics.observe_tokens(*labels, result.entropy, result.varentropy)
                    if self.plan.east:
                        self.metrics.steered_tokens.labels(*labels).inc(len(result.token_ids))
                yield index, item
            self.metrics.e2e.labels(*labels).observe(time.monotonic() - self.arrival)
        except BaseException as exc:
            self.metrics.count_error(*labels, exc)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def run_to_end(self) -> list[ChoiceResult]:
        async for _ in self.deltas():
            pass
        return self.results
