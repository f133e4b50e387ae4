"""A request's steering plan: which methods it uses with their options, what every choice runs
with inside the engine, and each choice's `steering` report (and that report's schema). It
loops over the registry and names no method."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, create_model

from steering.methods.base import Method, Outcome, ReportModel
from steering.methods.registry import METHODS


@dataclass(frozen=True)
class Plan:
    """The methods a request uses (registry order), each with its options."""

    used: dict[str, Any]  # method name → its options
    return_entropy: bool

    @classmethod
    def of(cls, request) -> Plan:
        used = {m.name: o for m in METHODS if (o := m.read(request)) is not None}
        return cls(used=used, return_entropy=bool(request.steering and
                                                  request.steering.return_entropy))

    @property
    def methods_used(self) -> tuple[Method, ...]:
        return tuple(m for m in METHODS if m.name in self.used)

    @property
    def methods(self) -> tuple[str, ...]:
        """The listed methods it uses, alphabetically (as the metric label has them)."""
        return tuple(sorted(m.name for m in self.methods_used if m.listed))

    @property
    def label(self) -> str:
        """Metric label: the methods joined by '+', or 'none'."""
        return "+".join(self.methods) or "none"

    @property
    def orchestrator(self) -> Method | None:
        """The method that answers the request itself, if any."""
        return next((m for m in self.methods_used if m.orchestrates), None)

    def check(self, request) -> None:
        """Each method's refusals of what it cannot combine with."""
        for m in self.methods_used:
            m.check(self.used[m.name], request, self)

    def sequences(self, requested: int) -> int:
        """Engine sequences the request holds, `requested` being its prompts × choices."""
        for m in self.methods_used:
            requested = m.sequences(self.used[m.name], requested)
        return requested

    def settings(self, engine, states: Mapping[str, Any]) -> dict[str, Any]:
        """What every choice runs with inside the engine, checked against it (registry
        order; only the methods that act in the engine)."""
        settings = {}
        for m in self.methods_used:
            value = m.settings(self.used[m.name])
            if value is not None:
                settings[m.name] = m.resolve(value, engine, states.get(m.name))
        return settings

    def report(self, outcome: Outcome) -> dict:
        """A finished choice's `steering` object."""
        report: dict = {"methods": list(self.methods)}
        for m in self.methods_used:
            section = m.report(self.used[m.name], outcome)
            if section is not None:
                report[m.name] = section
        report["entropy"] = _summary(outcome.entropy)
        report["varentropy"] = _summary(outcome.varentropy)
        if self.return_entropy:
            report["token_entropy"] = outcome.entropy
            report["token_varentropy"] = outcome.varentropy
        return report

    def observe(self, meters: Mapping[str, Any], metrics, outcome: Outcome) -> None:
        """A finished choice in each method's metrics."""
        labels = (metrics.model, self.label)
        for m in self.methods_used:
            m.observe(meters.get(m.name), metrics, labels, self.used[m.name], outcome)


def _summary(values: list[float | None]) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "max": None, "last": None}
    return {"mean": sum(known) / len(known), "max": max(known), "last": known[-1]}


UNMEASURED_REPORT = {"methods": [], "entropy": None, "varentropy": None}
"""A choice no steering reached (a beam of vLLM's beam search): nothing steered or measured."""


class EntropySummary(ReportModel):
    """Over a choice's tokens (nats); null when it produced none."""

    mean: float | None
    max: float | None
    last: float | None


_TOKEN_VALUES = list[float | None] | None  # one per generated token (null: not measured)

SteeringReport = create_model(
    "SteeringReport",
    __base__=ReportModel,
    __doc__="A choice's `steering` object: the methods it ran, each one's section, its "
    "entropy and varentropy. A stream's chunks carry `chunk_entropy` / `chunk_varentropy` "
    "for their tokens (with `return_entropy`), its last chunk the whole report.",
    methods=(list[str] | None, Field(None, description="the steering methods it ran")),
    **{m.name: (m.report_model | None, None) for m in METHODS if m.report_model is not None},
    entropy=(EntropySummary | None, Field(None, description="null: not measured (a beam of "
                                                             "`use_beam_search`)")),
    varentropy=(EntropySummary | None, Field(None, description="null: not measured")),
    token_entropy=(_TOKEN_VALUES, Field(None, description="with `return_entropy`")),
    token_varentropy=(_TOKEN_VALUES, Field(None, description="with `return_entropy`")),
    chunk_entropy=(_TOKEN_VALUES, Field(None, description="streamed, with `return_entropy`")),
    chunk_varentropy=(_TOKEN_VALUES, Field(None, description="streamed, with `return_entropy`")),
)
