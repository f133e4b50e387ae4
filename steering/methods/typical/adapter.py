"""Locally typical sampling inside vLLM: a logits processor for the rows whose request sets a
typical mass τ < 1.

Argmax-invariant in vLLM's sense: vLLM then calls it after temperature scaling and only for
sampled (non-greedy) rows, which is exactly where HF applies `TypicalLogitsWarper`. vLLM's
built-in min-p runs before it and top-k / top-p after it. A gated row's typical mass is
applied by the gate processor, in its chain (the descriptor does not encode it then).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams

from steering.methods.typical.core import apply_typical
from steering.runtime.rows import GREEDY_EPS, RowStateProcessor, settings_of

NAME = "typical"


def check_mass(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"typical_p must be a number in (0, 1], got {value!r}")
    return float(value)


class TypicalProcessor(RowStateProcessor[float]):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = settings_of(sampling_params, NAME)
        if value is not None:
            check_mass(value)

    def is_argmax_invariant(self) -> bool:
        return True

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> float | None:
        mass = settings_of(params, NAME)
        if mass is None or mass >= 1 or params.temperature < GREEDY_EPS:
            return None
        return float(mass)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = self.batch(logits.device)
        mass = batch.cached("mass", lambda: torch.tensor(batch.states, dtype=torch.float32,
                                                         device=logits.device))
        return batch.put(logits, apply_typical(batch.select(logits), mass))
