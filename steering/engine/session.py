"""A steering session: one HTTP request's steering, shared by every engine request vLLM's
serving layer makes for it, and what each of its choices measured.

vLLM's serving layer turns the request into engine requests itself; the request model tags
each prompt's `SamplingParams` through `SteeringSession.tag` (the session's id and the
prompt's ordinal, keys only the API process reads), and `SteeringClient.generate` finds the
session from the tag. Choice `ordinal * n + j` is prompt `ordinal`'s j-th sample, as vLLM
numbers choices.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from steering.framing import Continuation
from steering.methods.base import Outcome, Sampling
from steering.runtime.telemetry import EntropyTrace

SESSION_KEY = "steer_session"  # str: the HTTP request's steering session
ORDINAL_KEY = "steer_ordinal"  # int: which of the request's prompts these parameters are for


@dataclass
class ChoiceRecord:
    """What the engine measured for one choice, filled in as it runs."""

    steering: Mapping[str, Any]  # each in-engine method's settings
    trace: EntropyTrace = field(default_factory=EntropyTrace)
    produced: int = 0  # tokens delivered to vLLM's serving layer so far
    collected: dict[str, Any] = field(default_factory=dict)  # by method, when it ended
    first_token_at: float | None = None  # wall-clock time, for the TTFT metric
    continued: dict | None = None  # how a continuation went on, when one ran

    @property
    def steered(self) -> int:
        """Tokens the choice's own steering ran on (a continuation runs unsteered)."""
        if self.continued is None:
            return self.produced
        return self.produced - self.continued["prefix_tokens"] - self.continued["tokens"]

    def window(self, start: int):
        """Entropy and varentropy of the tokens delivered from `start` on."""
        return self.trace.window(start, self.produced)

    def outcome(self, prompt: Mapping[str, Any]) -> Outcome:
        """For the report and the metrics; `prompt`: its prompt's outcomes by method."""
        entropy, varentropy = self.window(0)
        return Outcome(settings=self.steering, tokens=self.produced, steered_tokens=self.steered,
                       entropy=entropy, varentropy=varentropy,
                       values={name: self.trace.method_values(name, self.produced)
                               for name in self.trace.values},
                       collected=self.collected, prompt=prompt, continued=self.continued)


@dataclass
class PromptOverride:
    """Per-prompt changes to the sampling parameters (e.g. a strategy a method picked)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    continuation: Continuation | None = None  # for a choice that `max_tokens` cuts off

    def applied(self, sampling: Sampling) -> Sampling:
        """An orchestration's sampling with these changes (it runs no continuation)."""
        changes = {"temperature": self.temperature, "top_p": self.top_p,
                   "max_tokens": self.max_tokens}
        return replace(sampling, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class SteeringSession:
    """One HTTP request's steering (see the module docstring)."""

    id: str
    steering: Mapping[str, Any]  # each in-engine method's settings, for every choice
    stream_entropy: bool  # every streamed delta waits for its tokens' entropy
    overrides: dict[int, PromptOverride] = field(default_factory=dict)
    prompt_outcomes: defaultdict[int, dict[str, Any]] = field(
        default_factory=lambda: defaultdict(dict))
    choices: dict[int, ChoiceRecord] = field(default_factory=dict)
    arrival: float = field(default_factory=time.time)
    tagged: int = 0  # prompts tagged so far

    def tag(self, params) -> None:
        """Route the next prompt's engine request through this session (vLLM's serving layer
        converts prompts to `SamplingParams` once each, in order)."""
        params.extra_args = {**(params.extra_args or {}), SESSION_KEY: self.id,
                             ORDINAL_KEY: self.tagged}
        self.tagged += 1

    def override(self, ordinal: int, **changes) -> None:
        """Prompt `ordinal` samples with these changes (`PromptOverride` fields)."""
        self.overrides[ordinal] = PromptOverride(**changes)

    def record(self, index: int) -> ChoiceRecord | None:
        return self.choices.get(index)

    def outcome(self, index: int, n: int) -> Outcome:
        """Choice `index`'s outcome (`n` choices per prompt)."""
        return self.choices[index].outcome(self.prompt_outcomes.get(index // n, {}))
