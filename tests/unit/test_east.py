"""EAST coefficients and the steerable-layer wrapper, without an engine."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from steering.methods.east.core import RequestSteering, VectorUse, fill_coefficients
from steering.runtime.layers import (
    SteerableLayer,
    SteeringTable,
    decoder_layers,
    install_steerable_layers,
)


def test_generated_positions_start_at_the_last_prompt_token():
    coeff = np.zeros((3, 12, 2), dtype=np.float32)
    # A 5-token prompt prefilled in one step (rows 0-4), and a decoding request (row 5) with
    # 9 tokens already computed, steered on all positions with two vectors at two layers.
    prefill = RequestSteering((VectorUse(slot=0, scale=2.0, layer=1),), prompt_len=5)
    decode = RequestSteering((VectorUse(1, -1.5, 0, all_positions=True),
                              VectorUse(0, 0.5, 2, all_positions=True)), prompt_len=4)
    fill_coefficients(coeff, [(prefill, 0, 5, 0, -1), (decode, 5, 6, 9, -1)])
    assert coeff[1, :5, 0].tolist() == [0, 0, 0, 0, 2.0]
    assert coeff[0, 5, 1] == -1.5 and coeff[2, 5, 0] == 0.5
    assert np.count_nonzero(coeff) == 3


def test_chunked_prefill_steers_only_the_chunk_holding_generated_positions():
    coeff = np.zeros((1, 8, 1), dtype=np.float32)
    steering = RequestSteering((VectorUse(0, 1.0, 0),), prompt_len=10)
    fill_coefficients(coeff, [(steering, 0, 4, 0, -1)])  # prompt tokens 0-3: none steered
    assert not coeff.any()
    fill_coefficients(coeff, [(steering, 0, 6, 4, -1)])  # tokens 4-9: the last one is steered
    assert coeff[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1.0, 0, 0]


def test_a_gated_vector_steers_generated_positions_only_while_its_gate_holds():
    coeff = np.zeros((2, 8, 2), dtype=np.float32)
    steering = RequestSteering((), prompt_len=4, gated=((VectorUse(1, 3.0, 1),),
                                                         (VectorUse(0, -2.0, 0),)))
    # a recomputed sequence (after preemption): prompt positions 0-3, generated position 4
    fill_coefficients(coeff, [(steering, 0, 5, 0, 0)])
    assert coeff[1, :, 1].tolist() == [0, 0, 0, 0, 3.0, 0, 0, 0]
    coeff.fill(0)
    fill_coefficients(coeff, [(steering, 2, 3, 6, 1), (steering, 3, 4, 6, -1)])  # decoding
    assert coeff[0, 2, 0] == -2.0 and np.count_nonzero(coeff) == 1


def test_capture_row_is_the_last_prompt_token_when_this_step_computes_it():
    from steering.methods.hidden_states.adapter import capture_row

    assert capture_row(10, start=3, end=7, computed=0) is None  # chunk of tokens 0-3
    assert capture_row(10, start=3, end=9, computed=4) == 8  # tokens 4-9: 9 is last
    assert capture_row(10, start=0, end=1, computed=10) is None  # decoding


def test_same_vector_twice_adds_up():
    coeff = np.zeros((1, 2, 1), dtype=np.float32)
    steering = RequestSteering((VectorUse(0, 1.0, 0), VectorUse(0, 2.5, 0)), prompt_len=1)
    fill_coefficients(coeff, [(steering, 0, 2, 0, -1)])
    assert coeff[0, :, 0].tolist() == [3.5, 3.5]


class PairLayer(nn.Module):
    """A stand-in vLLM decoder layer: returns (hidden_states, residual)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, positions, hidden_states, residual):
        return self.linear(hidden_states), hidden_states if residual is None else residual


