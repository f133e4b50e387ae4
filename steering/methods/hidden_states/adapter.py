"""Hidden states at the last prompt token, captured inside vLLM in compiled mode: the rows
that ask (`CaptureRows`), and the worker part that asks the steerable layers for the step's
token row holding that token and keeps what they copied (`steering.runtime.layers`)."""

from __future__ import annotations

import torch
from vllm import SamplingParams

from steering.runtime.layers import final_norm
from steering.runtime.rows import RowStateProcessor, settings_of, steer_id
from steering.runtime.step import LayerStep, WorkerPart, cpu_copy, processor_of

NAME = "hidden_states"


def capture_row(prompt_len: int, start: int, end: int, computed: int) -> int | None:
    """The step's token row holding the last prompt token, if this step computes it (a
    request's token rows [start, end) hold its positions computed, computed + 1, ...)."""
    row = start + prompt_len - 1 - computed
    return row if start <= row < end else None


class CaptureRows(RowStateProcessor[tuple[str, int]]):
    """The rows whose request asks for its hidden states: (steering id, prompt length). Never
    changes the logits."""

    def is_argmax_invariant(self) -> bool:
        return True

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> tuple[str, int] | None:
        if not settings_of(params, NAME):
            return None
        return steer_id(params), len(prompt_token_ids or ())

    def apply(self, logits):
        return logits


class HiddenStatesPart(WorkerPart):
    """Keeps, per request, every layer's residual stream at its last prompt token."""

    def __init__(self, runner, table) -> None:
        super().__init__(runner, table)
        self.rows = processor_of(runner, CaptureRows).rows
        self.capturing: list[tuple[str, int]] = []  # (request key, capture slot) this step
        self.captures: dict[str, torch.Tensor] = {}  # request key -> (layers, hidden), on CPU

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def before_forward(self, step: LayerStep) -> None:
        self.capturing = []
        for i, (key, prompt_len) in self.rows.items():
            if i >= step.num_reqs:
                continue
            row = capture_row(prompt_len, *step.tokens(i))
            slot = None if row is None else step.capture(row)
            if slot is not None:
                self.capturing.append((key, slot))

    def after_forward(self, step: LayerStep) -> None:
        for key, slot in self.capturing:
            self.captures[key] = cpu_copy(self.table.captured[:, slot])
        self.capturing = []
        # Captures of aborted requests are never taken: keep only the newest few.
        while len(self.captures) > 4 * self.table.capture_rows.numel():
            self.captures.pop(next(iter(self.captures)))

    def take(self, key: str, layers: list[int], final: bool) -> dict[str, list] | None:
        """At the request's last prompt token: the residual stream after each of `layers` and,
        with `final`, the last layer's after the model's final norm (None if nothing was
        captured); forgets it."""
        captured = self.captures.pop(key, None)
        if captured is None:
            return None
        taken = {"layers": captured[layers].tolist()}
        if final:
            norm = final_norm(self.runner.model)
            weight = next(norm.parameters())
            with torch.inference_mode():
                normed = norm(captured[-1:].to(weight.device, weight.dtype))
            taken["final"] = normed[0].float().tolist()
        return taken
