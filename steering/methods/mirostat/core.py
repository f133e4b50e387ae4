"""Mirostat v2 (Basu, Ramachandran, Keskar, Varshney 2021, "Mirostat: a neural text decoding
algorithm that directly controls perplexity", arXiv 2007.14966, Algorithm 2), engine-free,
batched over rows.

Each request has a target surprise τ (bits) and a learning rate η; its state μ starts at 2τ.
At each token, with p the next-token distribution (after the request's temperature):
1. keep the tokens whose surprise −log2 p_i ≤ μ (at least the most likely one);
2. renormalise the kept probabilities and sample token t from them;
3. observe its surprise s = −log2 p'_t under the renormalised distribution p' and update
   μ ← μ − η (s − τ).
As in llama.cpp's `mirostat_v2`, the observed surprise is the renormalised one and μ is not
clamped. τ = 0 keeps only the top token from the first step on (greedy).

`truncate` is steps 1–2's distribution (the sampler draws from it); `update` is step 3.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def truncate(logits: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1–2 for each row: the kept mask (rows, vocab) and the log2 probabilities of the
    renormalised kept distribution (−∞ off the kept set). logits: (rows, vocab) at the
    request's temperature; mu: (rows,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = -logp / LN2 <= mu.to(logp.device, logp.dtype).unsqueeze(1)
    keep.scatter_(1, logp.argmax(-1, keepdim=True), True)  # at least the top one
    kept = torch.log_softmax(logp.masked_fill(~keep, -torch.inf), dim=-1) / LN2
    return keep, kept


def update(mu: torch.Tensor, surprise: torch.Tensor, tau: torch.Tensor,
           eta: torch.Tensor) -> torch.Tensor:
    """Step 3: μ ← μ − η (s − τ)."""
    return mu - eta * (surprise - tau)
