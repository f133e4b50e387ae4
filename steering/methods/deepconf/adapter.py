"""DeepConf inside vLLM: one logits processor that measures every asking row's token
confidence and group confidence each step, and ends an online trace at the token where its
group confidence falls below its threshold.

Not argmax-invariant (it can force the end of sequence), so vLLM calls it on the logits before
temperature and penalties, greedy rows included: the distribution whose top-k log-probabilities
vLLM reports by default (`logprobs_mode="raw_logprobs"`), which is what the paper's confidence
is computed on. It runs before the other methods' processors (registry order), which then see
a cut row as a single allowed token.

Each row keeps its last `window` token confidences in a ring of device memory (its slot), each
written at the row's position, so a position seen again (a chunked prefill's discarded sample)
overwrites itself. The group confidence is the ring's sum over the window; once the window is
full and it is below the threshold, the row's logits become the end-of-sequence token alone:
vLLM finishes it with `stop`. A row that leaves the batch parks its ring under its steering id;
a preempted row that comes back resumes from it. One log-softmax and one top-k over the asking
rows per step, one copy to the host (the telemetry, and which rows to cut: the few cut rows
are rewritten by index), no loop over the vocabulary.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from vllm import SamplingParams

from steering.methods.deepconf.core import token_confidence
from steering.runtime.rows import RowStateProcessor, settings_of, steer_id
from steering.runtime.telemetry import StepTelemetry, publisher

NAME = "deepconf"
MAX_TOP_K = 100
MAX_WINDOW = 4096
_PARKED = 1024  # rings of rows that left the batch, kept for a preempted one's return


def decode(encoded) -> tuple[int, int, float]:
    """(top_k, window, threshold) from their encoding (`DeepConf.encode`); threshold −∞: the
    trace is measured, never cut."""
    top_k, window, bar = encoded
    for value, limit in ((top_k, MAX_TOP_K), (window, MAX_WINDOW)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"deepconf's top_k and window must be integers in [1, {limit}], "
                             f"got {encoded!r}")
    if bar is None:
        return top_k, window, -math.inf
    if isinstance(bar, bool) or not isinstance(bar, (int, float)) or not math.isfinite(bar):
        raise ValueError(f"deepconf's threshold must be a finite number, got {bar!r}")
    return top_k, window, float(bar)


class TraceRow:
    """One DeepConf row: its steering id, vLLM's live output list, its settings, the token that
    ends it, and its slot in the ring."""

    __slots__ = ("steer_id", "output_token_ids", "top_k", "window", "threshold", "eos", "slot")

    def __init__(self, steer_id: str, output_token_ids: list[int], top_k: int, window: int,
                 threshold: float, eos: int | None):
        self.steer_id, self.output_token_ids = steer_id, output_token_ids
        self.top_k, self.window, self.threshold, self.eos = top_k, window, threshold, eos
        self.slot = -1


class DeepConfProcessor(RowStateProcessor[TraceRow]):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = publisher(vllm_config)
        self._ring = torch.zeros(0, MAX_WINDOW, device=device)
        self._free: list[int] = []
        self._parked: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        encoded = settings_of(sampling_params, NAME)
        if encoded is not None:
            decode(encoded)

    def is_argmax_invariant(self) -> bool:
        return False

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> TraceRow | None:
        encoded = settings_of(params, NAME)
        if encoded is None:
            return None
        return TraceRow(steer_id(params), output_token_ids, *decode(encoded),
                        eos=params.eos_token_id)

    def row_added(self, index: int, row: TraceRow) -> None:
        if not self._free:
            old = self._ring.shape[0]
            grown = max(8, 2 * old)
            self._ring = torch.cat((self._ring, self._ring.new_zeros(grown - old, MAX_WINDOW)))
            self._free.extend(range(grown - 1, old - 1, -1))
        row.slot = self._free.pop()
        parked = self._parked.pop(row.steer_id, None)
        self._ring[row.slot] = parked if parked is not None and row.output_token_ids else 0

    def row_removed(self, index: int, row: TraceRow) -> None:
        self._parked[row.steer_id] = self._ring[row.slot].clone()
        while len(self._parked) > _PARKED:
            self._parked.popitem(last=False)
        self._free.append(row.slot)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = self.batch(logits.device)
        rows = batch.states

        def column(name, value, dtype):
            return batch.cached(name, lambda: torch.tensor([value(r) for r in rows],
                                                           dtype=dtype, device=logits.device))

        slots = column("slots", lambda r: r.slot, torch.long)
        top_k = column("top_k", lambda r: r.top_k, torch.long)
        window = column("window", lambda r: r.window, torch.long)
        bar = column("threshold", lambda r: r.threshold, torch.float32)
        eos = column("eos", lambda r: -1 if r.eos is None else r.eos, torch.long)
        positions = batch.positions()
        at = torch.tensor(positions, dtype=torch.long, device=logits.device)

        confidence = token_confidence(batch.select(logits), top_k)
        self._ring[slots, at % window] = confidence
        seen = torch.minimum(at + 1, window)
        group = self._ring[slots].sum(-1) / seen
        cut = (seen == window) & (group < bar) & (eos >= 0)
        values = torch.stack((confidence, group, cut.float()), 1).double().cpu().tolist()
        for index, row in ((i, r) for i, r, v in zip(batch.indices, rows, values) if v[2]):
            logits[index] = float("-inf")  # only the end of sequence is left
            logits[index, row.eos] = 0.0
        if self._publisher is not None:
            self._publisher.publish(StepTelemetry(ids=[r.steer_id for r in rows],
                                                  positions=positions, method=NAME,
                                                  values=values))
        return logits
