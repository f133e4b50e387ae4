"""Top-nσ (`steering.methods.top_nsigma`) against the paper's formula in float64 and against
llama.cpp's sampler restated step by step in float32, and its processor's batch bookkeeping,
without an engine."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from steering.methods.top_nsigma.adapter import TopNSigmaProcessor
from steering.methods.top_nsigma.core import apply_top_nsigma, top_nsigma_removed
from steering.runtime.keys import method_key

VOCAB = 500
MARGIN = 1e-4  # tokens this close to the cut may fall either way between implementations


def random_logits(rows: int, seed: int, masked: float = 0.2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=generator) * 5 + 0.5
    logits = torch.randn(rows, VOCAB, generator=generator) * scale
    mask = torch.rand(rows, VOCAB, generator=generator) < masked
    mask[:, 0] = False
    return logits.masked_fill(mask, -torch.inf)


def paper_kept(row: np.ndarray, n: float) -> tuple[np.ndarray, float]:
    """The paper's rule in float64: l ≥ max − n·σ over the finite logits; and the cut."""
    finite = row[np.isfinite(row)].astype(np.float64)
    cut = finite.max() - n * finite.std()
    return np.isfinite(row) & (row >= cut), cut


def llama_cpp_kept(row: np.ndarray, n: float) -> np.ndarray:
    """`llama_sampler_top_n_sigma_apply` (llama.cpp, src/llama-sampling.cpp) restated: float
    accumulation in list order over the finite logits, the squares in double added back into
    a float (C++'s `pow(float, 2)`), then logits below max − n·std become −∞."""
    f32 = np.float32
    top, total, count = f32(row[0]), f32(0), 0
    for x in row:
        if x != -np.inf:
            top = max(top, f32(x))
            total = f32(total + f32(x))
            count += 1
    mean = f32(total / f32(count))
    acc = f32(0)
    for x in row:
        if x != -np.inf:
            d = float(f32(x) - mean)
            acc = f32(float(acc) + d * d)
    std = f32(math.sqrt(acc / f32(count)))
    cut = f32(top - f32(n) * std)
    return np.array([x != -np.inf and not f32(x) < cut for x in row])


@pytest.mark.parametrize("n", [0.3, 1.0, 2.5])
def test_the_kept_set_is_the_papers_and_llama_cpps(n):
    logits = random_logits(24, seed=int(n * 10))
    removed = top_nsigma_removed(logits, torch.full((24,), n))
    compared = 0
    for r, row in enumerate(logits.numpy()):
        want, cut = paper_kept(row, n)
        near = np.isfinite(row) & (np.abs(row - cut) < MARGIN * max(1.0, abs(cut)))
        assert np.array_equal((~removed[r].numpy())[~near], want[~near]), r
        assert np.array_equal(llama_cpp_kept(row, n)[~near], want[~near]), r
        compared += int(want.sum() < np.isfinite(row).sum())
    assert compared > 20  # most rows were really truncated


def test_the_kept_set_does_not_depend_on_the_temperature():
    logits = random_logits(8, seed=3)
    n = torch.full((8,), 1.0)
    at_one = top_nsigma_removed(logits, n)
    for temperature in (0.3, 0.7, 1.5, 3.0):
        assert torch.equal(top_nsigma_removed(logits / temperature, n), at_one), temperature


def test_zero_keeps_the_maximum_and_infinity_keeps_everything():
    logits = random_logits(6, seed=4)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1  # a tie at the top: both kept
    kept = ~top_nsigma_removed(logits, torch.zeros(6))
    assert kept[0].nonzero().flatten().tolist() == [7, 9]
    assert (kept.sum(-1)[1:] == 1).all()
    assert torch.equal(kept[1:].float().argmax(-1), logits[1:].argmax(-1))
    untouched = apply_top_nsigma(logits.clone(), torch.full((6,), math.inf))
    assert torch.equal(untouched, logits)
    single = torch.full((1, VOCAB), -torch.inf)
    single[0, 3] = 2.0  # σ = 0 over one finite logit: it stays, whatever n
    for n in (0.0, 1.0, math.inf):
        assert torch.equal(apply_top_nsigma(single.clone(), torch.tensor([n])), single)


CONFIG = SimpleNamespace(additional_config={})


def params(n=None, temperature=1.0):
    return SamplingParams(temperature=temperature,
                          extra_args={} if n is None else {method_key("top_nsigma"): n})


def update(batch_size, added=(), removed=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed),
                       added=[(i, p, None, []) for i, p in added], moved=list(moved))


def test_the_processor_follows_the_batch_and_masks_only_its_rows():
    proc = TopNSigmaProcessor(CONFIG, torch.device("cpu"), False)
    proc.update_state(update(4, added=[(0, params(0.5)), (1, params()), (2, params(2.0)),
                                       (3, params(1.0, temperature=0.0))]))  # greedy: skipped
    assert {i: r.setting for i, r in proc.rows.items()} == {0: 0.5, 2: 2.0}
    proc.update_state(update(4, moved=[(0, 2, MoveDirectionality.SWAP)]))
    assert {i: r.setting for i, r in proc.rows.items()} == {0: 2.0, 2: 0.5}
    logits = random_logits(4, seed=5)
    out = proc.apply(logits.clone())
    assert torch.equal(out[1], logits[1]) and torch.equal(out[3], logits[3])
    assert torch.equal(out[0], apply_top_nsigma(logits[0:1].clone(), torch.tensor([2.0]))[0])
    assert torch.equal(out[2], apply_top_nsigma(logits[2:3].clone(), torch.tensor([0.5]))[0])
    proc.update_state(update(4, removed=[0]))
    assert list(proc.rows) == [2]


@pytest.mark.parametrize("bad", [-0.5, "1", True, float("nan")])
def test_validate_params_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TopNSigmaProcessor.validate_params(params(bad))
