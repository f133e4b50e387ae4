"""EAST inside vLLM: which batch rows add which stored vectors at which layers, and the
per-step coefficients that do it (`steering.runtime.layers` adds `coefficients @ vectors` to
each steerable layer's output in compiled mode).

The rows processor never changes the logits: vLLM keeps logits processors in step with its
persistent batch, which is exactly the bookkeeping the coefficient filler needs.
"""

from __future__ import annotations

from vllm import SamplingParams

from steering.methods.east.core import RequestSteering, VectorUse, fill_coefficients
from steering.runtime.rows import RowStateProcessor, settings_of
from steering.runtime.step import LayerStep, WorkerPart, processor_of

NAME = "east"


def decode_uses(encoded) -> tuple[VectorUse, ...]:
    """Vector uses from their encoding: [[table slot, scale, layer, prompt positions too], ...]
    (`East.encode`)."""
    return tuple(VectorUse(int(slot), float(scale), int(layer), bool(all_positions))
                 for slot, scale, layer, all_positions in encoded)


class EastRows(RowStateProcessor[RequestSteering]):
    def is_argmax_invariant(self) -> bool:
        return True  # a no-op on logits; skipped for all-greedy batches

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> RequestSteering | None:
        encoded = settings_of(params, NAME)
        if not encoded:
            return None
        return RequestSteering(uses=decode_uses(encoded), prompt_len=len(prompt_token_ids or ()))

    def apply(self, logits):
        return logits


class EastPart(WorkerPart):
    """Adds each EAST row's vectors to its token rows of the step."""

    def __init__(self, runner, table) -> None:
        super().__init__(runner, table)
        self.rows = processor_of(runner, EastRows).rows

    @property
    def active(self) -> bool:
        return bool(self.rows)

    def before_forward(self, step: LayerStep) -> None:
        steered = [(steering, *step.tokens(i), -1) for i, steering in self.rows.items()
                   if i < step.num_reqs]
        step.wrote(fill_coefficients(step.coefficients, steered))
