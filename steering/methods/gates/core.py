"""Closed-loop entropy gates and entropy-scaled temperature, engine-free, batched over rows.

A gate watches one signal of each generated token's next-token distribution, measured at
temperature 1 over the full vocabulary before any truncation: the entropy H, the varentropy V,
or the exponential moving average of H over the request's generated tokens
(ema_0 = H_0, ema_i = c·ema_{i-1} + (1 − c)·H_i). It fires at token i when its condition holds
(signal > above, signal < below, or both: a band) and its action then holds for `hold` tokens:
left_i = hold if it fired at i, else max(left_{i-1} − 1, 0); the action is on at token i iff
left_i > 0. Sampling actions (temperature, min_p, top_k, and each truncation stage a method
contributes, e.g. typical_p) act on token i itself; an activation action (EAST) acts from the
next forward pass, i.e. on token i + 1.

Precedence: for each action field the first gate in the request's list that is on and sets the
field wins; for the temperature, a gate beats dynamic temperature, which beats the request's.

Dynamic temperature (llama.cpp's `temp_ext`): with T the request's temperature and δ the range,
T_i = T_min + (T_max − T_min)·(H_i / log n)^exponent, T_min = max(0, T − δ), T_max = T + δ, where
n is the number of tokens with a finite logit; with n ≤ 1 the request's T is kept.

The sampling chain applied to a gated row's logits is vLLM's own order: temperature (≤ 1e-5 is
greedy: only the argmax survives), min-p, the stages (methods' truncation steps, in the
registry's order: the order their own processors run in an ungated row), top-k; vLLM's sampler
then applies top-p and draws. Each step is the formula vLLM (or the stage's method) uses, so a
gated row whose gates never fire samples exactly the tokens the same request samples ungated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

import torch

from steering.entropy import entropy_varentropy

MAX_GATES = 4
GREEDY_TEMPERATURE = 1e-5  # vLLM's: a temperature below it samples greedily


class Signal(IntEnum):
    ENTROPY = 0
    VARENTROPY = 1
    ENTROPY_EMA = 2


class Action(StrEnum):
    """The actions every gate has; the stages' actions are named by their `Stage.name`."""

    TEMPERATURE = "temperature"
    MIN_P = "min_p"
    TOP_K = "top_k"
    EAST = "east"


@dataclass(frozen=True)
class Stage:
    """A truncation step a method contributes to the sampling chain: its name (the gate action
    field and the chain's setting), the value that leaves the logits unchanged, the batched
    mask `apply(logits, values)` (in place, one value per row) and the action's schema."""

    name: str
    off: float
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    schema: Any = float


@dataclass(frozen=True)
class Gate:
    """One gate: `then` maps each action it sets (an `Action` or a stage's name) to its value
    (EAST: 1.0, the vector and scale are the engine adapter's business)."""

    signal: Signal
    above: float | None = None
    below: float | None = None
    hold: int = 1
    ema: float = 0.9
    then: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """A request's own sampling settings (top-p stays with vLLM's sampler); `stages`: the
    stages it sets, by name (the others are off)."""

    temperature: float = 1.0
    min_p: float = 0.0
    top_k: int = 0  # 0: off
    dynatemp_range: float | None = None  # None: off
    dynatemp_exponent: float = 1.0
    stages: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GatedRow:
    """Everything one gated (or dynamic-temperature) request brings to the gate table."""

    sampling: Sampling
    gates: tuple[Gate, ...] = ()


_BASE = ("temperature", "min_p", "top_k", "dynatemp_range", "dynatemp_exponent")