def test_wrapper_adds_coefficients_times_vectors_to_hidden_output_only():
    table = SteeringTable(num_layers=2, max_tokens=8, hidden_size=4, slots=2,
                          dtype=torch.float32, device=torch.device("cpu"), capture_rows=2)
    inner = PairLayer()
    layer = SteerableLayer(inner, index=1, table=table)
    x = torch.randn(3, 4)
    plain_h, plain_r = inner(None, x, None)
    table.vectors[0] = torch.tensor([1.0, 0, 0, 0])
    table.vectors[1] = torch.tensor([0, 0, 0, 1.0])
    table.coefficients[1, 2, 0] = 3.0
    table.coefficients[1, 2, 1] = -1.0
    table.coefficients[0, :, :] = 100.0  # another layer's coefficients do not leak in
    table.capture_rows[:] = torch.tensor([2, 0])
    h, r = layer(None, x, None)
    assert torch.equal(r, plain_r)
    assert torch.equal(h[:2], plain_h[:2])
    torch.testing.assert_close(h[2], plain_h[2] + torch.tensor([3.0, 0, 0, -1.0]))
    # Capture keeps the residual stream (steered hidden + residual) at the chosen rows.
    torch.testing.assert_close(table.captured[1, 0], h[2] + r[2])
    torch.testing.assert_close(table.captured[1, 1], h[0] + r[0])


def test_install_wraps_every_layer_and_shares_one_table():
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([PairLayer() for _ in range(3)])
    config = SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=16),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=None),
        model_config=SimpleNamespace(get_hidden_size=lambda: 4, dtype=torch.float32))
    install_steerable_layers(model, config, slots=4, capture_rows=2)
    name, layers = decoder_layers(model)
    assert name == "model.layers" and all(isinstance(m, SteerableLayer) for m in layers)
    assert len({id(m.table) for m in layers}) == 1
    assert model.steering_table.coefficients.shape == (3, 16, 4)


def test_action_entropy():
    from steering.methods.east.core import action_entropy

    assert action_entropy(["A", "A", None]) == 0.0
    assert action_entropy(["A", "B"]) == pytest.approx(np.log(2))
    assert action_entropy([None, None]) is None


def test_east_vector_is_the_entropy_weighted_centred_mean():
    from steering.methods.east.core import Centring, contrastive_vector, east_vector

    a = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]])
    h = torch.tensor([0.0, 1.0, 3.0])
    centred = a - a.mean(0)
    torch.testing.assert_close(east_vector(a, h), (1 * centred[1] + 3 * centred[2]) / 4)
    torch.testing.assert_close(east_vector(a, h, Centring.NONE), (a[1] + 3 * a[2]) / 4)
    # a prompt without a valid action weighs nothing but stays in the mean
    torch.testing.assert_close(east_vector(a, torch.tensor([float("nan"), 1.0, 3.0])),
                               east_vector(a, h))
    with pytest.raises(ValueError):
        east_vector(a, torch.zeros(3))
    torch.testing.assert_close(contrastive_vector(a[1:], a[:1]), torch.tensor([3.0, 3.0]))


def test_east_vector_centres_each_activation_on_its_own_run():
    """Eq. 1 of Rahn et al. written out as its two sums, against runs of unequal length in
    shuffled order, one step without a valid action (NaN) and run ids that are not 0..K-1."""
    from steering.methods.east.core import Centring, east_vector

    generator = torch.Generator().manual_seed(0)
    runs = torch.tensor([7, 3, 7, 7, 11, 3, 11, 7, 3])
    noise = torch.randn(len(runs), 5, generator=generator, dtype=torch.float64)
    z = noise + 10 * runs[:, None]  # what a run's steps share
    h = torch.rand(len(runs), generator=generator, dtype=torch.float64)
    h[4] = float("nan")
    numerator, total = torch.zeros(5, dtype=torch.float64), 0.0
    for k in runs.unique().tolist():
        steps = [i for i in range(len(runs)) if runs[i] == k]
        mean = sum(z[i] for i in steps) / len(steps)  # (1/T) Σ_t' z_t'^k, NaN step included
        for i in steps:
            weight = 0.0 if torch.isnan(h[i]) else float(h[i])
            numerator += weight * (z[i] - mean)
            total += weight
    got = east_vector(z, h, Centring.RUN, runs)
    torch.testing.assert_close(got, (numerator / total).float())
    # what a run's steps share cancels under per-run centring, not under the global one
    torch.testing.assert_close(got, east_vector(noise, h, Centring.RUN, runs))
    assert not torch.allclose(east_vector(z, h, Centring.GLOBAL),
                              east_vector(noise, h, Centring.GLOBAL), atol=0.1)
    with pytest.raises(ValueError, match="run"):
        east_vector(z, h, Centring.RUN)
