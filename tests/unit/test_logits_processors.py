"""The vLLM adapters' batch bookkeeping and batched application, without an engine."""

from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering.typical import apply_typical
from steering.vllm_adapter.logits_processors import ExtraArgs, TypicalLogitsProcessor

CONFIG = SimpleNamespace(additional_config={})


def params(typical_p=None, temperature=1.0):
    extra = {} if typical_p is None else {ExtraArgs.TYPICAL_P: typical_p}
    return SamplingParams(temperature=temperature, extra_args=extra)


def update(batch_size, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed),
                       added=[(i, p, None, []) for i, p in added], moved=list(moved))


def test_rows_follow_adds_removes_moves_and_swaps():
    proc = TypicalLogitsProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(3, added=[(0, params(0.5)), (1, params()), (2, params(0.2))]))
    assert proc.rows == {0: 0.5, 2: 0.2}
    proc.update_state(update(3, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert proc.rows == {0: 0.2, 2: 0.5}
    proc.update_state(update(2, removed=[0], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc.rows == {0: 0.5}
    proc.update_state(update(2, added=[(0, params())]))  # a plain request takes the slot
    assert proc.rows == {}


def test_greedy_and_untyped_rows_are_left_alone():
    proc = TypicalLogitsProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(3, added=[(0, params(0.3, temperature=0.0)), (1, params(1.0)),
                                       (2, params(0.3))]))
    assert proc.rows == {2: 0.3}


def test_apply_masks_only_its_rows_exactly_as_the_core():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g)
    proc = TypicalLogitsProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(4, added=[(1, params(0.4)), (3, params(0.8))]))
    out = proc.apply(logits.clone())
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.equal(out[1], apply_typical(logits[1:2].clone(), torch.tensor([0.4]))[0])
    assert torch.equal(out[3], apply_typical(logits[3:4].clone(), torch.tensor([0.8]))[0])


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "0.5", True])
def test_validate_params_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        TypicalLogitsProcessor.validate_params(params(bad))


def test_entropy_trace_window_marks_unmeasured_positions():
    from steering.vllm_adapter.telemetry import EntropyTrace

    trace = EntropyTrace()
    trace.record(0, 1.0, 2.0)
    trace.record(2, 3.0, 4.0)  # position 1 was never reported
    assert trace.window(0, 4) == ([1.0, None, 3.0, None], [2.0, None, 4.0, None])
    assert trace.window(2, 3) == ([3.0], [4.0])
