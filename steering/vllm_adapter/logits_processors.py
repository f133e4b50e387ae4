"""vLLM (V1 model runner) logits processors hosting the engine-free cores.

Both read their per-request parameters from `SamplingParams.extra_args` (keys in `ExtraArgs`) and
keep one entry per batch row, kept in step with vLLM's persistent batch through `update_state`.
Each `apply` does one batched tensor computation over the rows that use it: no Python loop over
the vocabulary, none over requests beyond building the row lists when the batch changes.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import (
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
)

from steering.east import RequestSteering, VectorUse
from steering.entropy import entropy_varentropy
from steering.gates import (
    MAX_GATES,
    Action,
    Gate,
    GatedRow,
    GateTable,
    Sampling,
    Signal,
    sample_chain,
)
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
    # [temperature, min_p, typical_p, top_k, dynatemp range (None: off), dynatemp exponent]:
    # the request's own sampling, applied by `GateProcessor` (vLLM sees T = 1, no min-p/top-k)
    SAMPLING = "steer_sampling"
    # list of [signal, above, below, hold, ema, [[action, value], ...]] (`steering.gates`)
    GATES = "steer_gates"
    # per gate, its EAST action's [table slot, scale, layer] list (empty: no EAST action)
    GATE_EAST = "steer_gate_east"
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
                self.row_added(index, state)
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
                self.row_moved(a, b, direction == MoveDirectionality.SWAP)
                self.changed = True

    def row_added(self, index: int, state: RowState) -> None:
        """Called when batch row `index` starts a request this processor serves."""

    def row_moved(self, a: int, b: int, swap: bool) -> None:
        """Called after row a's state moved to row b (and b's to a when `swap`)."""


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


Setting = TypeVar("Setting")


class _TelemetryRow(Generic[Setting]):
    """A row whose telemetry a processor sends: the request's steering id, vLLM's live output
    list (its length is the position of the token being sampled) and the processor's setting
    for the row (a temperature, a gated request's `GatedRow`)."""

    __slots__ = ("steer_id", "output_token_ids", "setting")

    def __init__(self, steer_id: str, output_token_ids: list[int], setting: Setting):
        self.steer_id = steer_id
        self.output_token_ids = output_token_ids
        self.setting = setting


def _publisher(vllm_config: VllmConfig) -> TelemetryPublisher | None:
    address = telemetry_address(vllm_config)
    return TelemetryPublisher(address) if address is not None and _is_output_rank() else None


class EntropyTelemetryProcessor(RowStateProcessor[_TelemetryRow[float]]):
    """Measures every sampled token's entropy and varentropy and sends them to the API process.

    Measured on the logits vLLM hands to custom processors (after allowed-token, bad-word,
    logit-bias and min-tokens masks; before repetition penalties), divided by the request's
    temperature (1 for greedy), over the full vocabulary, before min-p / typical / top-k / top-p
    truncation. It never changes the logits; it declares itself not argmax-invariant only so
    that vLLM also calls it for all-greedy batches.
    """

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = _publisher(vllm_config)
        self._index = torch.empty(0, dtype=torch.long)
        self._temperature = torch.empty(0)
        self._ordered: list[_TelemetryRow[float]] = []

    def is_argmax_invariant(self) -> bool:
        return False

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> _TelemetryRow[float] | None:
        steer_id = (params.extra_args or {}).get(ExtraArgs.STEER_ID)
        if self._publisher is None or not isinstance(steer_id, str) or _gated(params):
            return None  # a gated row's telemetry is the gate processor's signal
        return _TelemetryRow(steer_id, output_token_ids, params.temperature)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.changed:
            rows = sorted(self.rows)
            self._ordered = [self.rows[r] for r in rows]
            self._index = torch.tensor(rows, dtype=torch.long, device=logits.device)
            self._temperature = torch.tensor(
                [row.setting for row in self._ordered], dtype=torch.float32
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


def _gated(params: SamplingParams) -> bool:
    return ExtraArgs.SAMPLING in (params.extra_args or {})


def decode_gated_row(extra_args: dict) -> GatedRow:
    """`GatedRow` from its `extra_args` encoding (`server.engine` writes it)."""
    temperature, min_p, typical_p, top_k, spread, exponent = extra_args[ExtraArgs.SAMPLING]
    gates = tuple(
        Gate(Signal(signal), above, below, int(hold), float(ema),
             tuple((Action(action), float(value)) for action, value in then))
        for signal, above, below, hold, ema, then in extra_args.get(ExtraArgs.GATES) or ())
    return GatedRow(Sampling(float(temperature), float(min_p), float(typical_p), int(top_k),
                             None if spread is None else float(spread), float(exponent)), gates)


class GateProcessor(RowStateProcessor[_TelemetryRow[GatedRow]]):
    """Entropy gates and dynamic temperature (`steering.gates`) for the rows whose request sets
    them. Such a request reaches vLLM with temperature 1 and min-p / top-k off (its own settings
    in `ExtraArgs.SAMPLING`): argmax-invariant, this runs after penalties and vLLM's unit
    temperature, before top-p, so it sees the T = 1 distribution the gates measure, and applies
    the request's sampling chain with the gates' actions itself (`steering.gates.sample_chain`).
    It sends the gated rows' telemetry (the signal is the reported entropy) and leaves in
    `east_gate` (per batch row, on the CPU) the gate whose EAST action steers the row's next
    forward pass, for the worker's step filler."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = _publisher(vllm_config)
        capacity = vllm_config.scheduler_config.max_num_seqs
        self.table = GateTable(capacity, device)
        self.east_gate = np.full(capacity, -1, dtype=np.int64)
        self._index = torch.empty(0, dtype=torch.long)
        self._rows: list[int] = []
        self._ordered: list[_TelemetryRow[GatedRow]] = []

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        extra = sampling_params.extra_args or {}
        if ExtraArgs.SAMPLING in extra:
            try:
                decode_gated_row(extra)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"malformed gate encoding: {exc}") from exc

    def is_argmax_invariant(self) -> bool:
        return True  # gated rows always reach vLLM as sampled (T = 1) rows

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> _TelemetryRow[GatedRow] | None:
        extra = params.extra_args or {}
        if ExtraArgs.SAMPLING not in extra:
            return None
        return _TelemetryRow(str(extra.get(ExtraArgs.STEER_ID, "")), output_token_ids,
                             decode_gated_row(extra))

    def row_added(self, index: int, state: _TelemetryRow[GatedRow]) -> None:
        self.table.set_row(index, state.setting)
        self.east_gate[index] = -1

    def row_moved(self, a: int, b: int, swap: bool) -> None:
        self.table.move(a, b, swap)
        if swap:
            self.east_gate[[a, b]] = self.east_gate[[b, a]]
        else:
            self.east_gate[b] = self.east_gate[a]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.changed:
            self._rows = sorted(self.rows)
            self._ordered = [self.rows[r] for r in self._rows]
            self._index = torch.tensor(self._rows, dtype=torch.long, device=logits.device)
            self.changed = False
        ordered = self._ordered
        positions = [len(row.output_token_ids) for row in ordered]
        every_row = len(ordered) == logits.shape[0]
        selected = logits if every_row else logits[self._index]
        decision = self.table.step(
            self._index, torch.tensor(positions, dtype=torch.long, device=logits.device),
            selected)
        sample_chain(selected, decision)
        if not every_row:
            logits[self._index] = selected
        bits = 1 << torch.arange(MAX_GATES, device=logits.device)
        east = decision.east_gate.cpu()
        self.east_gate[self._rows] = east.numpy()
        if self._publisher is not None:
            values = torch.stack((decision.entropy, decision.varentropy,
                                  decision.temperature)).cpu().tolist()
            flags = torch.stack(((decision.fired * bits).sum(1),
                                 (decision.on * bits).sum(1))).cpu().tolist()
            self._publisher.publish(StepTelemetry(
                ids=[row.steer_id for row in ordered], positions=positions,
                entropy=values[0], varentropy=values[1], temperature=values[2],
                fired=flags[0], on=flags[1], east=east.tolist(),
                signals=decision.signals.cpu().tolist()))
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
        gated = extra.get(ExtraArgs.GATE_EAST) or ()
        if not uses and not capture and not any(gated):
            return None
        return RequestSteering(
            uses=tuple(VectorUse(int(slot), float(scale), int(layer), bool(all_positions))
                       for slot, scale, layer, all_positions in uses or ()),
            prompt_len=len(prompt_token_ids or ()),
            capture=capture,
            key=str(extra.get(ExtraArgs.STEER_ID, "")),
            gated=tuple(tuple(VectorUse(int(slot), float(scale), int(layer))
                              for slot, scale, layer in gate) for gate in gated),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
