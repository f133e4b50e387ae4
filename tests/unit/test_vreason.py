"""V-Reason's engine-free core against its formulas and against HF transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.default_model import ensure_default_model
from steering.methods.vreason.core import (
    EntropyPhase,
    LastLayerTail,
    VReasonConfig,
    attention_output,
    attention_weights,
    norm_preserving,
    output_entropy,
    switching_gradient,
    transposed_product,
    tune_values,
)
from tests import vreason_reference


def test_ema_and_running_peak():
    phase = EntropyPhase(beta=0.5)
    seen = []
    for h in (2.0, 4.0, 1.0, 0.0, 6.0):
        phase.observe(h)
        seen.append((phase.ema, phase.alpha))
    # m = 2, 3, 2, 1, 3.5: at the running peak (+1) at tokens 0, 1 and 4, below it otherwise.
    assert seen == [(2.0, 1), (3.0, 1), (2.0, -1), (1.0, -1), (3.5, 1)]
    assert phase.peak == 3.5 and phase.peak_token == 4


def test_after_the_global_peak_the_sign_stays_negative():
    phase = EntropyPhase(beta=0.5)
    for h in [1.0, 3.0, 3.0, 3.0]:  # m = 1, 2, 2.5, 2.75
        phase.observe(h)
    peak = phase.peak
    signs = []
    for h in [2.0, 1.0, 2.5, 0.5, 0.1]:  # m = 2.375, 1.69, 2.09, 1.30, 0.70: below the peak
        phase.observe(h)
        signs.append(phase.alpha)
    assert phase.peak == peak and signs == [-1] * 5


@pytest.mark.parametrize("alpha", [1, -1])
def test_switching_gradient_is_autograds_gradient_of_signed_kl_to_uniform(alpha):
    """The closed form against autograd on the loss as the paper writes it, α · KL(p ‖ U)."""
    generator = torch.Generator().manual_seed(0)
    lm_head, hidden = torch.randn(64, 8, generator=generator), torch.randn(8, generator=generator)
    reference = hidden.clone().requires_grad_()
    p = torch.softmax(lm_head @ reference, 0)
    loss = alpha * (p * (p.log() - math.log(1 / 64))).sum()
    loss.backward()
    entropy, gradient = switching_gradient(lm_head, hidden, torch.tensor(float(alpha)))
    assert float(entropy) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    assert float(entropy) == pytest.approx(float(output_entropy(lm_head, hidden)), rel=1e-6)
    torch.testing.assert_close(gradient, reference.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [1, -1])
def test_a_gradient_step_on_the_loss_moves_entropy_with_the_sign(alpha):
    generator = torch.Generator().manual_seed(0)
    lm_head, hidden = torch.randn(50, 8, generator=generator), torch.randn(8, generator=generator)
    before, gradient = switching_gradient(lm_head, hidden, torch.tensor(float(alpha)))
    after = output_entropy(lm_head, hidden - 0.1 * gradient)
    assert (after - before) * alpha > 0  # +1 raises the entropy, -1 lowers it


def test_norm_preserving_update_keeps_each_value_vector_norm():
    values = torch.randn(5, 3, 8)
    delta = torch.randn(5, 3, 8)
    moved = norm_preserving(values, delta)
    torch.testing.assert_close(moved.norm(dim=-1), values.norm(dim=-1))
    torch.testing.assert_close(norm_preserving(values, torch.zeros_like(delta)), values)


def test_grouped_query_attention_matches_sdpa():
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, positions, d = 6, 2, 7, 16
    query, keys, values = (torch.randn(heads, d, generator=g),
                           torch.randn(positions, kv_heads, d, generator=g),
                           torch.randn(positions, kv_heads, d, generator=g))
    weights = attention_weights(query, keys, scale=d ** -0.5)
    out = attention_output(weights, values).view(heads, d)
    expand = heads // kv_heads
    k = keys.permute(1, 0, 2).repeat_interleave(expand, 0)
    v = values.permute(1, 0, 2).repeat_interleave(expand, 0)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[:, None], k, v)[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def hf():
    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def _tail(model) -> LastLayerTail:
    layer = model.model.layers[-1]
    return LastLayerTail(o_proj=layer.self_attn.o_proj.weight,
                         post_attention_norm=layer.post_attention_layernorm.weight,
                         gate_proj=layer.mlp.gate_proj.weight, up_proj=layer.mlp.up_proj.weight,
                         down_proj=layer.mlp.down_proj.weight, final_norm=model.model.norm.weight,
                         lm_head=model.lm_head.weight, eps=model.config.rms_norm_eps)


def _prefill(model, tokenizer, text: str):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
    x = out.hidden_states[-2][0, -1]
    layer = model.model.layers[-1]
    position = len(ids) - 1
    cos, sin = model.model.rotary_emb(x[None, None], torch.tensor([[position]]))
    q = layer.self_attn.q_proj(layer.input_layernorm(x)).view(1, 1, -1, 64).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, torch.zeros(1, 1, 1, 64), cos, sin)
    keys = cache.layers[-1].keys[0].transpose(0, 1)  # (positions, kv_heads, d)
    values = cache.layers[-1].values[0].transpose(0, 1)
    return ids, out.logits[0, -1], cache, x, q[0, :, 0], keys, values


def test_recomputed_last_layer_gives_hf_logits(hf):
    model, tokenizer = hf
    _, logits, _, x, query, keys, values = _prefill(model, tokenizer, "Name three colours.")
    weights = attention_weights(query, keys, model.model.layers[-1].self_attn.scaling)
    recomputed = _tail(model).logits(attention_output(weights, values), x)
    torch.testing.assert_close(recomputed, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("engine_logits", [False, True], ids=["recomputed", "engine_logits"])
@pytest.mark.parametrize("alpha", [1, -1])
def test_value_update_matches_the_hf_reference_and_moves_entropy_with_the_sign(hf, alpha,
                                                                              engine_logits):
    """With `engine_logits`, the first step starts from the model's logits at that token, as
    the engine hands them over, instead of recomputing them."""
    model, tokenizer = hf
    ids, logits, cache, x, query, keys, values = _prefill(model, tokenizer, "What is 12 + 30?")
    tuned = torch.arange(len(ids))
    update = tune_values(_tail(model), query, x, keys, values, tuned,
                         model.model.layers[-1].self_attn.scaling, alpha, steps=3, lr=0.05,
                         logits=logits if engine_logits else None)
    expected = vreason_reference._update(model, cache, x[None, None], tuned, alpha, 3, 0.05)
    assert update.entropy_before == pytest.approx(expected["entropy_before"], rel=1e-4, abs=1e-5)
    assert update.entropy_after == pytest.approx(expected["entropy_after"], rel=1e-3, abs=1e-4)
    assert update.delta_norm == pytest.approx(expected["delta_norm"], rel=1e-3)
    written = cache.layers[-1].values[0].transpose(0, 1)[tuned]
    # Adam scales each element's step by its own gradient's size, so where a gradient is near
    # zero float32 noise moves the step; 0.005 is a tenth of one step (lr 0.05), and a wrong
    # update (sign, slot, norm) is off by whole steps.
    assert (update.values - written).abs().max() < 5e-3
    assert (update.entropy_after - update.entropy_before) * alpha > 0


def test_the_threaded_transposed_product_is_the_plain_product_bit_for_bit(hf):
    """The HF-parity of an update rests on its LM-head product summing as autograd's does."""
    model, _ = hf
    lm_head = model.lm_head.weight
    gradient = torch.softmax(torch.randn(lm_head.shape[0], generator=torch.Generator()
                                         .manual_seed(0)) * 4, 0) - 1 / lm_head.shape[0]
    threads = torch.get_num_threads()
    try:
        for count in (2, 3, 4, 8, 12, 16):
            torch.set_num_threads(count)
            assert torch.equal(transposed_product(lm_head, gradient), gradient @ lm_head)
    finally:
        torch.set_num_threads(threads)


