"""EAST's descriptor: `steering.east`, resolved against the vector store, encoded as
[slot, scale, layer, all positions] uses."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

from pydantic import Field

from steering.artifacts import ArtifactNotFound
from steering.errors import InvalidRequest, NotFound
from steering.methods.base import Method, Needs, ReportModel, StrictModel
from steering.methods.east.adapter import NAME, EastPart, EastRows

MAX_VECTORS_PER_REQUEST = 4
MAX_EAST_SCALE = 1000.0


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


@dataclass(frozen=True)
class EastSpec:
    """One steering vector of a choice: `layers` None means the vector's own layer."""

    vector: str
    scale: float
    layers: tuple[int, ...] | None = None
    all_positions: bool = False

    @classmethod
    def of(cls, options: EastOptions) -> EastSpec:
        return cls(vector=options.vector, scale=options.scale,
                   layers=tuple(options.layers) if options.layers else None,
                   all_positions=options.positions == "all")

    def resolved(self, engine, param: str) -> EastSpec:
        """Checked against the engine's vector store; the vector's own layer filled in."""
        try:
            _, meta = engine.vectors.get(self.vector)
        except ArtifactNotFound:
            raise NotFound(f"no steering vector named '{self.vector}'", f"{param}.vector",
                           "vector_not_found") from None
        layers = self.layers if self.layers is not None else (meta.layer,)
        for layer in layers:
            if not 0 <= layer < engine.num_layers:
                raise InvalidRequest(f"layer {layer} is outside [0, {engine.num_layers})",
                                     f"{param}.layers")
        return replace(self, layers=tuple(layers))

    def encode(self, slot: int) -> list[list]:
        """[[table slot, scale, layer, prompt positions too], ...] (`adapter.decode_uses`)."""
        return [[slot, self.scale, layer, int(self.all_positions)] for layer in self.layers]


class EastReport(ReportModel):
    vector: str
    scale: float
    layers: list[int]
    positions: Literal["generated", "all"]


class East(Method):
    name = NAME
    report_model = list[EastReport]
    processor = EastRows
    worker_part = EastPart

    def fields(self):
        return {"east": (EastOptions | Annotated[
            list[EastOptions], Field(min_length=1, max_length=MAX_VECTORS_PER_REQUEST)
        ] | None, Field(default=None, description="one vector or a list whose effects add up"))}

    def read(self, request) -> tuple[EastSpec, ...] | None:
        east = request.steering.east if request.steering else None
        if east is None:
            return None
        return tuple(EastSpec.of(o) for o in (east if isinstance(east, list) else [east]))

    def settings(self, options: tuple[EastSpec, ...]) -> tuple[EastSpec, ...]:
        return options

    def resolve(self, settings, engine, state):
        many = len(settings) > 1
        return tuple(spec.resolved(engine, self.param + (f".{i}" if many else ""))
                     for i, spec in enumerate(settings))

    def needs(self, settings) -> Needs:
        # a steered KV cache may be shared only with identically steered requests
        return Needs(vectors=tuple(s.vector for s in settings),
                     fingerprint=tuple((s.vector, s.scale, s.layers, s.all_positions)
                                       for s in settings))

    def encode(self, settings, params, slots, steering) -> None:
        params.extra_args[self.key] = [use for slot, spec in zip(slots, settings)
                                       for use in spec.encode(slot)]

    def report(self, options, outcome) -> list[dict]:
        return [{"vector": e.vector, "scale": e.scale, "layers": list(e.layers),
                 "positions": "all" if e.all_positions else "generated"}
                for e in outcome.settings[self.name]]

    def observe(self, meters, metrics, labels, options, outcome) -> None:
        metrics.steered_tokens.labels(*labels).inc(outcome.steered_tokens)
