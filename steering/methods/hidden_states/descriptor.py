"""The descriptor of hidden-state capture: `steering.return_hidden_states`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from steering.errors import EngineUnavailable, InvalidRequest
from steering.methods.base import Method, Needs
from steering.methods.hidden_states.adapter import NAME, CaptureRows, HiddenStatesPart

Capture = tuple[tuple[int, ...], bool]  # layers, and whether the final-norm state is wanted


class HiddenStates(Method):
    name = NAME
    report_model = dict[str, list[float]]  # by layer index, and "final"
    listed = False
    in_orchestration = False
    processor = CaptureRows
    worker_part = HiddenStatesPart

    @property
    def param(self) -> str:
        return "steering.return_hidden_states"

    def fields(self):
        return {"return_hidden_states": (Annotated[
            list[Annotated[int, Field(ge=0)] | Literal["final"]],
            Field(min_length=1, max_length=8)] | None, Field(
            default=None, description="hidden states at the last prompt token: a decoder "
            "layer's residual stream (HF's hidden_states[layer + 1] below the last layer), or "
            "'final': after the final norm (HF's last_hidden_state)"))}

    def read(self, request) -> Capture | None:
        asked = request.steering.return_hidden_states if request.steering else None
        if not asked:
            return None
        return tuple(dict.fromkeys(x for x in asked if x != "final")), "final" in asked

    def settings(self, options: Capture) -> Capture:
        return options

    def resolve(self, settings: Capture, engine, state) -> Capture:
        for layer in settings[0]:
            if not 0 <= layer < engine.num_layers:
                raise InvalidRequest(f"layer {layer} is outside [0, {engine.num_layers})",
                                     self.param)
        return settings

    def needs(self, settings) -> Needs:
        return Needs(capture_row=True)

    def encode(self, settings, params, slots, steering) -> None:
        params.extra_args[self.key] = True

    async def collect(self, settings: Capture, engine, key: str) -> dict:
        layers, final = settings
        taken = await engine.take(self.name, key, list(layers), final)
        if taken is None:
            raise EngineUnavailable("the engine did not capture the hidden states")
        hidden_states = dict(zip(layers, taken["layers"]))
        if final:
            hidden_states["final"] = taken["final"]
        return hidden_states

    def report(self, options, outcome) -> dict | None:
        hidden_states = outcome.collected.get(self.name)
        if hidden_states is None:
            return None
        return {str(k): v for k, v in hidden_states.items()}
