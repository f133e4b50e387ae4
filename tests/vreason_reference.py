"""V-Reason in HF transformers on a DynamicCache: the reference the engine path is tested against.

Written from the formulas in `steering.vreason`'s docstring with HF's own modules (q_proj, RoPE,
o_proj, post-attention norm, MLP, final norm, LM head) and without any of the engine-free core,
so that the two implementations only share the paper's equations. Greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


@dataclass
class ReferenceRun:
    tokens: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)  # per generated token, T = 1
    updates: list[dict] = field(default_factory=list)  # as in the server's report


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum()


def _last_layer_logits(model, x, query, keys, values):
    """The last layer from its attention onwards, for one position; keys/values (1, kv, P, d)."""
    layer = model.model.layers[-1]
    heads = query.shape[1]
    k = repeat_kv(keys, heads // keys.shape[1])
    v = repeat_kv(values, heads // values.shape[1])
    scores = (query @ k.transpose(-1, -2)) * layer.self_attn.scaling
    attn = torch.softmax(scores.float(), -1) @ v  # (1, heads, 1, d)
    hidden = x + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(1, 1, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(model.model.norm(hidden))[0, 0]


def _update(model, cache: DynamicCache, x: torch.Tensor, tuned: torch.Tensor, alpha: int,
            steps: int, lr: float) -> dict:
    layer = model.model.layers[-1]
    attn = layer.self_attn
    position = cache.get_seq_length() - 1
    position_ids = torch.tensor([[position]])
    cos, sin = model.model.rotary_emb(x, position_ids)
    normed = layer.input_layernorm(x)
    query = attn.q_proj(normed).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    key_dummy = torch.zeros(1, 1, 1, attn.head_dim)
    query, _ = apply_rotary_pos_emb(query, key_dummy, cos, sin)
    keys = cache.layers[-1].keys.detach()
    values = cache.layers[-1].values.detach().clone()
    original = values[:, :, tuned].clone()  # (1, kv, T, d)
    norm = original.norm(dim=-1, keepdim=True)
    delta = torch.zeros_like(original, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr)
    vocab = model.config.vocab_size

    def evaluate(new_values):
        full = values.clone()
        full[:, :, tuned] = new_values
        logits = _last_layer_logits(model, x, query, keys, full)
        entropy = _entropy(logits)
        return alpha * (math.log(vocab) - entropy), entropy

    def shifted():
        moved = original + delta
        return moved * norm / moved.norm(dim=-1, keepdim=True)

    before = None
    for _ in range(steps):
        with torch.enable_grad():
            loss, entropy = evaluate(shifted())
            (delta.grad,) = torch.autograd.grad(loss, [delta])  # leaves the model's grads alone
        before = float(entropy.detach()) if before is None else before
        optimiser.step()
    with torch.no_grad():
        new = shifted()
        _, after = evaluate(new)
        cache.layers[-1].values[:, :, tuned] = new
    return {"alpha": alpha, "entropy_before": before, "entropy_after": float(after),
            "delta_norm": float((new - original).norm())}


def generate(model, prompt_ids: list[int], max_tokens: int, every: int, steps: int, lr: float,
             ema: float, positions: str = "prompt", eos: int | None = None) -> ReferenceRun:
    """Greedy decoding with V-Reason; with `steps` = 0, plain greedy decoding."""
    run = ReferenceRun()
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids])
    smoothed, peak = None, -math.inf
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
    while True:
        logits = out.logits[0, -1]
        entropy = float(_entropy(logits))
        run.entropy.append(entropy)
        smoothed = entropy if smoothed is None else ema * smoothed + (1 - ema) * entropy
        peak = max(peak, smoothed)
        token = int(logits.argmax())
        run.tokens.append(token)
        if len(run.tokens) >= max_tokens or token == eos:
            return run
        if steps and len(run.tokens) % every == 0:
            x = out.hidden_states[-2][:, -1:].detach()  # the last layer's input
            length = cache.get_seq_length()
            tuned = torch.arange(len(prompt_ids) if positions == "prompt" else length)
            alpha = 1 if smoothed >= peak else -1
            update = _update(model, cache, x, tuned, alpha, steps, lr)
            run.updates.append({"token": len(run.tokens) - 1, **update})
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                        output_hidden_states=True)


def assert_served_equals(token_ids: list[int], updates: list[dict], reference: ReferenceRun):
    """A served answer's tokens and V-Reason updates equal the reference run's: each update at
    the same token, with the same sign and entropies. The two runs edit their caches apart,
    float32 sums in another order, and the drift grows with the updates: by the 18th update of 3
    steps at lr 0.1 it reached 2.2e-3 relative (torch 2.13, transformers 5.19)."""
    assert token_ids == reference.tokens
    assert len(updates) == len(reference.updates) > 3
    for got, want in zip(updates, reference.updates):
        assert got["token"] == want["token"] and got["alpha"] == want["alpha"]
        for key in ("entropy_before", "entropy_after"):
            assert got[key] == pytest.approx(want[key], rel=3e-3, abs=2e-4), (
                f"{key} of the update at token {got['token']}: {got[key]} served, "
                f"{want[key]} in the reference")
