"""Top-nσ inside vLLM: a logits processor for the rows whose request sets n.

Argmax-invariant (it always keeps the largest logit): vLLM calls it after penalties,
temperature and min-p, only for sampled rows, before top-k / top-p. Its kept set does not
depend on the temperature. Each step it sends the number of tokens it kept for each of its
rows (`StepTelemetry` under "top_nsigma"): the per-token report and the metric. A gated row's n
is applied by the gate processor, in its chain (the descriptor does not encode it then).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams

from steering.methods.top_nsigma.core import top_nsigma_removed
from steering.runtime.rows import (
    GREEDY_EPS,
    RowStateProcessor,
    TelemetryRow,
    settings_of,
    steer_id,
)
from steering.runtime.telemetry import StepTelemetry, publisher

NAME = "top_nsigma"


def check_n(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"top-nσ's n must be a number ≥ 0, got {value!r}")
    return float(value)


class TopNSigmaProcessor(RowStateProcessor[TelemetryRow[float]]):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = publisher(vllm_config)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = settings_of(sampling_params, NAME)
        if value is not None:
            check_n(value)

    def is_argmax_invariant(self) -> bool:
        return True

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> TelemetryRow[float] | None:
        n = settings_of(params, NAME)
        if n is None or params.temperature < GREEDY_EPS:
            return None
        return TelemetryRow(steer_id(params), output_token_ids, float(n))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = self.batch(logits.device)
        n = batch.cached("n", lambda: torch.tensor([row.setting for row in batch.states],
                                                   dtype=torch.float32, device=logits.device))
        selected = batch.select(logits)
        selected.masked_fill_(top_nsigma_removed(selected, n), float("-inf"))
        batch.put(logits, selected)
        if self._publisher is not None:
            kept = torch.isfinite(selected).sum(-1, keepdim=True)
            self._publisher.publish(StepTelemetry(
                ids=[row.steer_id for row in batch.states], positions=batch.positions(),
                method=NAME, values=kept.double().cpu().tolist()))
        return logits
