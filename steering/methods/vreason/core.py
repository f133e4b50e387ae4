"""V-Reason (Sridhar et al. 2025, "Video Reasoning without Training", arXiv 2510.17045),
engine-free: entropy-driven tuning of the last decoder layer's value cache during decoding.

Signal. Each generated token's entropy H_k (nats, T = 1) and its exponential moving average
    m_k = β m_{k-1} + (1 - β) H_k,   m_1 = H_1,
with running peak M_k = max_{j≤k} m_j.

Objective (the paper's entropy switching loss, Fig. 2): with p_k the next-token distribution and
U the uniform distribution over the vocabulary V,
    L = α_k · KL(p_k ‖ U) = α_k (log|V| - H(p_k)),   α_k = -1 if m_k < M_k else +1.
Minimising L raises the entropy while the EMA is at its running peak (micro-exploration) and
lowers it below the peak (micro-exploitation); after the global peak the EMA never reaches M
again, so the rest of the answer only minimises entropy (macro-exploitation).

Controller. A trainable ΔV on the value vectors at the tuned positions of the last decoder layer,
applied norm-preservingly per position and head (Fig. 2):  V' = (V + ΔV) ‖V‖ / ‖V + ΔV‖.
Every `every` generated tokens, ΔV starts at zero and takes `steps` Adam steps on L, recomputing
the last layer for the newest position (its attention weights do not depend on V, so only the
attention output, the layer's MLP and the final norm are differentiated, by autograd; the LM
head's part of the gradient is in closed form, `switching_gradient`); V' is then written back
into the cache, so the edits accumulate over the answer.

What the paper does not state (its text was not readable here; the figure and reviews were):
β, lr, steps, k's default, the optimiser, and whether ΔV persists. The choices above and the
defaults in `VReasonConfig` are ours, documented in docs/vreason.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F


class Positions(StrEnum):
    """Which value vectors an update tunes."""

    PROMPT = "prompt"  # the prompt's (the paper's video tokens stand in for it)
    CONTEXT = "context"  # the whole context's: prompt and generated tokens so far


@dataclass(frozen=True)
class VReasonConfig:
    """One request's V-Reason settings: update every `every` generated tokens with `steps` Adam
    steps at learning rate `lr`; EMA coefficient `ema`; tune the prompt's value vectors or the
    whole context's (prompt and generated tokens so far)."""

    every: int = 4
    steps: int = 2
    lr: float = 0.05
    ema: float = 0.9
    positions: Positions = Positions.PROMPT


