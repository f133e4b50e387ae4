"""The engine-free cores and the steerable-layer buffers on a CUDA device (skipped without one).

Run on a GPU host: `pytest tests/gpu`. CI has no GPU; these ran on the lent machine (see
docs/benchmarks.md for the card and the date).
"""

import pytest
import torch
from torch import nn
from transformers.generation.logits_process import TypicalLogitsWarper

from steering.entropy import entropy_varentropy
from steering.methods.typical.core import CutoffSearch, typical_mask
from steering.runtime.layers import SteerableLayer, SteeringTable

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("search", list(CutoffSearch))
@pytest.mark.parametrize("mass", [0.2, 0.9, 0.99])
def test_typical_mask_on_cuda_matches_hf_on_cuda(mass, search):
    """Same kept set as HF's warper on the same device, up to tokens at the cut-off whose
    cumulative mass is within float rounding of τ."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 151_936, generator=g) * 3).to(CUDA)
    expected = torch.isinf(torch.cat([TypicalLogitsWarper(mass=mass)(None, r[None].clone())
                                      for r in logits]))
    got = typical_mask(logits, torch.full((8,), mass, device=CUDA), search)
    probs = logits.softmax(-1)
    for row in range(8):
        differ = (got[row] != expected[row]).nonzero().flatten()
        assert differ.numel() <= 2, f"row {row}: {differ.numel()} tokens differ"
        kept_mass = probs[row][~got[row]].sum().item()
        hf_mass = probs[row][~expected[row]].sum().item()
        assert abs(kept_mass - hf_mass) < 1e-4


def test_radix_typical_is_the_cuda_default_and_replays_in_a_cuda_graph():
    """No host sync inside the radix search, and a captured graph follows new logits and τ."""
    assert CutoffSearch.default_for(CUDA) is CutoffSearch.RADIX
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 151_936, generator=g) * 3).to(CUDA)
    mass = torch.full((16,), 0.9, device=CUDA)
    typical_mask(logits, mass)  # warm up the allocator and kernels outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        typical_mask(logits, mass)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        removed = typical_mask(logits, mass)
    fresh = (torch.randn(16, 151_936, generator=g) * 2).to(CUDA)
    logits.copy_(fresh)
    mass.copy_(torch.linspace(0.1, 1.0, 16, device=CUDA))
    graph.replay()
    assert torch.equal(removed, typical_mask(fresh, mass.clone()))


def test_entropy_on_cuda_matches_cpu():
    logits = torch.randn(16, 50_000) * 4
    h_cpu, v_cpu = entropy_varentropy(logits)
    h, v = entropy_varentropy(logits.to(CUDA))
    torch.testing.assert_close(h.cpu(), h_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.cpu(), v_cpu, rtol=1e-3, atol=1e-3)


class PairLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64)

    def forward(self, hidden, residual):
        return self.linear(hidden), hidden if residual is None else residual + hidden


def test_steerable_layers_inside_a_cuda_graph_follow_buffer_updates():
    """Coefficients written after graph capture steer the replay; capture rows are read."""
    torch.manual_seed(0)
    table = SteeringTable(num_layers=2, max_tokens=16, hidden_size=64, slots=2,
                          dtype=torch.float32, device=CUDA, capture_rows=2)
    layers = nn.ModuleList([SteerableLayer(PairLayer(), i, table) for i in range(2)]).to(CUDA)
    x = torch.randn(16, 64, device=CUDA)

    def model(inp):
        h, r = inp, None
        for layer in layers:
            h, r = layer(h, r)
        return h + r

    with torch.no_grad():
        model(x)  # warm-up on a side stream, as CUDA graph capture needs
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        plain = model(x).clone()
        table.vectors[0] = torch.randn(64, device=CUDA)
        table.coefficients[1, 5, 0] = 3.0
        table.capture_rows[:] = torch.tensor([5, 0], device=CUDA)
        graph.replay()
        steered_eager = model(x)
        torch.testing.assert_close(out, steered_eager)
        assert not torch.allclose(out[5], plain[5]) and torch.allclose(out[4], plain[4])
        table.coefficients.zero_()
        graph.replay()
        torch.testing.assert_close(out, plain)
        assert torch.isfinite(table.captured).all() and table.captured[1, 0].abs().sum() > 0
