"""From a validated request to its steering: the plan (the methods it uses, `server.methods`),
the engine options the plan becomes, and the per-choice `steering` report (and its schema, in
the answers' response models). Shared by both generation routes and the particle filter."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import Field, create_model
from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
from vllm.entrypoints.openai.completion import protocol as completion_protocol

from server.engine import SamplingOptions
from server.methods import METHODS, Outcome, Report
from server.requests import GenerationRequest


@dataclass(frozen=True)
class Plan:
    """Which steering methods a request uses (`server.methods`), with their options."""

    used: dict[str, Any]  # method name → its options
    return_entropy: bool

    @classmethod
    def of(cls, request: GenerationRequest) -> Plan:
        used = {m.name: o for m in METHODS if (o := m.options(request)) is not None}
        return cls(used=used, return_entropy=request.return_entropy)

    def get(self, name: str):
        """A method's options, or None when the request does not use it."""
        return self.used.get(name)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(m.name for m in METHODS if m.listed and m.name in self.used))

    @property
    def label(self) -> str:
        """Metric label: the methods joined by '+', or 'none'."""
        return "+".join(self.methods) or "none"

    def engine_steering(self) -> SamplingOptions:
        """The in-engine part of the plan, as every choice of the request runs it."""
        steering = SamplingOptions(max_tokens=None)
        for method in METHODS:
            if method.name in self.used:
                steering = method.steer(self.used[method.name], steering)
        return steering

    def not_with_particles(self) -> list[str]:
        return [f"steering.{m.name}" if m.name != "hidden_states"
                else "steering.return_hidden_states"
                for m in METHODS if m.name in self.used and not m.with_particles]


def _or(value, default):
    return default if value is None else value


def sampling_options(request: GenerationRequest, plan: Plan, max_tokens: int | None
                     ) -> SamplingOptions:
    """The engine options of a request the server orchestrates itself (the particle filter),
    with OpenAI's defaults for unset fields."""
    return replace(
        plan.engine_steering(),
        max_tokens=max_tokens,
        temperature=_or(request.temperature, 1.0),
        top_p=_or(request.top_p, 1.0),
        top_k=request.top_k if request.top_k not in (None, -1) else None,
        min_p=_or(request.min_p, 0.0),
        presence_penalty=_or(request.presence_penalty, 0.0),
        frequency_penalty=_or(request.frequency_penalty, 0.0),
        repetition_penalty=_or(request.repetition_penalty, 1.0),
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )


def _summary(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "max": None, "last": None}
    return {"mean": sum(known) / len(known), "max": max(known), "last": known[-1]}


def steering_report(plan: Plan, outcome: Outcome, entropy: list[float | None],
                    varentropy: list[float | None]) -> dict:
    """The per-choice `steering` object of a finished choice."""
    report: dict = {"methods": list(plan.methods)}
    for method in METHODS:
        if method.name in plan.used:
            section = method.report(plan.used[method.name], outcome)
            if section is not None:
                report[method.name] = section
    report["entropy"] = _summary(entropy)
    report["varentropy"] = _summary(varentropy)
    if plan.return_entropy:
        report["token_entropy"] = entropy
        report["token_varentropy"] = varentropy
    return report


class EntropySummary(Report):
    """Over a choice's tokens (nats); null when it produced none."""

    mean: float | None
    max: float | None
    last: float | None


_TOKEN_VALUES = list[float | None] | None  # one per generated token (null: not measured)

SteeringReport = create_model(
    "SteeringReport",
    __base__=Report,
    __doc__="A choice's `steering` object: the methods it ran, each one's section, its "
    "entropy and varentropy. A stream's chunks carry `chunk_entropy` / `chunk_varentropy` "
    "for their tokens (with `return_entropy`), its last chunk the whole report.",
    methods=(list[str] | None, Field(None, description="the steering methods it ran")),
    **{m.name: (m.section | None, None) for m in METHODS if m.section is not None},
    entropy=(EntropySummary | None, Field(None, description="null: not measured (a beam of "
                                                             "`use_beam_search`)")),
    varentropy=(EntropySummary | None, Field(None, description="null: not measured")),
    token_entropy=(_TOKEN_VALUES, Field(None, description="with `return_entropy`")),
    token_varentropy=(_TOKEN_VALUES, Field(None, description="with `return_entropy`")),
    chunk_entropy=(_TOKEN_VALUES, Field(None, description="streamed, with `return_entropy`")),
    chunk_varentropy=(_TOKEN_VALUES, Field(None, description="streamed, with `return_entropy`")),
)


class ChatCompletionResponseChoice(chat_protocol.ChatCompletionResponseChoice):
    steering: SteeringReport


class ChatCompletionResponse(chat_protocol.ChatCompletionResponse):
    """vLLM's answer, each choice with its `steering` report."""

    choices: list[ChatCompletionResponseChoice]


class CompletionResponseChoice(completion_protocol.CompletionResponseChoice):
    steering: SteeringReport


class CompletionResponse(completion_protocol.CompletionResponse):
    """vLLM's answer, each choice with its `steering` report."""

    choices: list[CompletionResponseChoice]
