"""This project's request extensions (the `steering` object) and artifact uploads.

No vLLM import here, so the Python client can use these models. The generation requests built
on vLLM's are in `server.requests`. Every model forbids unknown fields, so a misspelt option is
a 400 naming it rather than a silently ignored setting, and is strict about JSON types (`true`
is not 1, `"5"` is not 5, `2.0` is not an integer; integers are fine for numbers).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16
MAX_STOP_SEQUENCES = 8
MAX_PROMPTS = 16
MAX_VECTORS_PER_REQUEST = 4
MAX_EAST_SCALE = 1000.0
MAX_VECTOR_VALUES = 65536
MAX_PARTICLES = 64
MAX_PARTICLE_STEPS = 256
MAX_GATES = 4  # steering.gates.MAX_GATES: the engine's per-row gate table is this wide
MAX_VREASON_STEPS = 64  # the schema's ceiling; `steer serve --vreason-max-steps` sets the limit


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TypicalOptions(StrictModel):
    """Locally typical sampling (Meister et al. 2022): keep mass `p` of the most typical tokens."""

    p: Annotated[float, Field(gt=0, le=1, description="typical mass τ in (0, 1]; 1 turns it off")]


class EastOptions(StrictModel):
    """EAST (Rahn et al. 2024): add `scale` × a stored vector to the residual stream."""

    vector: Annotated[str, Field(min_length=1, max_length=64, description="stored vector name")]
    scale: Annotated[float, Field(ge=-MAX_EAST_SCALE, le=MAX_EAST_SCALE)] = 1.0
    layers: Annotated[
        list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=8)
    ] | None = Field(default=None, description="decoder layers (default: the vector's own)")
    positions: Literal["generated", "all"] = Field(
        default="generated",
        description="'generated': every position that predicts a generated token (the last "
        "prompt token on); 'all': prompt positions too")


class StrategyOverride(StrictModel):
    """Changes to one difficulty class's strategy (unset fields keep the server's)."""

    prompt: Annotated[str, Field(min_length=1, max_length=4096, description=(
        "wraps the question: '{question}' marks where it goes"))] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    budget: Annotated[float, Field(gt=0, le=1, description=(
        "fraction of the request's max tokens"))] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    prefill: Annotated[str, Field(max_length=4096, description=(
        "the start of the assistant's answer, which the model continues"))] | None = None

    @model_validator(mode="after")
    def _one_placeholder(self):
        if self.prompt is not None and self.prompt.count("{question}") != 1:
            raise ValueError("a strategy prompt must contain '{question}' exactly once")
        return self


class DiffAdaptOptions(StrictModel):
    """DiffAdapt (arXiv 2510.19669): a probe on the prompt's last hidden state picks the
    easy / normal / hard strategy (prompt, temperature, share of max tokens)."""

    probe: Annotated[str, Field(min_length=1, max_length=64, description="stored probe name")]
    strategies: dict[Literal["easy", "normal", "hard"], StrategyOverride] | None = None
    difficulty: Literal["easy", "normal", "hard"] | None = Field(default=None, description=(
        "serve this class's strategy without the probe pass (a fixed-strategy baseline); the "
        "probe still names the recipe"))
    continuation: bool | None = Field(default=None, description=(
        "continue an answer its budget cut off after the authors' forced final-answer prefix "
        "(default: the paper recipe does, the variant does not)"))


class VReasonOptions(StrictModel):
    """V-Reason (arXiv 2510.17045): every `every` generated tokens, `steps` Adam steps on a
    value-cache offset of the last decoder layer, raising the entropy while its EMA is at its
    running peak and lowering it below. Defaults are ours; the paper does not publish them."""

    every: Annotated[int, Field(ge=1, le=4096, description="update every k generated tokens")] = 4
    steps: Annotated[int, Field(ge=1, le=MAX_VREASON_STEPS,
                                description="optimiser steps per update")] = 2
    lr: Annotated[float, Field(gt=0, le=1, description="Adam learning rate")] = 0.05
    ema: Annotated[float, Field(ge=0, lt=1, description="EMA coefficient of the entropy")] = 0.9
    positions: Literal["prompt", "context"] = Field(
        default="prompt", description="tune the prompt's value vectors, or the whole context's")


class ParticleOptions(StrictModel):
    """(Entropic) particle filtering over reasoning steps (Puri et al. 2025; ePF, arXiv
    2510.05825): `n` particles, each extended one step (up to `step_delimiter`) per iteration,
    weighted by a reward and resampled."""

    n: Annotated[int, Field(ge=1, le=MAX_PARTICLES)] = 4
    step_delimiter: Annotated[str, Field(min_length=1, max_length=32)] = "\n\n"
    max_steps: Annotated[int, Field(ge=1, le=MAX_PARTICLE_STEPS)] = 32
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                    Field(max_length=MAX_STOP_SEQUENCES)] = Field(
        default=[], description="a step containing one of these finishes its particle")
    reward: Literal["self_certainty", "prm", "http"] = "self_certainty"
    annealing: Literal["ess", "entropy", "base", "none"] = "ess"
    ess_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    early_phase: Annotated[float, Field(ge=0, le=1)] = 0.5
    lookahead: bool = False
    resampling: Literal["systematic", "multinomial"] = "systematic"
    select: Literal["argmax", "sample"] = "argmax"
    return_particles: bool = False


class GateAction(StrictModel):
    """What a gate does while it holds. Sampling fields act on the token whose distribution
    fired the gate; `east` from the next forward pass (the token after it)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    typical_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    east: EastOptions | None = None

    @model_validator(mode="after")
    def _some_action(self):
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a gate's 'then' needs at least one action")
        if self.east is not None and self.east.positions != "generated":
            raise ValueError("a gate's EAST action steers generated positions only")
        return self


