"""vLLM (V1 model runner) logits processors hosting the engine-free cores.

Both read their per-request parameters from `SamplingParams.extra_args` (keys in `ExtraArgs`) and
keep one entry per batch row, kept in step with vLLM's persistent batch through `update_state`.
Each `apply` does one batched tensor computation over the rows that use it: no Python loop over
the vocabulary, none over requests beyond building the row lists when the batch changes.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from steering.east import RequestSteering, VectorUse
from steering.entropy import entropy_varentropy
from steering.typical import apply_typical
from steering.vllm_adapter.telemetry import StepTelemetry, TelemetryPublisher

if TYPE_CHECKING:
    from vllm.config import VllmConfig

_GREEDY_EPS = 1e-5  # vLLM's own threshold below which a temperature means greedy


class ExtraArgs:
    """Keys this project reads from `SamplingParams.extra_args`."""

    STEER_ID = "steer_id"  # str: routes the request's telemetry back to the API process
    TYPICAL_P = "steer_typical_p"  # float in (0, 1): locally typical sampling mass
    # list of [table slot, scale, layer, prompt positions too (0/1)]: residual-stream vectors
    EAST = "steer_east"
    CAPTURE = "steer_capture"  # bool: keep every layer's residual stream at the last prompt token
    VREASON = "steer_vreason"  # [every, steps, lr, ema, positions]: V-Reason value-cache tuning
    # Read in the API process only (by `server.engine.SteeringClient`), never by the engine:
    SESSION = "steer_session"  # str: the HTTP request's steering session
    ORDINAL = "steer_ordinal"  # int: which of the request's prompts these parameters are for
    PREFIX = "steer_"  # every key above starts with it; clients may not send such keys


def telemetry_address(vllm_config: VllmConfig) -> str | None:
    """Where the API process listens for telemetry (set in `additional_config`)."""
    return (vllm_config.additional_config or {}).get("entropy_steer", {}).get("telemetry_address")


RowState = TypeVar("RowState")


class RowStateProcessor(LogitsProcessor, Generic[RowState]):
    """A logits processor with optional per-row state, tracking vLLM's batch updates.

    Subclasses say which state a request needs (`row_state`, None = not involved) and get
    `self.rows` (batch index -> state) plus `self.changed`, set whenever the row set changed so
    that cached index tensors can be rebuilt lazily in `apply`.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, RowState] = {}
        self.changed = False

    @abstractmethod
    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> RowState | None:
        """State for a newly added request, or None when this processor ignores it."""

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.rows
        for index in batch_update.removed:
            if rows.pop(index, None) is not None:
                self.changed = True
        for index, params, prompt_token_ids, output_token_ids in batch_update.added:
            state = self.row_state(params, prompt_token_ids, output_token_ids)
            if state is not None:
                rows[index] = state
                self.changed = True
            elif rows.pop(index, None) is not None:
                self.changed = True
        for a, b, direction in batch_update.moved:
            a_state, b_state = rows.pop(a, None), rows.pop(b, None)
            if a_state is not None:
                rows[b] = a_state
            if b_state is not None and direction == MoveDirectionality.SWAP:
                rows[a] = b_state
            if a_state is not None or b_state is not None:
                self.changed = True


