"""The descriptors of the entropy gates and of dynamic temperature: their request models (a
gate's actions include every method's truncation stage), their shared encoding, reports and
metrics."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, create_model, model_validator

from steering.methods.base import Method, Needs, ReportModel, Sharing, StrictModel
from steering.methods.east.descriptor import EastOptions, EastSpec
from steering.methods.gates.adapter import NAME, GateProcessor, GatesPart, GateStep
from steering.methods.gates.core import MAX_GATES, Action, Gate, Signal, Stage
from steering.runtime.keys import method_key


class _GateActionRules(StrictModel):
    @model_validator(mode="after")
    def _some_action(self):
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a gate's 'then' needs at least one action")
        if self.east is not None and self.east.positions != "generated":
            raise ValueError("a gate's EAST action steers generated positions only")
        return self


class _GateRules(StrictModel):
    @model_validator(mode="after")
    def _condition(self):
        if self.above is None and self.below is None:
            raise ValueError("a gate needs 'above', 'below' or both")
        if self.above is not None and self.below is not None and self.above >= self.below:
            raise ValueError("with both, 'above' must be less than 'below' (a band)")
        if self.ema is not None and self.signal != "entropy_ema":
            raise ValueError("'ema' is only for signal 'entropy_ema'")
        return self


@functools.cache
def gate_models(stages: tuple[Stage, ...]) -> tuple[type[StrictModel], type[StrictModel]]:
    """The request models of a gate and of its action, with one action field per stage."""
    action = create_model(
        "GateAction", __base__=_GateActionRules,
        __doc__="What a gate does while it holds. Sampling fields act on the token whose "
        "distribution fired the gate; `east` from the next forward pass (the token after it).",
        temperature=(Annotated[float, Field(ge=0, le=2)] | None, None),
        **{stage.name: (stage.schema | None, None) for stage in stages},
        top_k=(Annotated[int, Field(ge=1, le=2**31 - 1)] | None, None),
        min_p=(Annotated[float, Field(ge=0, le=1)] | None, None),
        east=(EastOptions | None, None))
    gate = create_model(
        "GateOptions", __base__=_GateRules,
        __doc__="A closed-loop gate: fires at a generated token when its signal, measured on "
        "the model's own next-token distribution (T = 1, full vocabulary, before truncation), "
        "is above `above` and/or below `below`; its action then holds for `hold` tokens.",
        signal=(Literal["entropy", "varentropy", "entropy_ema"], ...),
        ema=(Annotated[float, Field(ge=0, lt=1, description=(
            "EMA coefficient c (entropy_ema only; default 0.9): ema_i = c·ema_{i-1} + "
            "(1-c)·H_i"))] | None, None),
        above=(Annotated[float, Field(allow_inf_nan=False)] | None, None),
        below=(Annotated[float, Field(allow_inf_nan=False)] | None, None),
        hold=(Annotated[int, Field(ge=1, le=4096, description=(
            "tokens the action stays on after the gate last fired"))], 1),
        then=(action, ...))
    return gate, action


def _stages() -> tuple[Stage, ...]:
    from steering.methods.registry import STAGES  # the registry lists this module

    return STAGES


@dataclass(frozen=True)
class GateSpec:
    """One gate of a choice: the engine-free gate, and the vector its EAST action adds
    (`gate.then` holds `Action.EAST` exactly when `east` is set)."""

    gate: Gate
    east: EastSpec | None = None


class GateReport(ReportModel):
    """One gate over a choice's generated tokens (indices into them)."""

    signal: str
    then: dict[str, Any]  # its action, as the request gave it
    fired_count: int
    fired: list[int]  # tokens whose distribution met the condition
    values: list[float]  # the signal at each of those tokens
    held: list[int]  # tokens its action was on for (its sampling actions acted on these)


class GatesReport(ReportModel):
    gates: list[GateReport]
    east_tokens: list[int]  # tokens whose forward pass a gate's EAST vector steered


def _steps(outcome) -> list[GateStep | None]:
    return [GateStep.decode(v) for v in outcome.values.get(NAME, ())]


def encode_gated(params, steering, slots: list[int]) -> None:
    """A gated choice's encoding: its own sampling and its stages' values (which the gate
    processor applies in its chain: vLLM sees T = 1 with min-p and top-k off, so that the
    processor sees the T = 1 distribution after penalties), its gates and their EAST uses.
    A greedy choice (temperature 0) becomes a sampled row whose chain keeps only the argmax,
    unless a gate's temperature holds; top-p stays vLLM's."""
    from steering.methods.registry import METHODS

    specs = steering.get(NAME, ())
    spread, exponent = steering.get(Dynatemp.name) or (None, 1.0)
    stages = {m.stage.name: steering[m.name] for m in METHODS
              if m.stage is not None and m.name in steering}
    slot_of = iter(slots)
    params.extra_args[method_key(NAME)] = {
        "sampling": [params.temperature, params.min_p, max(params.top_k, 0), spread, exponent],
        "stages": stages,
        "gates": [[int(g.signal), g.above, g.below, g.hold, g.ema,
                   [[str(action), value] for action, value in g.then]]
                  for g in (spec.gate for spec in specs)],
        "east": [[] if spec.east is None else
                 [[slot, spec.east.scale, layer] for layer in spec.east.layers]
                 for spec, slot in ((s, next(slot_of) if s.east else None) for s in specs)]}
    params.temperature, params.min_p, params.top_k = 1.0, 0.0, 0


