"""Mirostat v2 inside vLLM: a logits processor that keeps each row's μ across engine steps.

Argmax-invariant (it always keeps the most likely token): vLLM calls it after penalties and the
request's temperature, for sampled rows. It cannot see which token vLLM's sampler then draws,
so each step it first settles the previous one: the token a row sampled last step is the last
of its output list now (vLLM fills the list before calling processors, with async scheduling
too), its surprise is read from the renormalised distribution the row drew it from (kept per
row on the device), and μ moves (`core.update`). Then it truncates this step's distribution
(`core.truncate`). A position seen again (a chunked prefill's discarded sample) is truncated
again without a μ update.

State lives in device tensors indexed by a slot per request, so batch moves and swaps only
move the slot number with the row. A request that leaves the batch settles its last token and
parks its μ under its steering id; a preempted request that comes back (vLLM re-adds it with its
tokens so far) resumes from it. Parked μ of finished requests are dropped oldest first.

Each step it sends, for each of its rows, the μ it truncated with and the tokens it kept
(`StepTelemetry` under "mirostat"): the per-token report and the metric. No host sync but that
one copy; no loop over the vocabulary.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from vllm import SamplingParams

from steering.methods.mirostat.core import truncate, update
from steering.runtime.rows import GREEDY_EPS, RowStateProcessor, settings_of, steer_id
from steering.runtime.telemetry import StepTelemetry, publisher

NAME = "mirostat"
_PARKED = 4096  # μ of requests that left the batch, kept for a preempted one's return


def decode(encoded) -> tuple[float, float]:
    """(τ, η) from their encoding (`Mirostat.encode`)."""
    tau, eta = encoded
    for value in (tau, eta):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < float("inf")):
            raise ValueError(f"mirostat's tau and eta must be finite numbers ≥ 0, got {encoded!r}")
    return float(tau), float(eta)


class MirostatRow:
    """One mirostat request in the batch: its steering id, vLLM's live output list, τ, η,
    its slot in the state tensors, and the position of the distribution it last drew from."""

    __slots__ = ("steer_id", "output_token_ids", "tau", "eta", "slot", "drawn_at")

    def __init__(self, steer_id: str, output_token_ids: list[int], tau: float, eta: float):
        self.steer_id, self.output_token_ids = steer_id, output_token_ids
        self.tau, self.eta = tau, eta
        self.slot = -1
        self.drawn_at: int | None = None


class MirostatProcessor(RowStateProcessor[MirostatRow]):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = publisher(vllm_config)
        self._mu = torch.empty(0, device=device)
        self._tau = torch.empty(0, device=device)
        self._eta = torch.empty(0, device=device)
        self._drawn = torch.empty(0, 0, device=device)  # (slots, vocab): last step's log2 p'
        self._free: list[int] = []
        self._parked: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        encoded = settings_of(sampling_params, NAME)
        if encoded is not None:
            decode(encoded)

    def is_argmax_invariant(self) -> bool:
        return True

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> MirostatRow | None:
        encoded = settings_of(params, NAME)
        if encoded is None or params.temperature < GREEDY_EPS:
            return None
        return MirostatRow(steer_id(params), output_token_ids, *decode(encoded))

    def row_added(self, index: int, row: MirostatRow) -> None:
        row.slot = self._take_slot()
        parked = self._parked.pop(row.steer_id, None)
        start = parked if parked is not None and row.output_token_ids else 2 * row.tau
        self._mu[row.slot] = start
        self._tau[row.slot], self._eta[row.slot] = row.tau, row.eta

    def row_removed(self, index: int, row: MirostatRow) -> None:
        self._settle([row])
        self._parked[row.steer_id] = self._mu[row.slot].clone()
        while len(self._parked) > _PARKED:
            self._parked.popitem(last=False)
        self._free.append(row.slot)

    def _take_slot(self) -> int:
        if not self._free:
            grown = max(8, 2 * self._mu.numel())
            old = self._mu.numel()
            self._mu, self._tau, self._eta = (
                torch.cat((t, t.new_zeros(grown - old))) for t in (self._mu, self._tau, self._eta))
            if self._drawn.numel():
                self._drawn = torch.cat((self._drawn,
                                         self._drawn.new_zeros(grown - old, self._drawn.shape[1])))
            self._free.extend(range(grown - 1, old - 1, -1))
        return self._free.pop()

    def _settle(self, rows: list[MirostatRow]) -> None:
        """μ after each row's last drawn token, for the rows that drew one since."""
        due = [r for r in rows if r.drawn_at is not None
               and len(r.output_token_ids) == r.drawn_at + 1]
        if not due:
            return
        slots = torch.tensor([r.slot for r in due], device=self._mu.device)
        tokens = torch.tensor([r.output_token_ids[-1] for r in due], device=self._mu.device)
        surprise = -self._drawn[slots, tokens]
        self._mu[slots] = update(self._mu[slots], surprise, self._tau[slots], self._eta[slots])
        for r in due:
            r.drawn_at = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        batch = self.batch(logits.device)
        self._settle(batch.states)
        if self._drawn.shape[1] != logits.shape[1]:
            self._drawn = self._drawn.new_zeros(self._mu.numel(), logits.shape[1])
        slots = batch.cached("slots", lambda: torch.tensor([r.slot for r in batch.states],
                                                           device=logits.device))
        selected = batch.select(logits)
        mu = self._mu[slots]
        keep, drawn = truncate(selected, mu)
        selected.masked_fill_(~keep, float("-inf"))
        batch.put(logits, selected)
        self._drawn[slots] = drawn
        positions = batch.positions()
        for r, position in zip(batch.states, positions):
            r.drawn_at = position
        if self._publisher is not None:
            values = torch.stack((mu.double(), keep.sum(-1).double()), 1).cpu().tolist()
            self._publisher.publish(StepTelemetry(ids=[r.steer_id for r in batch.states],
                                                  positions=positions, method=NAME,
                                                  values=values))
        return logits
