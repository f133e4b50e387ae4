"""Top-nσ sampling (Tang et al. 2024, "Top-nσ: Not All Logits Are You Need", arXiv
2411.07641), engine-free, batched over rows.

Keep the tokens whose logit l_i ≥ M − n·σ, where M is the row's largest logit and σ the
standard deviation of the row's logits (the paper's Eq. 4; σ and the mean over the finite
logits, as llama.cpp's `top_n_sigma` takes them, so that tokens already masked to −∞ do not
count). Scaling the logits by 1/T scales M and σ alike, so the kept set does not depend on the
temperature: the paper's point, high temperatures stay coherent. n = 0 keeps only the maximum
(ties too): greedy at any temperature. n = +∞ keeps every finite token (no truncation).

llama.cpp treats n ≤ 0 as "off"; here n = 0 is the paper's limit (greedy) and off is +∞.
"""

from __future__ import annotations

import torch


def top_nsigma_removed(logits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Boolean mask (rows, vocab), True where a token is removed. logits: (rows, vocab);
    n: (rows,), one n per row (+∞: keep every finite token)."""
    finite = torch.isfinite(logits)
    count = finite.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(finite, logits, 0.0).sum(-1, keepdim=True) / count
    deviation = torch.where(finite, logits - mean, 0.0)
    sigma = (deviation.square().sum(-1, keepdim=True) / count).sqrt()
    n = n.to(device=logits.device, dtype=logits.dtype).unsqueeze(1)
    # n·σ with n = ∞ and σ = 0 (one finite token) is NaN: nothing is removed then either
    cut = logits.amax(-1, keepdim=True) - torch.where(torch.isinf(n), torch.inf, n * sigma)
    return logits < cut


def apply_top_nsigma(logits: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Set the removed tokens' logits to −∞, in place; returns `logits`."""
    return logits.masked_fill_(top_nsigma_removed(logits, n), float("-inf"))
