"""Locally typical sampling (Meister et al. 2022, arXiv 2202.00666), engine-free.

Keep the tokens whose surprisal -log p is closest to the entropy H, in order of |-log p - H|,
until their probability mass reaches τ (the crossing token is kept, ties at the cut-off too).
The kept set is the one HF transformers' `TypicalLogitsWarper` computes (with
min_tokens_to_keep = 1, which the rule always satisfies), batched with one τ per row.

HF sorts the whole vocabulary. The cut-off only depends on the shortest prefix of that order
holding mass τ, which for language models is a few hundred tokens, so on a CPU this takes the
`k` most typical tokens with `topk` (already in sorted order) and widens `k` only for the rows
whose prefix holds less than τ, up to a full sort: for 16 rows of a 49k vocabulary on one CPU
thread about 5 ms instead of 48 ms. On a GPU one full sort is faster than several `topk`
rounds (and their host syncs), so there the first round is the whole vocabulary.

Exactness: on a CPU the kept set equals HF's bit for bit (tests/unit/test_typical.py). On a
GPU, parallel prefix sums round differently from HF's own full-length scan, so a token whose
cumulative mass lies within float rounding of τ can fall on the other side of the cut
(tests/gpu/test_cuda.py bounds this).
"""

from __future__ import annotations

import torch

FIRST_PREFIX = 256
PREFIX_GROWTH = 8


def typical_mask(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Boolean mask (rows, vocab), True where a token is *removed* by typical sampling.

    logits: (rows, vocab) scores the sampler will draw from (already temperature-scaled).
    mass: (rows,) τ per row in (0, 1]; τ = 1 keeps every token.
    """
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nansum(dim=-1, keepdim=True)
    # |-log p - H| (bit for bit: IEEE negation is exact); masked (-inf) tokens get +inf.
    shifted = (logp + entropy).abs_()
    mass = mass.to(device=logits.device, dtype=probs.dtype)
    threshold = torch.full_like(mass, float("inf"))
    vocab = logits.shape[-1]
    rows = torch.nonzero(mass < 1).flatten()
    k = vocab if logits.is_cuda else min(FIRST_PREFIX, vocab)
    all_rows = rows.numel() == logits.shape[0]
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
    return shifted > threshold.unsqueeze(1)


def apply_typical(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Set the removed tokens' logits to -inf, in place; returns `logits`."""
    return logits.masked_fill_(typical_mask(logits, mass), float("-inf"))
