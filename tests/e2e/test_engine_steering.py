"""Steering inside the real vLLM engine, checked against HF transformers on the same model."""

import asyncio
from collections import Counter

import pytest
import torch
from transformers.generation.logits_process import TypicalLogitsWarper

from steering.entropy import entropy_varentropy

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "My favourite fruit is"
MASS = 0.5
SAMPLES = 96  # 6 requests x n=16


def hf_next_token_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    model, _ = hf_model
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0, -1]


async def sample_first_tokens(make_client, prompt: str, extra_body: dict) -> list[int]:
    client = make_client()

    async def one(seed):
        reply = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=1, temperature=1.0, n=16, seed=seed,
            extra_body={"return_token_ids": True, **extra_body})
        return [c.model_extra["token_ids"][0] for c in reply.choices]
    async with client:
        batches = await asyncio.gather(*(one(1000 * k) for k in range(SAMPLES // 16)))
    return [t for batch in batches for t in batch]


def test_typical_mask_in_engine_matches_hf_warper(async_openai, hf_model):
    """Every token vLLM samples with typical_p lies in HF's kept set, the likely kept tokens all
    show up, and without typical_p tokens outside the set do appear (so the test can fail)."""
    _, tokenizer = hf_model
    prompt_ids = tokenizer.encode(PROMPT)
    logits = hf_next_token_logits(hf_model, prompt_ids)
    kept_mask = ~torch.isinf(TypicalLogitsWarper(mass=MASS)(None, logits[None].clone())[0])
    kept = set(kept_mask.nonzero().flatten().tolist())
    probs = logits.softmax(-1)
    renormalised = {t: probs[t].item() / probs[kept_mask].sum().item() for t in kept}
    assert 1 < len(kept) < 200 and probs[kept_mask].sum() < 0.9

    typical = asyncio.run(sample_first_tokens(async_openai, PROMPT, {"typical_p": MASS}))
    assert set(typical) <= kept, f"sampled outside HF's typical set: {set(typical) - kept}"
    counts = Counter(typical)
    for token, p in renormalised.items():
        if p > 0.15:  # P(never drawn in 96 samples) < 1e-6
            assert counts[token] > 0, f"token {token} (p={p:.2f}) never sampled"

    plain = asyncio.run(sample_first_tokens(async_openai, PROMPT, {}))
    assert not set(plain) <= kept


def test_greedy_output_matches_hf_generate(openai_client, hf_model):
    model, tokenizer = hf_model
    for prompt in ["The capital of Italy is", "Photosynthesis is"]:
        ids = tokenizer.encode(prompt)
        reply = openai_client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
            extra_body={"return_token_ids": True})
        with torch.no_grad():
            hf = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
        assert reply.choices[0].model_extra["token_ids"] == hf[0, len(ids):].tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_reported_entropy_equals_hf_distribution_entropy(openai_client, hf_model, temperature):
    """Per-token entropy from the engine = entropy of HF's next-token distribution at the
    request's temperature (T = 1 for greedy), teacher-forced on the generated tokens."""
    model, _ = hf_model
    reply = openai_client.completions.create(
        model=MODEL, prompt="Three facts about the moon:", max_tokens=16,
        temperature=temperature, seed=7,
        extra_body={"steering": {"return_entropy": True}, "return_token_ids": True})
    choice = reply.choices[0].model_extra
    prompt_ids, out_ids = choice["prompt_token_ids"], choice["token_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + out_ids])).logits[0]
    step_logits = logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out_ids)]
    h, v = entropy_varentropy(step_logits, torch.full((len(out_ids),), temperature))
    assert choice["steering"]["token_entropy"] == pytest.approx(h.tolist(), abs=2e-3)
    assert choice["steering"]["token_varentropy"] == pytest.approx(v.tolist(), abs=1e-2, rel=1e-3)
