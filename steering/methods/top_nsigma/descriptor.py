"""Top-nσ's descriptor: `steering.top_nsigma` (or llama.cpp's request-level `top_n_sigma`), a
stage of the gated chain (`top_nsigma` in a gate's `then`), the kept tokens per generated
token in the report (with `return_entropy`) and in a histogram."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from steering.methods.base import Method, ReportModel, StrictModel
from steering.methods.gates.core import Stage
from steering.methods.top_nsigma.adapter import NAME, TopNSigmaProcessor
from steering.methods.top_nsigma.core import apply_top_nsigma
from steering.runtime.rows import GREEDY_EPS

N = Annotated[float, Field(ge=0, allow_inf_nan=False, description=(
    "keep the tokens whose logit is at least max − n·σ; 0 keeps only the top token (greedy)"),
    examples=[1.0])]


class TopNSigmaOptions(StrictModel):
    """Top-nσ (Tang et al. 2024): keep the tokens whose logit is at least the row's largest
    minus n standard deviations of its logits, whatever the temperature."""

    model_config = ConfigDict(title="Top-nσ sampling")

    n: N


class TopNSigmaReport(ReportModel):
    n: float
    kept: list[int | None] | None = Field(default=None, description=(
        "tokens kept at each generated token (with `return_entropy`; null where not measured: "
        "a gated token, whose chain the gate processor applies)"))


@dataclass(frozen=True)
class TopNSigmaRequest:
    n: float
    per_token: bool  # the report lists the kept tokens per generated token


class TopNSigma(Method):
    name = NAME
    report_model = TopNSigmaReport
    processor = TopNSigmaProcessor
    stage = Stage("top_nsigma", math.inf, apply_top_nsigma, N)

    def fields(self):
        return {"top_nsigma": (TopNSigmaOptions | None, None)}

    def request_fields(self):
        return {"top_n_sigma": (Annotated[float, Field(allow_inf_nan=False, strict=True,
                                                       description=(
            "llama.cpp's name for steering.top_nsigma.n; negative turns it off (llama.cpp's "
            "default -1)"))] | None, None)}

    def read(self, request) -> TopNSigmaRequest | None:
        steering = request.steering.top_nsigma if request.steering else None
        if request.top_n_sigma is not None and steering is not None:
            raise ValueError("set top_n_sigma or steering.top_nsigma, not both")
        n = request.top_n_sigma if steering is None else steering.n
        if n is None or n < 0:
            return None
        return TopNSigmaRequest(n, per_token=bool(request.steering and
                                                  request.steering.return_entropy))

    def settings(self, options: TopNSigmaRequest) -> float:
        return options.n

    def encode(self, settings: float, params, slots, steering) -> None:
        params.extra_args[self.key] = settings

    def streams(self, settings, params) -> tuple[str, ...]:
        return (NAME,) if params.temperature >= GREEDY_EPS else ()  # vLLM: greedy skips it

    def report(self, options: TopNSigmaRequest, outcome) -> dict:
        if not options.per_token:
            return {"n": options.n}
        kept = outcome.values.get(NAME) or [None] * outcome.tokens
        return {"n": options.n, "kept": [None if v is None else int(v[0]) for v in kept]}

    def metrics(self, registry):
        from prometheus_client import Histogram

        return Histogram("steer_top_nsigma_kept_tokens", "Tokens top-nσ kept at each generated "
                         "token", ("model",),
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536),
                         registry=registry)

    def observe(self, meters, metrics, labels, options, outcome) -> None:
        histogram = meters.labels(labels[0])
        for values in outcome.values.get(NAME, ()):
            if values is not None:
                histogram.observe(values[0])
