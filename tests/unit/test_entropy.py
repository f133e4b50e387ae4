"""Entropy and varentropy against a direct float64 computation."""

import math

import pytest
import torch

from steering.entropy import entropy_varentropy


def direct(row: list[float], temperature: float) -> tuple[float, float]:
    finite = [x / temperature for x in row if math.isfinite(x)]
    top = max(finite)
    z = sum(math.exp(x - top) for x in finite)
    probs = [math.exp(x - top) / z for x in finite]
    h = -sum(p * math.log(p) for p in probs if p > 0)
    v = sum(p * (math.log(p) + h) ** 2 for p in probs if p > 0)
    return h, v


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_matches_direct_computation(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 300, generator=g) * 3
    logits[1, ::2] = float("-inf")
    logits[2] = 0.0  # uniform: H = log V, varentropy 0
    logits[3, 0] = 40.0  # nearly deterministic
    h, v = entropy_varentropy(logits, torch.full((4,), temperature))
    for i, row in enumerate(logits.tolist()):
        eh, ev = direct(row, temperature)
        assert h[i].item() == pytest.approx(eh, rel=1e-4, abs=1e-5)
        assert v[i].item() == pytest.approx(ev, rel=1e-3, abs=1e-4)
    assert h[2].item() == pytest.approx(math.log(300), rel=1e-6)


def test_greedy_rows_use_the_models_own_distribution():
    """Temperature 0 (greedy) is measured at T = 1."""
    logits = torch.randn(1, 50).repeat(2, 1)
    h, v = entropy_varentropy(logits, torch.tensor([0.0, 1.0]))
    assert h[0] == h[1] and v[0] == v[1]


def test_matches_torch_categorical():
    logits = torch.randn(8, 1000) * 4
    h, _ = entropy_varentropy(logits)
    reference = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(h, reference, rtol=1e-5, atol=1e-5)
