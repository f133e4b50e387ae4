"""Locally typical sampling (Meister et al. 2022, arXiv 2202.00666), engine-free.

Keep the tokens whose surprisal -log p is closest to the entropy H, in order of |-log p - H|,
until their probability mass reaches τ (the crossing token is kept, ties at the cut-off too).
The kept set is the one HF transformers' `TypicalLogitsWarper` computes (with
min_tokens_to_keep = 1, which the rule always satisfies), batched with one τ per row.

HF sorts the whole vocabulary, but the cut-off is only a threshold t on |-log p - H|: the
smallest value at which the mass of the tokens at or below it reaches τ. Two searches find it
(`CutoffSearch`); each row keeps the tokens with |-log p - H| <= t.

- PREFIX (the CPU default): `topk` of the k most typical tokens (already in sorted order),
  widening k only for rows whose prefix holds less than τ, up to a full sort. Language models'
  typical sets are a few hundred tokens, so one round usually suffices; the widening reads the
  rows left on the host. On a GPU its first round is the whole vocabulary (one sort, faster
  there than several `topk` rounds and their syncs): the GPU path before RADIX.
- RADIX (the GPU default): a radix select on the float bits of |-log p - H| (non-negative
  floats order like their bit patterns as integers). A per-row mass histogram of the top 16
  bits finds the bucket holding the cut-off, a second over the low 15 bits of that bucket's
  tokens finds the exact value. Two passes over the vocabulary, no sort, no host sync and no
  data-dependent branch, so it can be captured in a CUDA graph.

Exactness: PREFIX accumulates the mass in HF's own order and equals HF bit for bit on the
unit cases (tests/unit/test_typical.py), and so does RADIX, which sums the same probabilities in
bucket order. Either can differ from HF at a token whose cumulative mass lies within float32
rounding of τ (HF's own full-length float32 cumulative sum is no closer to the exact value than
RADIX is: clients/bench_kernels.py counts both against a float64 reference). On a GPU the
histograms are summed with atomics, so such a token can also differ from run to run.
"""

from __future__ import annotations

from enum import StrEnum

import torch

FIRST_PREFIX = 256
PREFIX_GROWTH = 8
HIGH_BITS = 16  # first histogram: sign (always 0), exponent and 7 mantissa bits
LOW_BITS = 15  # second histogram: the rest of the mantissa


class CutoffSearch(StrEnum):
    """How the per-row threshold on |-log p - H| is found; both give the same kept set."""

    PREFIX = "prefix"
    RADIX = "radix"

    @classmethod
    def default_for(cls, device: torch.device) -> CutoffSearch:
        """Measured (docs/benchmarks.md): on a CPU the prefix search is faster on language
        models' distributions; on a GPU a full sort costs ~10x a sampling step."""
        return cls.PREFIX if device.type == "cpu" else cls.RADIX


def typical_mask(logits: torch.Tensor, mass: torch.Tensor,
                 search: CutoffSearch | None = None) -> torch.Tensor:
    """Boolean mask (rows, vocab), True where a token is *removed* by typical sampling.

    logits: (rows, vocab) scores the sampler will draw from (already temperature-scaled).
    mass: (rows,) τ per row in (0, 1]; τ = 1 keeps every token.
    search: the cut-off search; None picks the device's default.
    """
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nansum(dim=-1, keepdim=True)
    # |-log p - H| (bit for bit: IEEE negation is exact); masked (-inf) tokens get +inf.
    shifted = (logp + entropy).abs_()
    mass = mass.to(device=logits.device, dtype=probs.dtype)
    search = search or CutoffSearch.default_for(logits.device)
    if search is CutoffSearch.RADIX:
        return _radix_removed(shifted, probs, mass)
    return shifted > _prefix_threshold(shifted, probs, mass).unsqueeze(1)


def apply_typical(logits: torch.Tensor, mass: torch.Tensor,
                  search: CutoffSearch | None = None) -> torch.Tensor:
    """Set the removed tokens' logits to -inf, in place; returns `logits`."""
    return logits.masked_fill_(typical_mask(logits, mass, search), float("-inf"))


def _prefix_threshold(shifted: torch.Tensor, probs: torch.Tensor,
                      mass: torch.Tensor) -> torch.Tensor:
    """Per-row threshold from HF's cumulative sum over a growing sorted prefix (+inf: keep all)."""
    threshold = torch.full_like(mass, float("inf"))
    vocab = shifted.shape[-1]
    rows = torch.nonzero(mass < 1).flatten()
    k = vocab if shifted.is_cuda else min(FIRST_PREFIX, vocab)
    all_rows = rows.numel() == shifted.shape[0]
    while rows.numel():
        candidates = shifted if all_rows else shifted[rows]
        values, order = torch.topk(candidates, k, dim=-1, largest=False, sorted=True)
        cumulative = (probs if all_rows else probs[rows]).gather(-1, order).cumsum(dim=-1)
        row_mass = mass[rows].unsqueeze(1)
        reached = cumulative[:, -1] >= row_mass[:, 0]
        if k < vocab:
            done = reached
        else:  # the whole order: cut where HF cuts, clamped to the last token
            done = torch.ones_like(reached)
        last = (cumulative[done] < row_mass[done]).sum(dim=-1, keepdim=True).clamp_(max=k - 1)
        threshold[rows[done]] = values[done].gather(-1, last).squeeze(1)
        rows = rows[~done]
        all_rows = False
        k = min(k * PREFIX_GROWTH, vocab)
    return threshold


def _radix_removed(shifted: torch.Tensor, probs: torch.Tensor,
                   mass: torch.Tensor) -> torch.Tensor:
    """Removed tokens from a two-digit radix select of the threshold (no sort, no host sync).

    The threshold is the smallest key whose at-or-below mass reaches τ: the key of HF's
    crossing token. Where the total mass rounds below τ, HF clamps to its last sorted token and
    keeps everything; so does this.
    """
    rows = shifted.shape[0]
    key = shifted.float().view(torch.int32).long()
    mass = mass.unsqueeze(1)
    high = key >> LOW_BITS
    high_mass = probs.new_zeros(rows, 1 << HIGH_BITS).scatter_add_(1, high, probs)
    high_cumulative = high_mass.cumsum(dim=1)
    bucket = (high_cumulative < mass).sum(dim=1, keepdim=True).clamp_(max=(1 << HIGH_BITS) - 1)
    below = high_cumulative.gather(1, bucket) - high_mass.gather(1, bucket)
    low_mass = probs.new_zeros(rows, 1 << LOW_BITS).scatter_add_(
        1, key & ((1 << LOW_BITS) - 1), torch.where(high == bucket, probs, 0.0))
    # Rounding can leave the bucket's own sum a hair under τ - below: stop at its last token.
    digits = torch.arange(1 << LOW_BITS, device=key.device)
    last = torch.where(low_mass > 0, digits, 0).amax(dim=1, keepdim=True)
    low = torch.minimum((low_mass.cumsum(dim=1) < mass - below).sum(dim=1, keepdim=True), last)
    keep_all = (mass >= 1) | (high_cumulative[:, -1:] < mass)
    threshold = torch.where(keep_all, torch.iinfo(torch.int32).max, (bucket << LOW_BITS) | low)
    return key > threshold
