"""Locally typical sampling's descriptor: `typical_p` or `steering.typical`, a stage of the
gated chain (`typical_p` in a gate's `then`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

from steering.methods.base import Method, ReportModel, StrictModel
from steering.methods.gates.core import Stage
from steering.methods.typical.adapter import NAME, TypicalProcessor
from steering.methods.typical.core import apply_typical

Mass = Annotated[float, Field(gt=0, le=1, description="typical mass τ in (0, 1]; 1 turns it off",
                               examples=[0.9])]


class TypicalOptions(StrictModel):
    """Locally typical sampling (Meister et al. 2022): keep mass `p` of the most typical tokens."""

    model_config = ConfigDict(title="Locally typical sampling")

    p: Mass


class TypicalReport(ReportModel):
    p: float


class Typical(Method):
    name = NAME
    report_model = TypicalReport
    processor = TypicalProcessor
    stage = Stage("typical_p", 1.0, apply_typical, Mass)

    def fields(self):
        return {"typical": (TypicalOptions | None, None)}

    def request_fields(self):
        return {"typical_p": (Annotated[float, Field(gt=0, le=1, strict=True, description=(
            "locally typical sampling mass τ in (0, 1]; 1 turns it off"))] | None, None)}

    def read(self, request) -> float | None:
        steering = request.steering.typical if request.steering else None
        if request.typical_p is not None and steering is not None:
            raise ValueError("set typical_p or steering.typical, not both")
        mass = request.typical_p if steering is None else steering.p
        return mass if mass is not None and mass < 1 else None  # τ = 1 keeps every token

    def settings(self, options: float) -> float:
        return options

    def encode(self, settings: float, params, slots, steering) -> None:
        params.extra_args[self.key] = settings

    def report(self, options: float, outcome) -> dict:
        return {"p": options}