class EntropyPhase:
    """The EMA of the answer's token entropies, its running peak, and the switching sign α."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.ema: float | None = None
        self.peak = -math.inf
        self.peak_token = -1
        self.tokens = 0

    def observe(self, entropy: float) -> None:
        self.ema = entropy if self.ema is None else self.beta * self.ema + (1 - self.beta) * entropy
        if self.ema >= self.peak:
            self.peak, self.peak_token = self.ema, self.tokens
        self.tokens += 1

    @property
    def alpha(self) -> int:
        """+1 (raise entropy) while the EMA is at its running peak, -1 (lower it) below it."""
        return 1 if self.ema is not None and self.ema >= self.peak else -1


@dataclass(frozen=True)
class LastLayerTail:
    """What follows the attention of a Llama-family last decoder layer: o_proj, the residual add,
    the post-attention RMSNorm, the SwiGLU MLP, the residual add, the final RMSNorm, the LM head.
    Weights as in the checkpoint ((out, in) matrices)."""

    o_proj: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    eps: float

    def final_hidden(self, attention: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden state the LM head reads; attention: (heads × head_dim)
        attention output, residual: the layer's input."""
        hidden = residual.float() + _linear(attention, self.o_proj)
        normed = _rms_norm(hidden, self.post_attention_norm, self.eps)
        mlp = _linear(F.silu(_linear(normed, self.gate_proj)) * _linear(normed, self.up_proj),
                      self.down_proj)
        return _rms_norm(hidden + mlp, self.final_norm, self.eps)

    def logits(self, attention: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return _linear(self.final_hidden(attention, residual), self.lm_head)

    def compile(self) -> None:
        """Compile the LM head's passes for these weights now (seconds), not in the first
        update."""
        with torch.inference_mode(False), torch.no_grad():
            hidden = torch.zeros(self.lm_head.shape[1], device=self.lm_head.device)
            logits = torch.zeros(self.lm_head.shape[0], device=self.lm_head.device)
            _gradient_at_hidden(self.lm_head, hidden, torch.tensor(1.0))
            _gradient_of_logits(logits, torch.tensor(1.0))
            output_entropy(self.lm_head, hidden)


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight).float()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight.float()


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·K^T · scale) per query head; query (heads, d), keys (positions, kv_heads, d)
    -> (heads, positions). Query heads share key heads in groups (GQA)."""
    heads, kv_heads = query.shape[0], keys.shape[1]
    grouped = query.float().view(kv_heads, heads // kv_heads, -1)
    scores = torch.einsum("kgd,pkd->kgp", grouped, keys.float()) * scale
    return torch.softmax(scores, dim=-1).reshape(heads, -1)


def attention_output(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(heads, positions) weights over (positions, kv_heads, d) values -> (heads × d,)."""
    heads, kv_heads = weights.shape[0], values.shape[1]
    grouped = weights.view(kv_heads, heads // kv_heads, -1)
    return torch.einsum("kgp,pkd->kgd", grouped, values.float()).reshape(-1)


def norm_preserving(values: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """V' = (V + ΔV) ‖V‖ / ‖V + ΔV‖, per position and head (norms over the head dimension)."""
    shifted = values.float() + delta
    norm = values.float().norm(dim=-1, keepdim=True)
    return shifted * norm / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _output_log_probs(lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head · hidden), written as a row reduction so that, compiled, the
    product and the softmax are one streaming pass over the LM head."""
    return torch.log_softmax((lm_head * hidden).sum(-1, dtype=torch.float32), -1)


def _logit_gradient(logp: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H(p) and ∂L/∂z_i = α p_i (log p_i + H(p)) for L = α · KL(p ‖ U) = α (log|V| - H(p))."""
    p = logp.exp()
    entropy = -(p * logp).sum()
    return entropy, alpha * p * (logp + entropy)


@torch.compile(dynamic=False)
def output_entropy(lm_head: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """H(p), p = softmax(lm_head · hidden), in one pass over the LM head."""
    logp = _output_log_probs(lm_head, hidden)
    return -(logp.exp() * logp).sum()


@torch.compile(dynamic=False)
def _gradient_at_hidden(lm_head: torch.Tensor, hidden: torch.Tensor,
                        alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _logit_gradient(_output_log_probs(lm_head, hidden), alpha)


@torch.compile(dynamic=False)
def _gradient_of_logits(logits: torch.Tensor,
                        alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _logit_gradient(torch.log_softmax(logits.float(), -1), alpha)


def transposed_product(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """matrixᵀ · vector with the output's columns split into one batch entry per thread.

    A plain `vector @ matrix` runs MKL's transposed matrix-vector product on one thread
    however many the worker has (11 ms for SmolLM2's LM head); the batched product runs the
    same product on each column block, one per thread (7 ms with 2 threads), and every output
    element is the same sum in the same order: the result is bit for bit the plain product's,
    which the HF-parity tests need (Adam turns a near-zero gradient element's rounding into a
    whole step's sign). A compiled column reduction is faster still but sums in another
    order, and fails them."""
    rows, columns = matrix.shape
    parts = max(d for d in range(1, torch.get_num_threads() + 1) if columns % d == 0)
    if parts == 1:
        return vector @ matrix
    blocks = matrix.view(rows, parts, columns // parts).transpose(0, 1)
    return torch.bmm(vector.expand(parts, 1, rows), blocks).reshape(columns)


def switching_gradient(lm_head: torch.Tensor, hidden: torch.Tensor, alpha: torch.Tensor,
                       logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The entropy switching loss's gradient at the LM head's input, in closed form: with
    z = lm_head · hidden and p = softmax(z), L = α · KL(p ‖ U) = α (log|V| - H(p)) has
        ∂L/∂z_i = α p_i (log p_i + H(p)),   ∂L/∂hidden = lm_headᵀ ∂L/∂z.
    Returns (H(p), ∂L/∂hidden). The LM head is the update's one large matrix and reading it is
    what the update costs: the compiled forward and softmax are one streaming pass (none when
    `logits`, z already computed by the engine, are given), where autograd read it twice. The
    backward product is MKL's, as autograd's is (`transposed_product`)."""
    entropy, dz = (_gradient_at_hidden(lm_head, hidden, alpha) if logits is None
                   else _gradient_of_logits(logits, alpha))
    return entropy, transposed_product(lm_head, dz)


@dataclass(frozen=True)
class ValueUpdate:
    """One controller update: the new values at the tuned positions and what it did."""

    values: torch.Tensor  # (tuned positions, kv_heads, d), the V' to write back
    entropy_before: float  # H(p_k) with the cache as it was
    entropy_after: float  # H(p_k) with V' written
    delta_norm: float  # ‖V' - V‖ over all tuned positions


def tune_values(tail: LastLayerTail, query: torch.Tensor, residual: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, tuned: torch.Tensor, scale: float,
                alpha: int, steps: int, lr: float,
                logits: torch.Tensor | None = None) -> ValueUpdate:
    """Take `steps` Adam steps on ΔV (from zero) at positions `tuned` of the newest position's
    last-layer recomputation; keys/values: (positions, kv_heads, d), the cache up to and
    including the newest position; query: (heads, d), after RoPE; residual: the layer's input
    there; logits: the model's logits there with the cache as it is, when the engine has them
    (the first step then skips one pass over the LM head)."""
    with torch.inference_mode(False), torch.enable_grad():
        # Engines call this under inference mode: autograd needs ordinary copies of its inputs.
        query, residual, keys, values, tuned = (
            t.clone() for t in (query, residual, keys, values, tuned))
        weights = attention_weights(query, keys, scale).detach()
        fixed = values.float()
        original = fixed[tuned]
        delta = torch.zeros_like(original, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=lr)
        sign = torch.tensor(float(alpha))

        def hidden_with(shifted: torch.Tensor) -> torch.Tensor:
            full = fixed.index_put((tuned,), shifted)
            return tail.final_hidden(attention_output(weights, full), residual)

        entropy_before = None
        for step in range(steps):
            hidden = hidden_with(norm_preserving(original, delta))
            with torch.no_grad():
                entropy, gradient = switching_gradient(tail.lm_head, hidden, sign,
                                                       logits if step == 0 else None)
            if entropy_before is None:
                entropy_before = entropy  # read once, after the loop: no host sync inside it
            optimiser.zero_grad()
            hidden.backward(gradient)
            optimiser.step()
        with torch.no_grad():
            new = norm_preserving(original, delta)
            entropy_after = output_entropy(tail.lm_head, hidden_with(new))
    return ValueUpdate(new.detach(), entropy_before.item(), entropy_after.item(),
                       (new - original).norm().item())
