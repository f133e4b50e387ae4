"""Mirostat v2's descriptor: `steering.mirostat` (or llama.cpp's request-level `mirostat: 2`,
`mirostat_tau`, `mirostat_eta`). It replaces the truncation chain, as llama.cpp's does: other
truncations are refused, and vLLM's top-k / top-p / min-p are off for its rows. Its μ and kept
tokens per generated token are in the report (with `return_entropy`) and μ in a histogram.

Not a gate action: μ is a feedback loop over every token, and a gate that switched mirostat off
for some tokens would leave their surprise out of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

from steering.errors import InvalidRequest
from steering.methods.base import Method, ReportModel, StrictModel
from steering.methods.mirostat.adapter import NAME, MirostatProcessor
from steering.runtime.rows import GREEDY_EPS

DEFAULT_TAU, DEFAULT_ETA = 5.0, 0.1  # llama.cpp's
Tau = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False, description=(
    "target surprise τ in bits; μ starts at 2τ; 0 keeps only the top token"))]
Eta = Annotated[float, Field(ge=0, le=10, allow_inf_nan=False, description=(
    "learning rate η of μ ← μ − η (s − τ)"))]


class MirostatOptions(StrictModel):
    """Mirostat v2 (Basu et al. 2021): keep the tokens whose surprise is at most μ, and move μ
    towards the target surprise τ with each sampled token's surprise."""

    model_config = ConfigDict(title="Mirostat v2")

    tau: Tau = DEFAULT_TAU
    eta: Eta = DEFAULT_ETA


class MirostatReport(ReportModel):
    tau: float
    eta: float
    mu: list[float | None] | None = Field(default=None, description=(
        "μ at each generated token, in bits (with `return_entropy`; null where not measured)"))
    kept: list[int | None] | None = Field(default=None, description=(
        "tokens kept at each generated token (with `return_entropy`)"))


@dataclass(frozen=True)
class MirostatRequest:
    tau: float
    eta: float
    per_token: bool  # the report lists μ and the kept tokens per generated token


# vLLM's own truncations, off for a mirostat row; a request that sets one is refused
_TRUNCATIONS = {"top_k": lambda v: v not in (-1, 0), "top_p": lambda v: v < 1,
                "min_p": lambda v: v > 0}


class Mirostat(Method):
    name = NAME
    report_model = MirostatReport
    processor = MirostatProcessor
    in_orchestration = False  # each particle step is its own engine request: μ would restart

    def fields(self):
        return {"mirostat": (MirostatOptions | None, None)}

    def request_fields(self):
        return {"mirostat": (Annotated[int, Field(ge=0, le=2, strict=True, description=(
                    "llama.cpp's switch: 2 turns Mirostat v2 on (steering.mirostat), 0 off; "
                    "1 (v1) is not served"))] | None, None),
                "mirostat_tau": (Tau | None, None),
                "mirostat_eta": (Eta | None, None)}

    def read(self, request) -> MirostatRequest | None:
        steering = request.steering.mirostat if request.steering else None
        per_token = bool(request.steering and request.steering.return_entropy)
        if steering is not None:
            if request.mirostat is not None:
                raise ValueError("set mirostat or steering.mirostat, not both")
            return MirostatRequest(steering.tau, steering.eta, per_token)
        if request.mirostat == 1:
            raise InvalidRequest("mirostat 1 (Mirostat v1) is not served here; 2 is Mirostat "
                                 "v2", "mirostat")
        if request.mirostat != 2:
            return None  # llama.cpp ignores mirostat_tau / mirostat_eta then too
        return MirostatRequest(
            DEFAULT_TAU if request.mirostat_tau is None else request.mirostat_tau,
            DEFAULT_ETA if request.mirostat_eta is None else request.mirostat_eta, per_token)

    def check(self, options, request, plan) -> None:
        """Mirostat replaces the truncation chain (as llama.cpp's does): its surprise is
        measured on the distribution it keeps, so no other truncation may narrow it."""
        for field, truncates in _TRUNCATIONS.items():
            value = getattr(request, field, None)
            if field in request.model_fields_set and value is not None and truncates(value):
                raise InvalidRequest(f"{self.param} replaces the truncation chain (as in "
                                     f"llama.cpp): drop '{field}'", field)
        others = [m.param for m in plan.methods_used
                  if m.stage is not None or m.takes_over_sampling or m.name == "diffadapt"]
        if others:
            raise InvalidRequest(f"{self.param} replaces the truncation chain (as in "
                                 f"llama.cpp): it does not combine with {', '.join(others)}",
                                 self.param)

    def settings(self, options: MirostatRequest) -> tuple[float, float]:
        return options.tau, options.eta

    def encode(self, settings, params, slots, steering) -> None:
        params.extra_args[self.key] = list(settings)
        params.top_p, params.top_k, params.min_p = 1.0, 0, 0.0  # e.g. a model's defaults

    def streams(self, settings, params) -> tuple[str, ...]:
        return (NAME,) if params.temperature >= GREEDY_EPS else ()  # vLLM: greedy skips it

    def report(self, options: MirostatRequest, outcome) -> dict:
        section = {"tau": options.tau, "eta": options.eta}
        if options.per_token:
            values = outcome.values.get(NAME) or [None] * outcome.tokens
            section["mu"] = [None if v is None else v[0] for v in values]
            section["kept"] = [None if v is None else int(v[1]) for v in values]
        return section

    def metrics(self, registry):
        from prometheus_client import Histogram

        return Histogram("steer_mirostat_mu_bits", "Mirostat's μ (the surprise bound, bits) at "
                         "each generated token", ("model",),
                         buckets=(0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32), registry=registry)

    def observe(self, meters, metrics, labels, options, outcome) -> None:
        histogram = meters.labels(labels[0])
        for values in outcome.values.get(NAME, ()):
            if values is not None:
                histogram.observe(values[0])
