"""The steering methods as the server sees them, each described once: the request field it
reads, the in-engine options it sets for every choice, the section it adds to a choice's
report (and that section's schema), and whether the particle filter can run it.

Adding a method is one class here and its entry in `METHODS`; how its in-engine options reach
vLLM (`SamplingParams.extra_args`) is the engine wrapper's business (`server.engine`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from server.engine import EastSpec, GateSpec, SamplingOptions
from steering.gates import Action, Gate, Signal
from steering.particles import StepReport
from steering.vllm_adapter.telemetry import GateStep
from steering.vreason import VReasonConfig


@dataclass(frozen=True)
class Outcome:
    """What one finished choice ran with and measured, for the report."""

    ran: SamplingOptions  # the choice's options as admitted (EAST layers resolved)
    decision: Any = None  # DiffAdapt's `Decision`
    hidden_states: dict | None = None
    vreason: dict | None = None
    gate_steps: list[GateStep | None] = field(default_factory=list)  # per generated token
    continued: dict | None = None  # how DiffAdapt's continuation went on, when one ran


class Report(BaseModel):
    """A report section's schema: exactly these keys (the OpenAPI schema says so)."""

    model_config = ConfigDict(extra="forbid")


class Method(ABC):
    """One method: `options` reads it from a request (None: the request does not use it)."""

    name: ClassVar[str]
    section: ClassVar[Any] = None  # the type of its report section (None: it adds none)
    listed: ClassVar[bool] = True  # named in the report's `methods` and the metric label
    with_particles: ClassVar[bool] = True  # the particle filter can run it in its steps

    @abstractmethod
    def options(self, request) -> Any | None: ...

    def steer(self, options, steering: SamplingOptions) -> SamplingOptions:
        """The in-engine options every choice of the request runs with."""
        return steering

    def report(self, options, outcome: Outcome) -> Any | None:
        """The method's section of a choice's report (None: no section)."""
        return None


class TypicalReport(Report):
    p: float


class Typical(Method):
    """Locally typical sampling (Meister et al. 2022): `typical_p` or `steering.typical`."""

    name = "typical"
    section = TypicalReport

    def options(self, request) -> float | None:
        mass = request.typical_mass
        return mass if mass is not None and mass < 1 else None  # τ = 1 keeps every token

    def steer(self, options: float, steering: SamplingOptions) -> SamplingOptions:
        return replace(steering, typical_p=options)

    def report(self, options: float, outcome: Outcome) -> dict:
        return {"p": options}


class EastReport(Report):
    vector: str
    scale: float
    layers: list[int]
    positions: Literal["generated", "all"]


class East(Method):
    """EAST (Rahn et al. 2024): stored vectors added to the residual stream."""

    name = "east"
    section = list[EastReport]

    def options(self, request) -> tuple[EastSpec, ...] | None:
        return tuple(EastSpec(vector=o.vector, scale=o.scale,
                              layers=tuple(o.layers) if o.layers else None,
                              all_positions=o.positions == "all")
                     for o in request.east_options) or None

    def steer(self, options, steering: SamplingOptions) -> SamplingOptions:
        return replace(steering, east=options)

    def report(self, options, outcome: Outcome) -> list[dict]:
        return [{"vector": e.vector, "scale": e.scale, "layers": list(e.layers),
                 "positions": "all" if e.all_positions else "generated"}
                for e in outcome.ran.east]


class StrategyReport(Report):
    prompt: str
    prefill: str
    system: str
    temperature: float
    top_p: float | None
    budget: float
    max_tokens: int


class ProbePosition(Report):
    """The probe read the last token of the question wrapped in `prompt`, then `prefill`."""

    prompt: str
    prefill: str


class ContinuationReport(Report):
    """How an answer the budget cut off goes on (`steering.diffadapt.Continuation`)."""

    prefix: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: str


class ContinuedReport(Report):
    """This choice was cut off and continued: the prefix's tokens, then `tokens` sampled."""

    prefix_tokens: int
    tokens: int
    finish_reason: str | None


class DiffAdaptReport(Report):
    """The probe's decision (no probabilities or position when the request set the class),
    the strategy served and the continuation."""

    probe: str
    recipe: Literal["paper", "variant"]
    difficulty: str
    probabilities: dict[str, float] | None
    probe_position: ProbePosition | None
    strategy: StrategyReport
    continuation: ContinuationReport | None
    continued: ContinuedReport | None


class DiffAdapt(Method):
    """DiffAdapt (arXiv 2510.19669): a probe pass picks each question's strategy (the route
    runs it before generation)."""

    name = "diffadapt"
    section = DiffAdaptReport
    with_particles = False

    def options(self, request):
        return request.steering.diffadapt if request.steering else None

    def report(self, options, outcome: Outcome) -> dict | None:
        if outcome.decision is None:
            return None
        return {**outcome.decision.report(), "continued": outcome.continued}


class ParticleSummary(Report):
    text: str
    score: float
    log_weight: float
    finished: bool
    steps: int


class ParticlesReport(Report):
    """The run's (`server.particles`); a streamed run's progress chunks carry only `progress`."""

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


class Particles(Method):
    """(Entropic) particle filtering: the server orchestrates the engine requests itself; its
    report section is the run's (`server.particles`)."""

    name = "particles"
    section = ParticlesReport

    def options(self, request):
        return request.steering.particles if request.steering else None


class VReasonUpdate(Report):
    token: int
    alpha: float
    ema: float
    entropy_before: float
    entropy_after: float
    delta_norm: float