class GateTable:
    """Parameters and state of up to `capacity` rows, as (capacity, MAX_GATES) tensors, so that
    a step is a few tensor ops over the step's gated rows whatever their number. `stages`: the
    chain's truncation stages, in order."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu",
                 stages: tuple[Stage, ...] = ()) -> None:
        self.stages = stages
        self.action_names = (*Action, *(s.name for s in stages))
        shape, f32 = (capacity, MAX_GATES), torch.float32
        self.present = torch.zeros(shape, dtype=torch.bool, device=device)
        self.signal = torch.zeros(shape, dtype=torch.long, device=device)
        self.above = torch.full(shape, -torch.inf, dtype=f32, device=device)
        self.below = torch.full(shape, torch.inf, dtype=f32, device=device)
        self.hold = torch.ones(shape, dtype=torch.long, device=device)
        self.ema_coefficient = torch.zeros(shape, dtype=f32, device=device)
        self.actions = torch.full((capacity, MAX_GATES, len(self.action_names)), torch.nan,
                                  dtype=f32, device=device)
        # the request's own settings: _BASE, then each stage's value
        self.base = torch.zeros((capacity, len(_BASE) + len(stages)), dtype=f32, device=device)
        # state after the last evaluated token, and before it (a re-evaluated position, such as
        # a chunked prefill's discarded sample, starts again from the latter)
        self.ema = torch.zeros(shape, dtype=f32, device=device)
        self.left = torch.zeros(shape, dtype=torch.long, device=device)
        self.ema_before = torch.zeros(shape, dtype=f32, device=device)
        self.left_before = torch.zeros(shape, dtype=torch.long, device=device)
        self.position = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self._tensors = [self.present, self.signal, self.above, self.below, self.hold,
                         self.ema_coefficient, self.actions, self.base, self.ema, self.left,
                         self.ema_before, self.left_before, self.position]

    def _column(self, action: str) -> int:
        return self.action_names.index(action)

    def set_row(self, index: int, row: GatedRow) -> None:
        """Row `index` starts `row` (fresh state)."""
        self.present[index] = False
        self.above[index], self.below[index] = -torch.inf, torch.inf
        self.actions[index] = torch.nan
        for g, gate in enumerate(row.gates):
            self.present[index, g] = True
            self.signal[index, g] = int(gate.signal)
            if gate.above is not None:
                self.above[index, g] = gate.above
            if gate.below is not None:
                self.below[index, g] = gate.below
            self.hold[index, g] = gate.hold
            self.ema_coefficient[index, g] = gate.ema
            for action, value in gate.then:
                self.actions[index, g, self._column(action)] = value
        s = row.sampling
        self.base[index] = torch.tensor([
            s.temperature, s.min_p, s.top_k,
            s.dynatemp_range if s.dynatemp_range is not None else torch.nan, s.dynatemp_exponent,
            *(s.stages.get(stage.name, stage.off) for stage in self.stages)])
        self.ema[index] = self.ema_before[index] = 0
        self.left[index] = self.left_before[index] = 0
        self.position[index] = -1

    def move(self, a: int, b: int, swap: bool) -> None:
        """vLLM's batch move: row a's request goes to row b (and b's to a when swapping)."""
        for t in self._tensors:
            if swap:
                t[[a, b]] = t[[b, a]]
            else:
                t[b] = t[a]

    def step(self, rows: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor
             ) -> StepDecision:
        """Evaluates the gates of `rows` (batch indices) on their T = 1 `logits` (one row each)
        for the tokens at `positions` (generated-token indices), updates the state and returns
        what each row samples with."""
        entropy, varentropy = entropy_varentropy(logits)
        advanced = (positions > self.position[rows]).unsqueeze(1)
        ema = torch.where(advanced, self.ema[rows], self.ema_before[rows])
        left = torch.where(advanced, self.left[rows], self.left_before[rows])
        self.ema_before[rows], self.left_before[rows] = ema, left
        c = self.ema_coefficient[rows]
        h = entropy.unsqueeze(1)
        first = (positions == 0).unsqueeze(1) | (self.position[rows] < 0).unsqueeze(1)
        ema = torch.where(first, h.expand_as(c), c * ema + (1 - c) * h)
        signals = torch.stack((h.expand_as(c), varentropy.unsqueeze(1).expand_as(c), ema), -1)
        value = signals.gather(-1, self.signal[rows].unsqueeze(-1)).squeeze(-1)
        fired = self.present[rows] & (value > self.above[rows]) & (value < self.below[rows])
        left = torch.where(fired, self.hold[rows], (left - 1).clamp_(min=0))
        self.ema[rows], self.left[rows], self.position[rows] = ema, left, positions
        on = left > 0
        base = self.base[rows]
        temperature = dynamic_temperature(logits, entropy, base[:, 0], base[:, 3], base[:, 4])
        chosen = _first_setting(self.actions[rows], on)
        temperature_action = chosen[:, self._column(Action.TEMPERATURE)]
        return StepDecision(
            entropy=entropy, varentropy=varentropy, signals=value, fired=fired, on=on,
            temperature=torch.where(temperature_action.isnan(), temperature,
                                    temperature_action),
            min_p=_or(chosen[:, self._column(Action.MIN_P)], base[:, 1]),
            top_k=_or(chosen[:, self._column(Action.TOP_K)], base[:, 2]).long(),
            stages={stage.name: _or(chosen[:, self._column(stage.name)], base[:, len(_BASE) + i])
                    for i, stage in enumerate(self.stages)},
            east_gate=_first_on(
                self.actions[rows][..., self._column(Action.EAST)].isnan().logical_not() & on),
        )


@dataclass
class StepDecision:
    """One step's outcome for the evaluated rows (one entry per row)."""

    entropy: torch.Tensor
    varentropy: torch.Tensor
    signals: torch.Tensor  # (rows, MAX_GATES): each gate's signal value at this token
    fired: torch.Tensor  # (rows, MAX_GATES) bool: the gate's condition held at this token
    on: torch.Tensor  # (rows, MAX_GATES) bool: the gate's action holds at this token
    temperature: torch.Tensor
    min_p: torch.Tensor
    top_k: torch.Tensor
    stages: dict[str, torch.Tensor]  # each stage's value
    east_gate: torch.Tensor  # the gate whose EAST action steers the next forward pass; -1: none


def _first_on(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first True in the last dimension, -1 where none is."""
    first = mask.to(torch.int8).argmax(-1)
    return torch.where(mask.any(-1), first, -1)


def _first_setting(actions: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """(rows, actions): each action field's value from the first gate that is on and sets it
    (NaN where none does)."""
    setting = on.unsqueeze(-1) & ~actions.isnan()  # (rows, gates, actions)
    first = _first_on(setting.transpose(1, 2))  # (rows, actions)
    picked = actions.gather(1, first.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(first >= 0, picked, torch.nan)


def _or(value: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    return torch.where(value.isnan(), fallback, value)


def dynamic_temperature(logits: torch.Tensor, entropy: torch.Tensor, temperature: torch.Tensor,
                        spread: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """llama.cpp's entropy-scaled temperature per row (`spread` NaN: the row's own T).

    logits: (rows, vocab) at T = 1; entropy: their entropy (nats)."""
    finite = torch.isfinite(logits).sum(-1)
    low = (temperature - spread).clamp(min=0)
    high = temperature + spread
    normalised = entropy / finite.clamp(min=2).to(entropy.dtype).log()
    dynamic = low + (high - low) * normalised.clamp(min=0).pow(exponent)
    return torch.where(spread.isnan() | (finite <= 1), temperature, dynamic)


def sample_chain(logits: torch.Tensor, decision: StepDecision,
                 stages: tuple[Stage, ...] = ()) -> torch.Tensor:
    """The gated rows' logits as vLLM's sampler would leave them before top-p, in place:
    temperature (greedy rows keep only their argmax), min-p, each of `stages`, top-k."""
    temperature = decision.temperature.to(logits.dtype)
    greedy = temperature < GREEDY_TEMPERATURE
    logits.div_(torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(1))
    if greedy.any():
        argmax = logits.argmax(-1, keepdim=True)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, argmax, True)
        logits.masked_fill_(greedy.unsqueeze(1) & ~keep, -torch.inf)
    if (decision.min_p > 0).any():
        probabilities = logits.softmax(-1)
        threshold = probabilities.amax(-1, keepdim=True) * decision.min_p.unsqueeze(1)
        logits.masked_fill_(probabilities < threshold, -torch.inf)
    for stage in stages:
        values = decision.stages[stage.name]
        if (values != stage.off).any():
            stage.apply(logits, values)
    k = decision.top_k
    vocab = logits.shape[-1]
    if ((k > 0) & (k < vocab)).any():
        k = torch.where((k > 0) & (k < vocab), k, vocab)
        kth = logits.topk(int(k.max()), -1).values.gather(1, (k - 1).unsqueeze(1))
        logits.masked_fill_(logits < kth, -torch.inf)
    return logits
