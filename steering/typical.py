"""Locally typical sampling (Meister et al. 2022, arXiv 2202.00666), engine-free.

Keep the tokens whose surprisal -log p is closest to the entropy H, in order of |-log p - H|,
until their probability mass reaches τ (the crossing token is kept, ties at the cut-off too).
The computation follows HF transformers' `TypicalLogitsWarper` step for step, batched with one τ
per row, so the kept set is identical to HF's.
"""

from __future__ import annotations

import torch


def typical_mask(
    logits: torch.Tensor, mass: torch.Tensor, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Boolean mask (rows, vocab), True where a token is *removed* by typical sampling.

    logits: (rows, vocab) scores the sampler will draw from (already temperature-scaled).
    mass: (rows,) τ per row in (0, 1]; τ = 1 keeps every token.
    """
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).nansum(dim=-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shifted, order = torch.sort(shifted, dim=-1)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass.to(cumulative.dtype).unsqueeze(1)).sum(dim=-1, keepdim=True)
    last.clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(-1, last)
    remove_sorted[:, :min_tokens_to_keep] = False
    remove_sorted &= (mass < 1).to(remove_sorted.device).unsqueeze(1)  # τ = 1: sampling untouched
    return remove_sorted.scatter(-1, order, remove_sorted)


def apply_typical(
    logits: torch.Tensor, mass: torch.Tensor, min_tokens_to_keep: int = 1
) -> torch.Tensor:
    """Set the removed tokens' logits to -inf, in place; returns `logits`."""
    return logits.masked_fill_(typical_mask(logits, mass, min_tokens_to_keep), float("-inf"))