class VReasonReport(Report):
    every: int
    steps: int
    lr: float
    ema: float
    positions: str
    updates: list[VReasonUpdate] = []
    peak_token: int | None = None
    peak_ema: float | None = None
    error: str | None = None


class VReason(Method):
    """V-Reason (arXiv 2510.17045): value-cache tuning of the last layer inside the engine."""

    name = "vreason"
    section = VReasonReport
    with_particles = False

    def options(self, request) -> VReasonConfig | None:
        vreason = request.steering.vreason if request.steering else None
        return VReasonConfig(**vreason.model_dump()) if vreason else None

    def steer(self, options: VReasonConfig, steering: SamplingOptions) -> SamplingOptions:
        return replace(steering, vreason=options)

    def report(self, options: VReasonConfig, outcome: Outcome) -> dict:
        return {**asdict(options), **(outcome.vreason or {})}


class HiddenStates(Method):
    """Hidden states at the last prompt token (`steering.return_hidden_states`): reported, not
    a steering method of its own."""

    name = "hidden_states"
    section = dict[str, list[float]]  # by layer index, and "final"
    listed = False
    with_particles = False

    def options(self, request) -> tuple[tuple[int, ...], bool] | None:
        asked = request.steering.return_hidden_states if request.steering else None
        if not asked:
            return None
        return tuple(dict.fromkeys(x for x in asked if x != "final")), "final" in asked

    def steer(self, options, steering: SamplingOptions) -> SamplingOptions:
        layers, final = options
        return replace(steering, capture_layers=layers, capture_final=final)

    def report(self, options, outcome: Outcome) -> dict | None:
        if outcome.hidden_states is None:
            return None
        return {str(k): v for k, v in outcome.hidden_states.items()}


class GateReport(Report):
    """One gate over a choice's generated tokens (indices into them)."""

    signal: str
    then: dict[str, Any]  # its action, as the request gave it
    fired_count: int
    fired: list[int]  # tokens whose distribution met the condition
    values: list[float]  # the signal at each of those tokens
    held: list[int]  # tokens its action was on for (its sampling actions acted on these)


class GatesReport(Report):
    gates: list[GateReport]
    east_tokens: list[int]  # tokens whose forward pass a gate's EAST vector steered


_GATE_ACTIONS = {"temperature": Action.TEMPERATURE, "typical_p": Action.TYPICAL_P,
                 "top_k": Action.TOP_K, "min_p": Action.MIN_P}


class Gates(Method):
    """Closed-loop entropy gates (`steering.gates`): actions switched on by each token's live
    entropy, varentropy or entropy EMA, inside the batch."""

    name = "gates"
    section = GatesReport

    def options(self, request) -> tuple[tuple[GateSpec, ...], list[dict]] | None:
        gates = request.steering.gates if request.steering else None
        if not gates:
            return None
        specs = []
        for g in gates:
            then = g.then
            actions = [(action, float(getattr(then, name)))
                       for name, action in _GATE_ACTIONS.items() if getattr(then, name) is not None]
            east = None
            if then.east is not None:
                actions.append((Action.EAST, 1.0))
                east = EastSpec(vector=then.east.vector, scale=then.east.scale,
                                layers=tuple(then.east.layers) if then.east.layers else None)
            specs.append(GateSpec(Gate(Signal[g.signal.upper()], g.above, g.below, g.hold,
                                       0.9 if g.ema is None else g.ema, tuple(actions)), east))
        return tuple(specs), [g.then.model_dump(exclude_none=True) for g in gates]

    def steer(self, options, steering: SamplingOptions) -> SamplingOptions:
        return replace(steering, gates=options[0])

    def report(self, options, outcome: Outcome) -> dict | None:
        steps = outcome.gate_steps
        if not steps:  # a particle-filter run: its steps' gates are not collected
            return None
        gates = []
        for g, (spec, then) in enumerate(zip(outcome.ran.gates, options[1])):
            fired = [i for i, s in enumerate(steps) if s and s.fired >> g & 1]
            gates.append({"signal": spec.gate.signal.name.lower(), "then": then,
                          "fired_count": len(fired), "fired": fired,
                          "values": [steps[i].signals[g] for i in fired],
                          "held": [i for i, s in enumerate(steps) if s and s.on >> g & 1]})
        # the EAST decision at token i steers the forward pass that yields token i + 1
        east = [i + 1 for i, s in enumerate(steps[:-1]) if s and s.east >= 0]
        return {"gates": gates, "east_tokens": east}


class DynatempReport(Report):
    range: float
    exponent: float
    # each token's, a gate's temperature action included (empty for a particle-filter run,
    # whose steps' temperatures are not collected)
    temperatures: list[float | None]


class Dynatemp(Method):
    """Entropy-scaled temperature (llama.cpp's dynamic temperature, `steering.gates`)."""

    name = "dynatemp"
    section = DynatempReport

    def options(self, request) -> tuple[float, float] | None:
        dynatemp = request.steering.dynatemp if request.steering else None
        return (dynatemp.range, dynatemp.exponent) if dynatemp is not None else None

    def steer(self, options, steering: SamplingOptions) -> SamplingOptions:
        return replace(steering, dynatemp=options)

    def report(self, options, outcome: Outcome) -> dict:
        return {"range": options[0], "exponent": options[1],
                "temperatures": [s.temperature if s else None for s in outcome.gate_steps]}


# Report order; `methods` lists the listed ones alphabetically, as the metric label does.
METHODS: tuple[Method, ...] = (DiffAdapt(), Typical(), Dynatemp(), Gates(), East(), VReason(),
                               Particles(), HiddenStates())