class GateOptions(StrictModel):
    """A closed-loop gate: fires at a generated token when its signal, measured on the model's
    own next-token distribution (T = 1, full vocabulary, before truncation), is above `above`
    and/or below `below`; its action then holds for `hold` tokens."""

    signal: Literal["entropy", "varentropy", "entropy_ema"]
    ema: Annotated[float, Field(ge=0, lt=1, description=(
        "EMA coefficient c (entropy_ema only; default 0.9): ema_i = c·ema_{i-1} + (1-c)·H_i"
    ))] | None = None
    above: Annotated[float, Field(allow_inf_nan=False)] | None = None
    below: Annotated[float, Field(allow_inf_nan=False)] | None = None
    hold: Annotated[int, Field(ge=1, le=4096, description=(
        "tokens the action stays on after the gate last fired"))] = 1
    then: GateAction

    @model_validator(mode="after")
    def _condition(self):
        if self.above is None and self.below is None:
            raise ValueError("a gate needs 'above', 'below' or both")
        if self.above is not None and self.below is not None and self.above >= self.below:
            raise ValueError("with both, 'above' must be less than 'below' (a band)")
        if self.ema is not None and self.signal != "entropy_ema":
            raise ValueError("'ema' is only for signal 'entropy_ema'")
        return self


class DynatempOptions(StrictModel):
    """Entropy-scaled temperature (llama.cpp's dynamic temperature): each token's temperature
    is T_min + (T_max - T_min)·(H / log n)^exponent with T_min = max(0, T - range),
    T_max = T + range, H the entropy at T = 1 and n the tokens with a finite logit."""

    range: Annotated[float, Field(ge=0, le=2)]
    exponent: Annotated[float, Field(ge=0, le=16)] = 1.0


class SteeringOptions(StrictModel):
    """Per-request steering methods and reporting."""

    typical: TypicalOptions | None = None
    east: EastOptions | Annotated[
        list[EastOptions], Field(min_length=1, max_length=MAX_VECTORS_PER_REQUEST)
    ] | None = Field(default=None, description="one vector or a list whose effects add up")
    return_entropy: bool = Field(
        default=False, description="add per-token entropy and varentropy lists to the response"
    )
    gates: Annotated[list[GateOptions], Field(min_length=1, max_length=MAX_GATES)] | None = \
        Field(default=None, description="evaluated at every generated token, independently; "
              "for each action field the first gate (in this order) that holds wins")
    dynatemp: DynatempOptions | None = None
    diffadapt: DiffAdaptOptions | None = None
    particles: ParticleOptions | None = None
    vreason: VReasonOptions | None = None
    return_hidden_states: Annotated[
        list[Annotated[int, Field(ge=0)] | Literal["final"]], Field(min_length=1, max_length=8)
    ] | None = Field(default=None, description="hidden states at the last prompt token: a "
                     "decoder layer's residual stream (HF's hidden_states[layer + 1] below the "
                     "last layer), or 'final': after the final norm (HF's last_hidden_state)")


class VectorUpload(StrictModel):
    """A steering vector uploaded over HTTP."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    values: Annotated[list[float], Field(min_length=1, max_length=MAX_VECTOR_VALUES)]
    layer: Annotated[int, Field(ge=0)]
    model: str | None = Field(default=None, description="must be the served model if given")
    method: Annotated[str, Field(max_length=64)] = "uploaded"
    source: Annotated[str, Field(max_length=1024)] = ""
    description: Annotated[str, Field(max_length=4096)] = ""


class ProbeThresholds(StrictModel):
    alpha: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
    beta: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    gamma: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ProbeUpload(StrictModel):
    """A DiffAdapt difficulty probe uploaded over HTTP (what `steer probe train` makes)."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    weights: dict[str, list[float] | list[list[float]]] = Field(
        description="tensors by name: feature_mean, feature_scale, net.0.weight, net.0.bias "
        "(and net.2.* for the MLP)")
    thresholds: ProbeThresholds
    recipe: Literal["paper", "variant"] = Field(
        default="variant", description="how it was made and is served: the authors' DiffAdapt "
        "or this project's variant (see docs/diffadapt.md)")
    metrics: dict[str, float | int] = {}
    model: str | None = Field(default=None, description="must be the served model if given")
    source: Annotated[str, Field(max_length=1024)] = ""
    description: Annotated[str, Field(max_length=4096)] = ""
