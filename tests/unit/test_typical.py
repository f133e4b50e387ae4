"""Typical sampling equals HF transformers' TypicalLogitsWarper, kept set and all, with either
cut-off search (the CPU's prefix search and the GPU's radix select, both run here on CPU)."""

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from transformers.generation.logits_process import TypicalLogitsWarper

from steering.methods.typical.core import CutoffSearch, apply_typical, typical_mask

VOCAB = 512
SEARCHES = pytest.mark.parametrize("search", list(CutoffSearch))


def hf_reference(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """HF's warper, one row at a time; τ = 1 means HF adds no warper at all."""
    if mass >= 1:
        return scores.clone()
    return TypicalLogitsWarper(mass=mass)(None, scores.clone())


def adversarial_logits() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cases = {
        "random": torch.randn(6, VOCAB, generator=g) * 3,
        "peaked": torch.cat([torch.full((3, 1), 30.0), torch.randn(3, VOCAB - 1, generator=g)], 1),
        "flat": torch.zeros(3, VOCAB),
        "two_level_ties": torch.tensor([[2.0] * 10 + [0.0] * (VOCAB - 10)] * 2),
        "masked": torch.randn(4, VOCAB, generator=g),
        "few_alive": torch.full((2, VOCAB), float("-inf")),
    }
    cases["masked"][:, ::3] = float("-inf")
    cases["few_alive"][:, :4] = torch.tensor([1.0, 0.5, 0.5, -1.0])
    return cases


@SEARCHES
@pytest.mark.parametrize("case", list(adversarial_logits()))
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.0, 1.5])
@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_matches_hf_warper(case, temperature, mass, search):
    logits = adversarial_logits()[case]
    scaled = logits / temperature
    expected = torch.cat([hf_reference(row[None], mass) for row in scaled])
    got = apply_typical(scaled.clone(), torch.full((len(scaled),), mass), search)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got, expected)


@SEARCHES
def test_per_row_mass_in_one_batch(search):
    """One batched call with a different τ per row equals HF row by row."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, VOCAB, generator=g) * 2
    masses = torch.tensor([0.1, 0.3, 0.6, 0.9, 1.0])
    got = apply_typical(logits.clone(), masses, search)
    for row, mass, out in zip(logits, masses.tolist(), got):
        assert torch.equal(out, hf_reference(row[None], mass)[0])


@SEARCHES
def test_keeps_at_least_one_token_and_the_crossing_token(search):
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    removed = typical_mask(logits, torch.tensor([1e-6]), search)
    assert (~removed).sum() >= 1
    # A mass just above the first kept token's probability keeps the crossing token too.
    probs = logits.softmax(-1)[0]
    removed_small = typical_mask(logits, torch.tensor([1e-6]), search)[0]
    first = int((~removed_small).nonzero()[0])
    removed_more = typical_mask(logits, torch.tensor([float(probs[first]) + 1e-3]), search)[0]
    assert (~removed_more).sum() == 2


@SEARCHES
def test_can_exclude_the_argmax(search):
    """Typical sampling is not top-p: a peaked-but-atypical argmax can go."""
    logits = torch.tensor([[0.4, 0.3, 0.3]]).log()
    removed = typical_mask(logits, torch.tensor([0.5]), search)[0]
    assert removed.tolist() == [True, False, False]


@SEARCHES
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_large_vocabulary_every_prefix_width(scale, search):
    """A vocabulary wider than the first prefixes: rows end at each widening step."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 20_000, generator=g) * scale
    masses = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.99, 0.999])
    got = typical_mask(logits, masses, search)
    for row, mass, removed in zip(logits, masses.tolist(), got):
        assert torch.equal(removed, torch.isinf(hf_reference(row[None], mass)[0]))


def test_radix_search_has_no_data_dependent_branch():
    """The GPU path traces into one graph (no host sync, no data-dependent shape or branch), the
    condition for capturing it in a CUDA graph; the prefix search cannot."""
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    masses = torch.tensor([0.2, 0.9, 1.0])
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, m: typical_mask(x, m, CutoffSearch.RADIX),
                             backend="eager", fullgraph=True)
    assert torch.equal(compiled(logits, masses), typical_mask(logits, masses))
    with pytest.raises(GuardOnDataDependentSymNode):  # `while rows.numel()`
        torch.compile(lambda x, m: typical_mask(x, m, CutoffSearch.PREFIX),
                      backend="eager", fullgraph=True)(logits, masses)


@pytest.mark.parametrize("mass", [0.99, 0.999])
def test_radix_is_as_close_to_exact_arithmetic_as_hf(mass):
    """On a 49k vocabulary near τ = 1 float32 rounding moves the cut by some tokens in any
    summation order: the radix select's kept set is no further from HF's warper run in float64
    than HF's own float32 warper is."""
    logits = torch.randn(8, 49_152, generator=torch.Generator().manual_seed(5)) * 3
    exact = torch.isinf(hf_reference(logits.double(), mass))
    hf = torch.isinf(hf_reference(logits, mass))
    radix = typical_mask(logits, torch.full((8,), mass), CutoffSearch.RADIX)
    assert (radix != exact).sum() <= (hf != exact).sum()
