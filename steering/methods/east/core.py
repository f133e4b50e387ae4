"""EAST, entropic activation steering (Rahn, D'Oro, Bellemare 2024, arXiv 2406.00244), engine-free.

A steering vector u is added, scaled by β, to the residual stream after decoder layer l:
h_l ← h_l + β·u. This module builds the per-token coefficients that say which vector applies to
which token row of an engine step, with which scale, at which layer; the engine adapter turns
them into `coefficients @ vectors` inside the model.

Positions: "generated" steers every position that predicts a generated token, i.e. the last
prompt token and every generated token (so the first generated token is already steered, which
matters when the answer is a single token); "all" steers every position, prompt included.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch


@dataclass(frozen=True)
class VectorUse:
    """One vector applied by one request: table slot, scale β, decoder layer, and whether
    prompt positions are steered too."""

    slot: int
    scale: float
    layer: int
    all_positions: bool = False


@dataclass(frozen=True)
class RequestSteering:
    """What one request asks of the decoder layers: vector uses, and per closed-loop gate
    (`steering.methods.gates`) the vector uses of its EAST action, applied at generated
    positions only, in the steps the gate processor says that gate's action holds."""

    uses: tuple[VectorUse, ...]
    prompt_len: int
    gated: tuple[tuple[VectorUse, ...], ...] = ()

    def first_steered_position(self, use: VectorUse) -> int:
        return 0 if use.all_positions else max(self.prompt_len - 1, 0)


def fill_coefficients(
    coefficients: np.ndarray,
    steered: list[tuple[RequestSteering, int, int, int, int]],
) -> int:
    """Add one step's coefficients (layers, tokens, slots); zero elsewhere is the caller's.
    Returns one past the last token row of a steered request (0: none).

    steered: (steering, first token row, end token row, positions computed before the step,
    the gate whose EAST action holds or -1) for each steered request of the step. Token row r
    of a request sits at sequence position computed + (r - first row).
    """
    last = 0
    for steering, start, end, computed, gate in steered:
        last = max(last, end)
        for use in steering.uses:
            first = start + max(steering.first_steered_position(use) - computed, 0)
            if first < end:
                coefficients[use.layer, first:end, use.slot] += use.scale
        if gate >= 0:
            first = start + max(steering.prompt_len - computed, 0)
            for use in steering.gated[gate] if first < end else ():
                coefficients[use.layer, first:end, use.slot] += use.scale
    return last


def action_entropy(actions: list[str | None]) -> float | None:
    """Entropy (nats) of the empirical distribution of the valid (non-None) actions; None if
    there is no valid action."""
    valid = [a for a in actions if a is not None]
    if not valid:
        return None
    counts = np.unique(np.array(valid, dtype=object), return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


class Centring(str, Enum):
    """What each activation is centred on before the entropy weighting."""

    RUN = "run"  # its own run's mean over the run's steps: the paper's Eq. 1
    GLOBAL = "global"  # the mean over every prompt: this project's first reading
    NONE = "none"  # nothing: the plain entropy-weighted mean


def east_vector(activations: torch.Tensor, entropies: torch.Tensor,
                centring: Centring = Centring.GLOBAL,
                runs: torch.Tensor | None = None) -> torch.Tensor:
    """EAST steering vector from activations z (N, d) at each prompt's last token and the
    entropies h (N,) of their sampled actions' empirical distributions.

    Eq. 1 of the paper: u = Σ_k Σ_t h_t^k (z_t^k − z̄^k) / Σ_k Σ_t h_t^k, with z̄^k the mean of
    run k's activations over its steps (`Centring.RUN`; `runs` (N,) names each row's run), so
    what every step of a run shares (its bandit, its history so far) cancels. A NaN entropy (no
    sampled action was valid) weighs nothing, but the activation stays in its mean: Eq. 1's
    mean runs over every step. No rescaling: β multiplies this u, as in the paper.
    """
    z = activations.double()
    h = entropies.double().nan_to_num(0.0)
    if h.sum() <= 0:
        raise ValueError("every action distribution has zero entropy: no direction to weight")
    if centring is Centring.RUN:
        if runs is None:
            raise ValueError("centring on each run's mean needs each prompt's run")
        run_of_row = torch.unique(runs, return_inverse=True)[1]
        sums = torch.zeros(int(run_of_row.max()) + 1, z.shape[1], dtype=z.dtype)
        sums.index_add_(0, run_of_row, z)
        z = z - (sums / torch.bincount(run_of_row)[:, None])[run_of_row]
    elif centring is Centring.GLOBAL:
        z = z - z.mean(dim=0)
    return (h @ z / h.sum()).float()


def contrastive_vector(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean activation difference between two prompt sets (activation addition)."""
    return (positive.double().mean(dim=0) - negative.double().mean(dim=0)).float()
