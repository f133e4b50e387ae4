"""V-Reason's descriptor: `steering.vreason`, its limit (`--vreason-max-steps`), its check
against the engine, encoding and report."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from pydantic import ConfigDict, Field

from steering.errors import InvalidRequest
from steering.methods.base import Method, Needs, ReportModel, Sharing, StrictModel
from steering.methods.vreason.adapter import NAME, ValueCacheTuner, VReasonProcessor, encode_config
from steering.methods.vreason.core import Positions, VReasonConfig

DEFAULT_MAX_STEPS = 8  # optimiser steps per update a request may ask for (`--vreason-max-steps`)
MAX_STEPS = 64  # the schema's ceiling


class VReasonOptions(StrictModel):
    """V-Reason (arXiv 2510.17045): every `every` generated tokens, `steps` Adam steps on a
    value-cache offset of the last decoder layer, raising the entropy while its EMA is at its
    running peak and lowering it below. Defaults are ours; the paper does not publish them."""

    model_config = ConfigDict(title="V-Reason")

    every: Annotated[int, Field(ge=1, le=4096, description="update every k generated tokens")] = 4
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS,
                                description="optimiser steps per update")] = 2
    lr: Annotated[float, Field(gt=0, le=1, description="Adam learning rate")] = 0.05
    ema: Annotated[float, Field(ge=0, lt=1, description="EMA coefficient of the entropy")] = 0.9
    positions: Positions = Field(
        default=Positions.PROMPT,
        description="tune the prompt's value vectors, or the whole context's")


class VReasonUpdate(ReportModel):
    token: int
    alpha: float
    ema: float
    entropy_before: float
    entropy_after: float
    delta_norm: float


class VReasonReport(ReportModel):
    every: int
    steps: int
    lr: float
    ema: float
    positions: str
    updates: list[VReasonUpdate] = []
    peak_token: int | None = None
    peak_ema: float | None = None
    error: str | None = None


def _bounded_steps(text: str) -> int:
    """An argparse type: optimiser steps in [1, MAX_STEPS]."""
    import argparse

    value = int(text)
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_STEPS}")
    return value


class VReason(Method):
    name = NAME
    report_model = VReasonReport
    processor = VReasonProcessor
    worker_part = ValueCacheTuner
    in_orchestration = False

    def fields(self):
        return {"vreason": (VReasonOptions | None, None)}

    def add_arguments(self, parser) -> None:
        parser.add_argument("--vreason-max-steps", default=DEFAULT_MAX_STEPS,
                            type=_bounded_steps,
                            help="most optimiser steps per V-Reason update a request may ask "
                            f"for (at most {MAX_STEPS})")

    def configure(self, args) -> int:
        return args.vreason_max_steps

    def read(self, request) -> VReasonConfig | None:
        vreason = request.steering.vreason if request.steering else None
        return VReasonConfig(**vreason.model_dump()) if vreason else None

    def settings(self, options: VReasonConfig) -> VReasonConfig:
        return options

    def resolve(self, settings: VReasonConfig, engine, state) -> VReasonConfig:
        unsupported = engine.unsupported(self.name)
        if unsupported is not None:
            raise InvalidRequest(f"{self.param} is not available on this server: "
                                 f"{unsupported}", self.param)
        max_steps = DEFAULT_MAX_STEPS if state is None else state
        if settings.steps > max_steps:
            raise InvalidRequest(f"{self.param}.steps={settings.steps} exceeds this server's "
                                 f"limit of {max_steps}", f"{self.param}.steps")
        return settings

    def needs(self, settings) -> Needs:
        # its KV cache is tuned by its own tokens' entropy: never shared
        return Needs(capture_row=True, sharing=Sharing.PRIVATE)

    def encode(self, settings, params, slots, steering) -> None:
        params.extra_args[self.key] = encode_config(settings)

    async def collect(self, settings, engine, key: str) -> dict | None:
        return await engine.take(self.name, key)

    def report(self, options: VReasonConfig, outcome) -> dict:
        return {**asdict(options), **(outcome.collected.get(self.name) or {})}
