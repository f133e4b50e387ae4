"""Entropy gates and dynamic temperature inside vLLM: the gate processor and the gates' EAST
actions in the per-step coefficients.

A gated request reaches vLLM with temperature 1 and min-p / top-k off (its own settings and its
stages' values in its encoding, `Gates.encode`): argmax-invariant, the processor runs after
penalties and vLLM's unit temperature, before top-p, so it sees the T = 1 distribution the gates
measure, and applies the request's sampling chain with the gates' actions itself
(`core.sample_chain`). It measures the gated rows' entropy itself (the signal is the reported
entropy), sends it with what the gates did at each token, and leaves in `east_gate` (per batch
row, on the CPU) the gate whose EAST action steers the row's next forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from vllm import SamplingParams

from steering.methods.east.core import RequestSteering, VectorUse, fill_coefficients
from steering.methods.gates.core import (
    MAX_GATES,
    Gate,
    GatedRow,
    GateTable,
    Sampling,
    Signal,
    sample_chain,
)
from steering.runtime.rows import RowStateProcessor, TelemetryRow, settings_of, steer_id
from steering.runtime.step import LayerStep, WorkerPart, processor_of
from steering.runtime.telemetry import StepTelemetry, publisher

NAME = "gates"


class GateStep(NamedTuple):
    """What the gates did at one token: the temperature it was sampled at, the gates that
    fired and those on at it (bit g: gate g), the gate whose EAST action steers the next token
    (-1: none) and each gate's signal value."""

    temperature: float
    fired: int
    on: int
    east: int
    signals: list[float]

    @classmethod
    def decode(cls, values: list[float] | None) -> GateStep | None:
        """From the values the processor sends per token (`GateProcessor.apply`)."""
        if values is None:
            return None
        temperature, fired, on, east, *signals = values
        return cls(temperature, int(fired), int(on), int(east), signals)


class GatedSetting(NamedTuple):
    """A gated row's gates and sampling, and its gates' EAST uses."""

    row: GatedRow
    steering: RequestSteering


def decode_gated_row(encoded: dict, prompt_len: int = 0) -> GatedSetting:
    """A gated row from its encoding (`Gates.encode`)."""
    temperature, min_p, top_k, spread, exponent = encoded["sampling"]
    gates = tuple(
        Gate(Signal(signal), above, below, int(hold), float(ema),
             tuple((str(action), float(value)) for action, value in then))
        for signal, above, below, hold, ema, then in encoded["gates"])
    sampling = Sampling(float(temperature), float(min_p), int(top_k),
                        None if spread is None else float(spread), float(exponent),
                        {str(k): float(v) for k, v in encoded["stages"].items()})
    uses = tuple(tuple(VectorUse(int(slot), float(scale), int(layer))
                       for slot, scale, layer in gate) for gate in encoded["east"])
    return GatedSetting(GatedRow(sampling, gates), RequestSteering((), prompt_len, uses))


class GateProcessor(RowStateProcessor[TelemetryRow[GatedSetting]]):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from steering.methods.registry import STAGES  # the registry lists this module

        super().__init__(vllm_config, device, is_pin_memory)
        self._publisher = publisher(vllm_config)
        capacity = vllm_config.scheduler_config.max_num_seqs
        self.stages = STAGES
        self.table = GateTable(capacity, device, STAGES)
        self.east_gate = np.full(capacity, -1, dtype=np.int64)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        encoded = settings_of(sampling_params, NAME)
        if encoded is not None:
            try:
                decode_gated_row(encoded)
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"malformed gate encoding: {exc}") from exc

    def is_argmax_invariant(self) -> bool:
        return True  # gated rows always reach vLLM as sampled (T = 1) rows

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> TelemetryRow[GatedSetting] | None:
        encoded = settings_of(params, NAME)
        if encoded is None:
            return None
        return TelemetryRow(steer_id(params), output_token_ids,
                            decode_gated_row(encoded, len(prompt_token_ids or ())))

    def row_added(self, index: int, state: TelemetryRow[GatedSetting]) -> None:
        self.table.set_row(index, state.setting.row)
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
        batch = self.batch(logits.device)
        positions = batch.positions()
        selected = batch.select(logits)
        decision = self.table.step(
            batch.index, torch.tensor(positions, dtype=torch.long, device=logits.device),
            selected)
        sample_chain(selected, decision, self.stages)
        batch.put(logits, selected)
        bits = 1 << torch.arange(MAX_GATES, device=logits.device)
        east = decision.east_gate.cpu()
        self.east_gate[batch.indices] = east.numpy()
        if self._publisher is not None:
            entropy = torch.stack((decision.entropy, decision.varentropy)).cpu().tolist()
            columns = (decision.temperature.unsqueeze(1),
                       (decision.fired * bits).sum(1, keepdim=True),
                       (decision.on * bits).sum(1, keepdim=True),
                       decision.east_gate.unsqueeze(1), decision.signals)
            values = torch.cat([c.double() for c in columns], 1)
            self._publisher.publish(StepTelemetry(
                ids=[row.steer_id for row in batch.states], positions=positions,
                entropy=entropy[0], varentropy=entropy[1], method=NAME,
                values=values.cpu().tolist()))
        return logits


class GatesPart(WorkerPart):
    """Adds a gated row's EAST vectors to its generated token rows while the gate that holds
    them is on (the gate processor's `east_gate`, decided at the previous token)."""

    def __init__(self, runner, table) -> None:
        super().__init__(runner, table)
        self.processor = processor_of(runner, GateProcessor)

    @property
    def active(self) -> bool:
        return any(any(row.setting.steering.gated) for row in self.processor.rows.values())

    def before_forward(self, step: LayerStep) -> None:
        east_gate = self.processor.east_gate
        steered = [(row.setting.steering, *step.tokens(i), int(east_gate[i]))
                   for i, row in self.processor.rows.items()
                   if i < step.num_reqs and any(row.setting.steering.gated)]
        step.wrote(fill_coefficients(step.coefficients, steered))
