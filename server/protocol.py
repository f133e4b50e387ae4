"""The artifact uploads (`/v1/steering/vectors`, `/v1/steering/probes`) and the request
limits of the generation routes. Every model forbids unknown fields and is strict about JSON
types (`steering.methods.base.StrictModel`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from steering.methods.base import StrictModel

MAX_N = 16
MAX_STOP_SEQUENCES = 8
MAX_PROMPTS = 16
MAX_VECTOR_VALUES = 65536


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