def _runner(architecture="LlamaForCausalLM", tp=1, isa="vec", kv_dtype="auto", window=None,
            act="silu"):
    """What `ValueCacheTuner._check` reads of vLLM's model runner, as the bundled model has it
    unless told otherwise."""
    from types import SimpleNamespace

    hf = SimpleNamespace(architectures=[architecture], hidden_act=act)
    impl = SimpleNamespace(sliding_window=window, logits_soft_cap=None, sinks=None)
    attention = SimpleNamespace(isa=isa, kv_cache_dtype=kv_dtype, impl=impl)
    config = SimpleNamespace(model_config=SimpleNamespace(hf_config=hf), parallel_config=
                             SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1))
    table = SimpleNamespace(captured_query=object(), query_source=attention)
    return SimpleNamespace(vllm_config=config), SimpleNamespace(table=table)


@pytest.mark.parametrize("change,reason", [
    ({}, None),
    ({"architecture": "GPT2LMHeadModel"}, "Llama-family"),
    ({"tp": 2}, "tensor or pipeline"),
    ({"isa": "amx"}, "CPU attention layout"),
    ({"kv_dtype": "fp8"}, "quantized"),
    ({"window": 4096}, "sliding window"),
    ({"act": "gelu"}, "SwiGLU"),
])
def test_unsupported_engines_are_named_and_refused(change, reason):
    """An engine V-Reason cannot tune gets its reason at start, and every V-Reason request a
    400 naming `steering.vreason` with that reason."""
    from steering.engine.engine import Engine
    from steering.errors import InvalidRequest
    from steering.methods.vreason.adapter import ValueCacheTuner
    from steering.methods.vreason.descriptor import VReason

    runner, tuner = _runner(**change)
    found = ValueCacheTuner._check(tuner, runner)
    if reason is None:
        assert found is None
        return
    assert reason in found
    engine = Engine.__new__(Engine)  # the refusal alone: no engine process
    engine._unsupported = {"vreason": found}  # what the worker said at start
    with pytest.raises(InvalidRequest) as refused:
        VReason().resolve(VReasonConfig(), engine, 8)
    assert refused.value.param == "steering.vreason" and reason in refused.value.message
