"""Entropy gates and dynamic temperature (`steering.methods.gates`) against independent
references: a
scalar re-statement of the gate rules over float64 numpy entropies, llama.cpp's dynamic
temperature formula, and HF transformers' logits warpers for the sampling chain."""

import math

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TypicalLogitsWarper,
)

from steering.methods.gates.core import (
    MAX_GATES,
    Action,
    Gate,
    GatedRow,
    GateTable,
    Sampling,
    Signal,
    sample_chain,
)
from steering.methods.registry import STAGES, SteeringOptions

VOCAB = 64
TYPICAL_P = "typical_p"  # the typical method's stage: a gate action and a chain step


def numpy_entropy(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    x = logits.double().numpy()
    logp = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    finite = np.isfinite(logp)
    logp = np.where(finite, logp, 0.0)
    p = np.where(finite, np.exp(logp), 0.0)
    h = -(p * logp).sum(-1)
    return h, (p * (logp + h[:, None]) ** 2).sum(-1)


class Reference:
    """The gate rules, restated: per gate its own EMA and hold counter."""

    def __init__(self, row: GatedRow):
        self.row = row
        self.emas: list[float | None] = [None] * len(row.gates)
        self.left = [0] * len(row.gates)

    def step(self, h: float, v: float, finite: int) -> dict:
        fired, on = [], []
        for g, gate in enumerate(self.row.gates):
            e = self.emas[g]
            self.emas[g] = h if e is None else gate.ema * e + (1 - gate.ema) * h
            value = {Signal.ENTROPY: h, Signal.VARENTROPY: v,
                     Signal.ENTROPY_EMA: self.emas[g]}[gate.signal]
            hit = (gate.above is None or value > gate.above) and (
                gate.below is None or value < gate.below)
            self.left[g] = gate.hold if hit else max(self.left[g] - 1, 0)
            fired.append(hit)
            on.append(self.left[g] > 0)
        s = self.row.sampling
        temperature = s.temperature
        if s.dynatemp_range is not None and finite > 1:
            low = max(0.0, s.temperature - s.dynatemp_range)
            high = s.temperature + s.dynatemp_range
            temperature = low + (high - low) * (h / math.log(finite)) ** s.dynatemp_exponent
        chosen = {}
        for action in (*Action, TYPICAL_P):
            for g, gate in enumerate(self.row.gates):
                if on[g] and action in dict(gate.then):
                    chosen[action] = dict(gate.then)[action]
                    break
        return {"fired": fired, "on": on,
                "temperature": chosen.get(Action.TEMPERATURE, temperature),
                "min_p": chosen.get(Action.MIN_P, s.min_p),
                "typical_p": chosen.get(TYPICAL_P, s.stages.get(TYPICAL_P, 1.0)),
                "top_k": int(chosen.get(Action.TOP_K, s.top_k)),
                "east": -1 if Action.EAST not in chosen else next(
                    g for g, gate in enumerate(self.row.gates)
                    if on[g] and Action.EAST in dict(gate.then))}


def random_logits(rows: int, generator: torch.Generator, masked: float = 0.2) -> torch.Tensor:
    """Logits with varied spread (so entropies cover low and high) and some -inf entries."""
    scale = torch.rand(rows, 1, generator=generator) * 6
    logits = torch.randn(rows, VOCAB, generator=generator) * scale
    mask = torch.rand(rows, VOCAB, generator=generator) < masked
    mask[:, 0] = False
    return logits.masked_fill(mask, -torch.inf)


ROWS = [
    GatedRow(Sampling(temperature=0.8), (
        Gate(Signal.ENTROPY, above=2.0, hold=3, then=((Action.TEMPERATURE, 0.3),)),
        Gate(Signal.ENTROPY_EMA, below=2.5, ema=0.7, then=((Action.TEMPERATURE, 1.4),
                                                            (Action.EAST, 1.0))),
    )),
    GatedRow(Sampling(temperature=1.0, min_p=0.05, dynatemp_range=0.5, dynatemp_exponent=2.0), (
        Gate(Signal.VARENTROPY, above=1.0, below=6.0, hold=2, then=((Action.TOP_K, 5),)),
    )),
    GatedRow(Sampling(temperature=0.0, stages={TYPICAL_P: 0.9}), (
        Gate(Signal.ENTROPY, below=1.0, hold=1, then=((Action.MIN_P, 0.2),)),
        Gate(Signal.ENTROPY, below=3.0, hold=2, then=((Action.MIN_P, 0.1), (TYPICAL_P, 0.5))),
        Gate(Signal.ENTROPY_EMA, above=1.5, ema=0.0, then=((Action.TEMPERATURE, 0.9),)),
        Gate(Signal.ENTROPY, above=0.5, hold=4, then=((Action.EAST, 1.0),)),
    )),
    GatedRow(Sampling(temperature=0.7, top_k=10, dynatemp_range=0.3)),  # dynatemp only
]


def test_the_schema_and_the_engine_table_allow_the_same_number_of_gates():
    schema = SteeringOptions.model_json_schema()
    gates = next(v for v in schema["properties"]["gates"]["anyOf"] if v.get("type") == "array")
    assert gates["maxItems"] == MAX_GATES


def test_every_decision_matches_the_rules_restated_per_token():
    generator = torch.Generator().manual_seed(0)
    table = GateTable(capacity=8, stages=STAGES)
    batch = [5, 0, 7, 2]  # batch rows of ROWS, out of order
    for index, row in zip(batch, ROWS):
        table.set_row(index, row)
    references = [Reference(row) for row in ROWS]
    rows = torch.tensor(batch)
    fired_any = on_any = 0
    for position in range(40):
        logits = random_logits(len(batch), generator)
        h, v = numpy_entropy(logits)
        decision = table.step(rows, torch.full((len(batch),), position), logits.clone())
        assert decision.entropy.numpy() == pytest.approx(h, rel=1e-4, abs=1e-5)
        for r, ref in enumerate(references):
            want = ref.step(h[r], v[r], int(torch.isfinite(logits[r]).sum()))
            n = len(ROWS[r].gates)
            assert decision.fired[r, :n].tolist() == want["fired"], (position, r)
            assert decision.on[r, :n].tolist() == want["on"], (position, r)
            assert not decision.fired[r, n:].any() and not decision.on[r, n:].any()
            assert decision.temperature[r].item() == pytest.approx(want["temperature"],
                                                                   rel=1e-4, abs=1e-6)
            assert decision.min_p[r].item() == pytest.approx(want["min_p"])
            assert decision.stages[TYPICAL_P][r].item() == pytest.approx(want["typical_p"])
            assert decision.top_k[r].item() == want["top_k"]
            assert decision.east_gate[r].item() == want["east"]
            fired_any += sum(want["fired"])
            on_any += sum(want["on"]) - sum(want["fired"])
    assert fired_any > 20 and on_any > 10  # the gates really fired, and held past firing


def test_a_position_seen_again_starts_from_the_state_before_it():
    """vLLM discards a chunked prefill's partial sample: the same position comes again and
    must be evaluated from the state before its first evaluation, not after it."""
    row = GatedRow(Sampling(), (Gate(Signal.ENTROPY_EMA, above=-1.0, hold=5, ema=0.5,
                                     then=((Action.TEMPERATURE, 0.5),)),))
    generator = torch.Generator().manual_seed(1)
    a, b = random_logits(1, generator), random_logits(1, generator)
    once, twice = GateTable(1, stages=STAGES), GateTable(1, stages=STAGES)
    for table in (once, twice):
        table.set_row(0, row)
        table.step(torch.tensor([0]), torch.tensor([0]), a.clone())
    twice.step(torch.tensor([0]), torch.tensor([1]), random_logits(1, generator))  # discarded
    for table in (once, twice):
        table.step(torch.tensor([0]), torch.tensor([1]), b.clone())
    assert torch.equal(once.ema, twice.ema) and torch.equal(once.left, twice.left)
    h_a, h_b = (numpy_entropy(x)[0][0] for x in (a, b))
    assert once.ema[0, 0].item() == pytest.approx(0.5 * h_a + 0.5 * h_b, rel=1e-5)


def test_moves_carry_a_rows_parameters_and_state():
    generator = torch.Generator().manual_seed(2)
    moved, still = GateTable(4, stages=STAGES), GateTable(4, stages=STAGES)
    moved.set_row(1, ROWS[0])
    moved.set_row(3, ROWS[1])
    still.set_row(0, ROWS[0])
    still.set_row(2, ROWS[1])
    for position in range(3):
        logits = random_logits(2, generator)
        moved.step(torch.tensor([1, 3]), torch.tensor([position] * 2), logits.clone())
        still.step(torch.tensor([0, 2]), torch.tensor([position] * 2), logits.clone())
    moved.move(1, 0, swap=False)
    moved.move(3, 2, swap=True)
    logits = random_logits(2, generator)
    after = moved.step(torch.tensor([0, 2]), torch.tensor([3, 3]), logits.clone())
    want = still.step(torch.tensor([0, 2]), torch.tensor([3, 3]), logits.clone())
    for name in ("fired", "on", "temperature", "top_k", "east_gate"):
        assert torch.equal(getattr(after, name), getattr(want, name)), name


def hf_chain(logits: torch.Tensor, temperature: float, min_p: float, typical_p: float,
             top_k: int) -> torch.Tensor:
    """One row through HF's warpers in vLLM's order (greedy: the argmax alone)."""
    x = logits.clone().unsqueeze(0)
    if temperature < 1e-5:
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[0, x.argmax()] = True
        return x.masked_fill(~keep, -torch.inf)[0]
    ids = torch.zeros((1, 1), dtype=torch.long)
    x = TemperatureLogitsWarper(temperature)(ids, x)
    if min_p > 0:
        x = MinPLogitsWarper(min_p)(ids, x)
    if typical_p < 1:
        x = TypicalLogitsWarper(typical_p)(ids, x)
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(ids, x)
    return x[0]


def test_the_sampling_chain_is_hfs_warpers_in_vllms_order():
    generator = torch.Generator().manual_seed(3)
    table = GateTable(len(ROWS), stages=STAGES)
    for index, row in enumerate(ROWS):
        table.set_row(index, row)
    rows = torch.arange(len(ROWS))
    checked = 0
    for position in range(30):
        logits = random_logits(len(ROWS), generator, masked=0.0)
        raw = logits.clone()
        decision = table.step(rows, torch.full((len(ROWS),), position), logits)
        sample_chain(logits, decision, STAGES)
        for r in range(len(ROWS)):
            want = hf_chain(raw[r], decision.temperature[r].item(), decision.min_p[r].item(),
                            decision.stages[TYPICAL_P][r].item(), int(decision.top_k[r]))
            assert torch.equal(torch.isinf(logits[r]), torch.isinf(want)), (position, r)
            kept = ~torch.isinf(want)
            assert torch.allclose(logits[r][kept], want[kept], rtol=1e-6, atol=1e-6)
            checked += int(kept.sum() < VOCAB)
    assert checked > 40  # most rows really were truncated


def test_dynamic_temperature_keeps_the_request_temperature_for_a_single_candidate():
    table = GateTable(1, stages=STAGES)
    table.set_row(0, GatedRow(Sampling(temperature=0.6, dynatemp_range=0.5)))
    logits = torch.full((1, VOCAB), -torch.inf)
    logits[0, 3] = 1.0
    decision = table.step(torch.tensor([0]), torch.tensor([0]), logits)
    assert decision.temperature.item() == pytest.approx(0.6)