class TypicalLogitsProcessor(RowStateProcessor[float]):
    """Locally typical sampling for the rows whose request sets `typical_p` < 1.

    Argmax-invariant in vLLM's sense: vLLM then calls it after temperature scaling and only for
    sampled (non-greedy) rows, which is exactly where HF applies `TypicalLogitsWarper`. vLLM's
    built-in min-p runs before it and top-k / top-p after it.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._index = torch.empty(0, dtype=torch.long)
        self._mass = torch.empty(0)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = (sampling_params.extra_args or {}).get(ExtraArgs.TYPICAL_P)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
        ):
            raise ValueError(f"typical_p must be a number in (0, 1], got {value!r}")

    def is_argmax_invariant(self) -> bool:
        return True

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> float | None:
        mass = (params.extra_args or {}).get(ExtraArgs.TYPICAL_P)
        if mass is None or mass >= 1 or params.temperature < _GREEDY_EPS:
            return None
        return float(mass)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.changed:
            rows = sorted(self.rows)
            self._index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            self._mass = torch.tensor(
                [self.rows[r] for r in rows], dtype=torch.float32, device=logits.device
            )
            self.changed = False
        if len(self.rows) == logits.shape[0]:
            return apply_typical(logits, self._mass)
        logits[self._index] = apply_typical(logits[self._index], self._mass)
        return logits


class _TelemetryRow:
    __slots__ = ("steer_id", "output_token_ids", "temperature")

    def __init__(self, steer_id: str, output_token_ids: list[int], temperature: float):
        self.steer_id = steer_id
        self.output_token_ids = output_token_ids  # vLLM's live list: its length is the position
        self.temperature = temperature


class EntropyTelemetryProcessor(RowStateProcessor[_TelemetryRow]):
    """Measures every sampled token's entropy and varentropy and sends them to the API process.

    Measured on the logits vLLM hands to custom processors (after allowed-token, bad-word,
    logit-bias and min-tokens masks; before repetition penalties), divided by the request's
    temperature (1 for greedy), over the full vocabulary, before min-p / typical / top-k / top-p
    truncation. It never changes the logits; it declares itself not argmax-invariant only so
    that vLLM also calls it for all-greedy batches.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        address = telemetry_address(vllm_config)
        self._publisher = (
            TelemetryPublisher(address) if address is not None and _is_output_rank() else None
        )
        self._index = torch.empty(0, dtype=torch.long)
        self._temperature = torch.empty(0)
        self._ordered: list[_TelemetryRow] = []

    def is_argmax_invariant(self) -> bool:
        return False

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> _TelemetryRow | None:
        steer_id = (params.extra_args or {}).get(ExtraArgs.STEER_ID)
        if self._publisher is None or not isinstance(steer_id, str):
            return None
        return _TelemetryRow(steer_id, output_token_ids, params.temperature)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.changed:
            rows = sorted(self.rows)
            self._ordered = [self.rows[r] for r in rows]
            self._index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            self._temperature = torch.tensor(
                [row.temperature for row in self._ordered], dtype=torch.float32
            ).to(logits.device)
            self.changed = False
        selected = logits if len(self._ordered) == logits.shape[0] else logits[self._index]
        entropy, varentropy = entropy_varentropy(selected, self._temperature)
        values = torch.stack((entropy, varentropy)).cpu().tolist()
        ordered = self._ordered
        self._publisher.publish(
            StepTelemetry(
                ids=[row.steer_id for row in ordered],
                positions=[len(row.output_token_ids) for row in ordered],
                entropy=values[0],
                varentropy=values[1],
            )
        )
        return logits


def _is_output_rank() -> bool:
    """Only one tensor-parallel rank reports (all ranks see the same logits)."""
    from vllm.distributed import parallel_state

    try:
        return parallel_state.get_tensor_model_parallel_rank() == 0
    except AssertionError:  # parallel groups not initialised (single process)
        return True


class SteeringRowsProcessor(RowStateProcessor[RequestSteering]):
    """Tracks which batch rows carry residual-stream steering (EAST) or hidden-state capture,
    for the worker's per-step filler. It never changes the logits: vLLM keeps logits processors in
    step with its persistent batch, which is exactly the bookkeeping the filler needs."""

    def is_argmax_invariant(self) -> bool:
        return True  # a no-op on logits; skipped for all-greedy batches

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> RequestSteering | None:
        extra = params.extra_args or {}
        uses, capture = extra.get(ExtraArgs.EAST), bool(extra.get(ExtraArgs.CAPTURE))
        if not uses and not capture:
            return None
        return RequestSteering(
            uses=tuple(VectorUse(int(slot), float(scale), int(layer), bool(all_positions))
                       for slot, scale, layer, all_positions in uses or ()),
            prompt_len=len(prompt_token_ids or ()),
            capture=capture,
            key=str(extra.get(ExtraArgs.STEER_ID, "")),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
