"""The engine's own logits processor: every steered row's entropy and varentropy, sent to the
API process each step (`steering.runtime.telemetry`).

Measured on the logits vLLM hands to custom processors (after allowed-token, bad-word,
logit-bias and min-tokens masks; before repetition penalties), divided by the request's
temperature (1 for greedy), over the full vocabulary, before min-p / typical / top-k / top-p
truncation. It never changes the logits; it declares itself not argmax-invariant only so that
vLLM also calls it for all-greedy batches. A row whose sampling a method took over (its
processor applies the row's own chain, at temperature 1 in vLLM's eyes) is measured by that
method's processor, on the distribution it samples from.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams

from steering.entropy import entropy_varentropy
from steering.methods.registry import METHODS
from steering.runtime import keys
from steering.runtime.rows import RowStateProcessor, TelemetryRow
from steering.runtime.telemetry import StepTelemetry, publisher

_MEASURED_ELSEWHERE = tuple(m.key for m in METHODS if m.takes_over_sampling)


class EntropyProcessor(RowStateProcessor[TelemetryRow[float]]):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = publisher(vllm_config)

    def is_argmax_invariant(self) -> bool:
        return False

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> TelemetryRow[float] | None:
        extra = params.extra_args or {}
        steer_id = extra.get(keys.STEER_ID)
        if self._publisher is None or not isinstance(steer_id, str) or any(
                key in extra for key in _MEASURED_ELSEWHERE):
            return None
        return TelemetryRow(steer_id, output_token_ids, params.temperature)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = self.batch(logits.device)
        temperature = batch.cached("temperature", lambda: torch.tensor(
            [row.setting for row in batch.states], dtype=torch.float32).to(logits.device))
        entropy, varentropy = entropy_varentropy(batch.select(logits), temperature)
        values = torch.stack((entropy, varentropy)).cpu().tolist()
        self._publisher.publish(StepTelemetry(
            ids=[row.steer_id for row in batch.states], positions=batch.positions(),
            entropy=values[0], varentropy=values[1]))
        return logits