class Gates(Method):
    name = NAME
    report_model = GatesReport
    processor = GateProcessor
    worker_part = GatesPart
    takes_over_sampling = True

    def fields(self):
        gate, _ = gate_models(_stages())
        return {"gates": (Annotated[list[gate], Field(min_length=1, max_length=MAX_GATES)] | None,
                          Field(default=None, description="evaluated at every generated token, "
                                "independently; for each action field the first gate (in this "
                                "order) that holds wins"))}

    def read(self, request) -> tuple[tuple[GateSpec, ...], list[dict]] | None:
        gates = request.steering.gates if request.steering else None
        if not gates:
            return None
        specs = []
        for g in gates:
            then = g.then
            actions = [(name, float(value)) for name, value in then
                       if name != Action.EAST and value is not None]
            east = None
            if then.east is not None:
                actions.append((Action.EAST, 1.0))
                east = EastSpec.of(then.east)
            specs.append(GateSpec(Gate(Signal[g.signal.upper()], g.above, g.below, g.hold,
                                       0.9 if g.ema is None else g.ema, tuple(actions)), east))
        return tuple(specs), [g.then.model_dump(exclude_none=True) for g in gates]

    def settings(self, options) -> tuple[GateSpec, ...]:
        return options[0]

    def resolve(self, settings, engine, state):
        return tuple(replace(g, east=g.east.resolved(engine, f"{self.param}.{i}.then.east"))
                     if g.east is not None else g for i, g in enumerate(settings))

    def needs(self, settings) -> Needs:
        vectors = tuple(g.east.vector for g in settings if g.east is not None)
        # a gate's vector steers according to the choice's own entropy: its cache is its own
        return Needs(vectors=vectors, sharing=Sharing.PRIVATE if vectors else Sharing.SHARED)

    def encode(self, settings, params, slots, steering) -> None:
        encode_gated(params, steering, slots)

    def streams(self, settings, params) -> tuple[str, ...]:
        return (NAME,)

    def report(self, options, outcome) -> dict | None:
        steps = _steps(outcome)
        if not steps:  # a particle-filter run: its steps' gates are not collected
            return None
        gates = []
        for g, (spec, then) in enumerate(zip(outcome.settings[self.name], options[1])):
            fired = [i for i, s in enumerate(steps) if s and s.fired >> g & 1]
            gates.append({"signal": spec.gate.signal.name.lower(), "then": then,
                          "fired_count": len(fired), "fired": fired,
                          "values": [steps[i].signals[g] for i in fired],
                          "held": [i for i, s in enumerate(steps) if s and s.on >> g & 1]})
        return {"gates": gates, "east_tokens": east_tokens(steps)}

    def metrics(self, registry):
        from prometheus_client import Counter

        return Counter(
            "steer_gate_fired_tokens", "Generated tokens at which an entropy gate fired, by "
            "the action it switches on (a gate with two actions counts for both)",
            ("model", "action"), registry=registry)

    def observe(self, meters, metrics, labels, options, outcome) -> None:
        steps = _steps(outcome)
        specs = outcome.settings[self.name]
        for g, spec in enumerate(specs):
            fired = sum(1 for s in steps if s and s.fired >> g & 1)
            if fired:
                for action, _ in spec.gate.then:
                    meters.labels(labels[0], str(action)).inc(fired)
        if any(spec.east for spec in specs) and "east" not in outcome.settings:
            metrics.steered_tokens.labels(*labels).inc(len(east_tokens(steps)))


def east_tokens(steps: list[GateStep | None]) -> list[int]:
    """The tokens a gate's EAST vector steered: the decision at token i steers the forward
    pass that yields token i + 1."""
    return [i + 1 for i, s in enumerate(steps[:-1]) if s and s.east >= 0]


class DynatempOptions(StrictModel):
    """Entropy-scaled temperature (llama.cpp's dynamic temperature): each token's temperature
    is T_min + (T_max - T_min)·(H / log n)^exponent with T_min = max(0, T - range),
    T_max = T + range, H the entropy at T = 1 and n the tokens with a finite logit."""

    model_config = ConfigDict(title="Dynamic temperature")

    range: Annotated[float, Field(ge=0, le=2, examples=[0.5])]
    exponent: Annotated[float, Field(ge=0, le=16)] = 1.0


class DynatempReport(ReportModel):
    range: float
    exponent: float
    # each token's, a gate's temperature action included (empty for a particle-filter run,
    # whose steps' temperatures are not collected)
    temperatures: list[float | None]


class Dynatemp(Method):
    """Entropy-scaled temperature, sampled by the gate processor (`steering.dynatemp`)."""

    name = "dynatemp"
    report_model = DynatempReport
    takes_over_sampling = True

    def fields(self):
        return {"dynatemp": (DynatempOptions | None, None)}

    def read(self, request) -> tuple[float, float] | None:
        dynatemp = request.steering.dynatemp if request.steering else None
        return (dynatemp.range, dynatemp.exponent) if dynatemp is not None else None

    def settings(self, options) -> tuple[float, float]:
        return options

    def encode(self, settings, params, slots, steering) -> None:
        if NAME not in steering:  # with gates, theirs carries it
            encode_gated(params, steering, slots)

    def streams(self, settings, params) -> tuple[str, ...]:
        return (NAME,)

    def report(self, options, outcome) -> dict:
        return {"range": options[0], "exponent": options[1],
                "temperatures": [s.temperature if s else None for s in _steps(outcome)]}

