"""The vLLM adapters' batch bookkeeping and batched application, without an engine."""

from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering.methods.typical.adapter import TypicalProcessor
from steering.methods.typical.core import apply_typical
from steering.runtime.keys import method_key

CONFIG = SimpleNamespace(additional_config={})


def params(typical_p=None, temperature=1.0):
    extra = {} if typical_p is None else {method_key("typical"): typical_p}
    return SamplingParams(temperature=temperature, extra_args=extra)


def update(batch_size, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed),
                       added=[(i, p, None, []) for i, p in added], moved=list(moved))


def test_rows_follow_adds_removes_moves_and_swaps():
    proc = TypicalProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(3, added=[(0, params(0.5)), (1, params()), (2, params(0.2))]))
    assert proc.rows == {0: 0.5, 2: 0.2}
    proc.update_state(update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert proc.rows == {0: 0.2, 2: 0.5}
    proc.update_state(update(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.rows == {0: 0.5}
    proc.update_state(update(2, added=[(0, params())]))  # a plain request takes the slot
    assert proc.rows == {}


def test_greedy_and_untyped_rows_are_left_alone():
    proc = TypicalProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(3, added=[(0, params(0.3, temperature=0.0)), (1, params(1.0)),
                                       (2, params(0.3))]))
    assert proc.rows == {2: 0.3}


def test_apply_masks_only_its_rows_exactly_as_the_core():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g)
    proc = TypicalProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(4, added=[(1, params(0.4)), (3, params(0.8))]))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(out[1], apply_typical(logits[1:2].clone(), torch.tensor([0.4]))[0])
    assert torch.equal(out[3], apply_typical(logits[3:4].clone(), torch.tensor([0.8]))[0])


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "0.5", True])
def test_validate_params_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        TypicalProcessor.validate_params(params(bad))


def test_entropy_trace_window_marks_unmeasured_positions():
    from steering.runtime.telemetry import EntropyTrace

    trace = EntropyTrace()
    trace.record(0, 1.0, 2.0)
    trace.record(2, 3.0, 4.0)  # position 1 was never reported
    assert trace.window(0, 4) == ([1.0, None, 3.0, None], [2.0, None, 4.0, None])
    assert trace.window(2, 3) == ([3.0], [4.0])


def test_a_continuations_trace_lands_after_the_forced_tokens():
    """The continuation's positions land `offset` (2) later, after the forced gap, which stays
    unmeasured; a second copy goes on where the first stopped and takes only what was
    measured."""
    from steering.runtime.telemetry import EntropyTrace

    trace, continuation = EntropyTrace(), EntropyTrace()
    trace.record(0, 1.0, 2.0)
    for position in range(4):
        continuation.record(position, 10.0 + position, 20.0 + position)
    trace.copy_from(continuation, 0, 2, 2)
    trace.copy_from(continuation, 2, 9, 2)  # past what was measured: only what there is
    assert trace.window(0, 7) == ([1.0, None, 10.0, 11.0, 12.0, 13.0, None],
                                  [2.0, None, 20.0, 21.0, 22.0, 23.0, None])


GATE_CONFIG = SimpleNamespace(additional_config={},
                              scheduler_config=SimpleNamespace(max_num_seqs=4))


def gated_params(temperature: float, gates: list, top_k: int = 0, seed: int | None = None):
    """A gated request's parameters as the engine hands them to vLLM (`Engine.choice`)."""
    from steering.engine.engine import methods_encoding
    from steering.methods.gates.descriptor import GateSpec

    steering = {"gates": tuple(GateSpec(g) for g in gates)}
    p = SamplingParams(temperature=temperature, top_k=top_k, seed=seed,
                       extra_args={"steer_id": "r"})
    for method in methods_encoding(steering):
        method.encode(steering[method.name], p, [], steering)
    return p


def test_the_engine_encoding_decodes_to_the_same_gates_and_hands_vllm_unit_temperature():
    from steering.methods.gates.adapter import decode_gated_row
    from steering.methods.gates.core import Action, Gate, Signal

    gates = [Gate(Signal.ENTROPY_EMA, above=1.5, hold=3, ema=0.8,
                  then=((Action.TEMPERATURE, 0.2), (Action.TOP_K, 4))),
             Gate(Signal.VARENTROPY, below=0.5, then=((Action.MIN_P, 0.1),))]
    p = gated_params(0.5, gates, top_k=7)
    assert (p.temperature, p.top_k, p.min_p) == (1.0, 0, 0.0)
    row = decode_gated_row(p.extra_args[method_key("gates")]).row
    assert row.gates == tuple(gates)
    assert (row.sampling.temperature, row.sampling.top_k, row.sampling.stages) == (0.5, 7, {})
    greedy = decode_gated_row(gated_params(0.0, gates).extra_args[method_key("gates")]).row
    assert greedy.sampling.temperature == 0.0


def test_the_gate_processor_follows_the_batch_and_applies_the_core():
    from steering.methods.gates.adapter import GateProcessor
    from steering.methods.gates.core import (
        Action,
        Gate,
        GatedRow,
        GateTable,
        Sampling,
        Signal,
        sample_chain,
    )
    from steering.methods.registry import STAGES

    hot = Gate(Signal.ENTROPY, above=-1.0, hold=1, then=((Action.EAST, 1.0),))  # always fires
    cold = Gate(Signal.ENTROPY, above=1e9, then=((Action.TEMPERATURE, 0.1),))  # never
    proc = GateProcessor(GATE_CONFIG, torch.device("cpu"), False)
    outputs = {0: [], 2: [1, 2]}
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, gated_params(0.7, [cold]), None, outputs[0]), (1, params(), None, []),
        (2, gated_params(1.0, [cold, hot]), None, outputs[2])]))
    proc.update_state(update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert sorted(proc.rows) == [0, 2] and proc.rows[0].output_token_ids == [1, 2]
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    out = proc.apply(logits.clone())
    assert torch.equal(out[1], logits[1])  # not a gated row
    reference = GateTable(2, stages=STAGES)
    reference.set_row(0, GatedRow(Sampling(temperature=1.0), (cold, hot)))
    reference.set_row(1, GatedRow(Sampling(temperature=0.7), (cold,)))
    chosen = logits[[0, 2]].clone()
    sample_chain(chosen, reference.step(torch.tensor([0, 1]), torch.tensor([2, 0]), chosen),
                 STAGES)
    assert torch.equal(out[[0, 2]], chosen)
    assert proc.east_gate[:3].tolist() == [1, -1, -1]  # row 0's second gate steers next
    proc.update_state(update(3, moved=[(0, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.east_gate[1] == 1
