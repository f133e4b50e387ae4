"""Per-row state for vLLM (V1 model runner) logits processors, and the row record of the
processors that send telemetry.

A method's processor reads its request settings from `SamplingParams.extra_args` (its own key,
`steering.runtime.keys.method_key`) and keeps one entry per batch row, in step with vLLM's
persistent batch through `update_state`. Each `apply` does one batched tensor computation over
the rows that use it: no Python loop over the vocabulary, none over requests beyond building
the row lists when the batch changes.
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

from steering.runtime import keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig

GREEDY_EPS = 1e-5  # vLLM's own threshold below which a temperature means greedy


def settings_of(params: SamplingParams, name: str):
    """Method `name`'s encoded settings in a request's `extra_args` (None: not used)."""
    return (params.extra_args or {}).get(keys.method_key(name))


def steer_id(params: SamplingParams) -> str:
    return str((params.extra_args or {}).get(keys.STEER_ID, ""))


RowState = TypeVar("RowState")


class RowBatch(Generic[RowState]):
    """A processor's rows in batch order, as one step's batched work takes them: their batch
    indices (a list and a tensor), their states, and tensors derived from them (`cached`),
    all valid until the row set changes."""

    def __init__(self, indices: list[int], states: list[RowState], device: torch.device):
        self.indices, self.states = indices, states
        self.index = torch.tensor(indices, dtype=torch.long, device=device)
        self._cache: dict[str, torch.Tensor] = {}

    def cached(self, name: str, build) -> torch.Tensor:
        """The tensor `build()` makes from these rows, built once per row set."""
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = build()
        return value

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """These rows' logits: the tensor itself when every row of the step is one of them."""
        return logits if len(self.indices) == logits.shape[0] else logits[self.index]

    def put(self, logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """`selected` (from `select`) written back into `logits`; returns `logits`."""
        if selected is not logits:
            logits[self.index] = selected
        return logits

    def positions(self) -> list[int]:
        """Each row's position: the index of the token being sampled (its output so far)."""
        return [len(state.output_token_ids) for state in self.states]


class RowStateProcessor(LogitsProcessor, Generic[RowState]):
    """A logits processor with optional per-row state, tracking vLLM's batch updates.

    Subclasses say which state a request needs (`row_state`, None = not involved) and get
    `self.rows` (batch index -> state) and `batch()`, the rows in order, rebuilt only when the
    row set changed (`self.changed`).
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, RowState] = {}
        self.changed = False
        self._batch: RowBatch[RowState] | None = None

    def batch(self, device: torch.device) -> RowBatch[RowState]:
        if self.changed or self._batch is None:
            indices = sorted(self.rows)
            self._batch = RowBatch(indices, [self.rows[i] for i in indices], device)
            self.changed = False
        return self._batch

    @abstractmethod
    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> RowState | None:
        """State for a newly added request, or None when this processor ignores it."""

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.rows
        for index in batch_update.removed:
            self._remove(index)
        for index, params, prompt_token_ids, output_token_ids in batch_update.added:
            self._remove(index)
            state = self.row_state(params, prompt_token_ids, output_token_ids)
            if state is not None:
                rows[index] = state
                self.row_added(index, state)
                self.changed = True
        for a, b, direction in batch_update.moved:
            a_state, b_state = rows.pop(a, None), rows.pop(b, None)
            if a_state is not None:
                rows[b] = a_state
            if b_state is not None and direction == MoveDirectionality.SWAP:
                rows[a] = b_state
            if a_state is not None or b_state is not None:
                self.row_moved(a, b, direction == MoveDirectionality.SWAP)
                self.changed = True

    def _remove(self, index: int) -> None:
        state = self.rows.pop(index, None)
        if state is not None:
            self.row_removed(index, state)
            self.changed = True

    def row_added(self, index: int, state: RowState) -> None:
        """Called when batch row `index` starts a request this processor serves."""

    def row_removed(self, index: int, state: RowState) -> None:
        """Called when batch row `index`'s request leaves the batch (finished, aborted, or
        preempted: a preempted request comes back later as an added row)."""

    def row_moved(self, a: int, b: int, swap: bool) -> None:
        """Called after row a's state moved to row b (and b's to a when `swap`)."""


Setting = TypeVar("Setting")


class TelemetryRow(Generic[Setting]):
    """A row whose telemetry a processor sends: the request's steering id, vLLM's live output
    list (its length is the position of the token being sampled) and the processor's setting
    for the row (a temperature, a gated request's `GatedRow`)."""

    __slots__ = ("steer_id", "output_token_ids", "setting")

    def __init__(self, steer_id: str, output_token_ids: list[int], setting: Setting):
        self.steer_id = steer_id
        self.output_token_ids = output_token_ids
        self.setting = setting


