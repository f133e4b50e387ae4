"""Token entropy and varentropy of next-token distributions (engine-free).

With p = softmax(logits / T):  H = -Σ p log p  and  V = Σ p (log p + H)²  (nats, nats²).
Masked entries (-inf logits, p = 0) contribute nothing, as in HF's `TypicalLogitsWarper`.
"""

from __future__ import annotations

import torch


def entropy_varentropy(
    logits: torch.Tensor, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row entropy and varentropy of `softmax(logits / temperature)`.

    logits: (rows, vocab). temperature: (rows,) or None for T = 1; a row whose temperature is
    not positive (greedy) is measured at T = 1, the model's own distribution.
    Returns two float32 tensors of shape (rows,).
    """
    scaled = logits.float()
    if temperature is not None:
        t = temperature.to(device=scaled.device, dtype=torch.float32)
        scaled = scaled / torch.where(t > 0, t, torch.ones_like(t)).unsqueeze(1)
    logp = torch.log_softmax(scaled, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nansum(dim=-1)
    varentropy = (p * (logp + entropy.unsqueeze(1)).square()).nansum(dim=-1)
    return entropy, varentropy
