"""V-Reason on the live server (vLLM's default compiled mode) against the HF reference."""

from __future__ import annotations

import asyncio

import pytest

from tests import vreason_reference

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is 17 + 25? Think step by step.",
             "A box holds 3 red and 5 blue balls. How many balls are there?"]


def chat(openai_client, question: str, vreason: dict | None, max_tokens: int = 40) -> dict:
    reply = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, extra_body={"return_token_ids": True, "steering": {
            "return_entropy": True, **({"vreason": vreason} if vreason else {})}})
    choice = reply.choices[0].model_extra
    return {"token_ids": choice["token_ids"], "prompt_token_ids": choice["prompt_token_ids"],
            "steering": choice["steering"], "text": reply.choices[0].message.content}


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("vreason", [
    {"every": 4, "steps": 2, "lr": 0.05},
    {"every": 2, "steps": 3, "lr": 0.1, "ema": 0.5, "positions": "context"},
])
def test_engine_updates_and_tokens_equal_the_hf_reference(openai_client, hf_model, question,
                                                          vreason):
    model, tokenizer = hf_model
    served = chat(openai_client, question, vreason)
    config = {"every": 4, "steps": 2, "lr": 0.05, "ema": 0.9, "positions": "prompt", **vreason}
    reference = vreason_reference.generate(
        model, served["prompt_token_ids"], 40, config["every"], config["steps"], config["lr"],
        config["ema"], config["positions"], eos=tokenizer.eos_token_id)
    updates = served["steering"]["vreason"]["updates"]
    vreason_reference.assert_served_equals(served["token_ids"], updates, reference)
    for got, want in zip(updates, reference.updates):
        assert got["delta_norm"] == pytest.approx(want["delta_norm"], rel=2e-3)
        # The update starts from the distribution the engine sampled from.
        measured = served["steering"]["token_entropy"][got["token"]]
        assert got["entropy_before"] == pytest.approx(measured, rel=1e-3, abs=1e-4)
    assert served["steering"]["methods"] == ["vreason"]


def test_vreason_changes_the_answer_and_each_update_follows_its_sign(openai_client):
    plain = chat(openai_client, QUESTIONS[0], None)
    tuned = chat(openai_client, QUESTIONS[0], {"every": 2, "steps": 4, "lr": 0.2})
    assert tuned["token_ids"] != plain["token_ids"]  # active in the compiled engine
    updates = tuned["steering"]["vreason"]["updates"]
    assert {u["alpha"] for u in updates} == {1, -1}
    for update in updates:
        assert (update["entropy_after"] - update["entropy_before"]) * update["alpha"] > 0


def test_requests_batched_with_vreason_keep_their_solo_tokens(openai_client, async_openai):
    prompts = ["Name three colours.", "Count from one to five.", QUESTIONS[1]]
    tuned = {"vreason": {"every": 2, "steps": 3, "lr": 0.2}}
    cases = [(p, s) for p in prompts for s in (None, tuned)]
    solo = [chat(openai_client, p, s and s["vreason"], max_tokens=24)["token_ids"]
            for p, s in cases]

    async def together():
        async with async_openai() as client:
            replies = await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=24,
                temperature=0, extra_body={"return_token_ids": True,
                                           **({"steering": s} if s else {})})
                for p, s in cases))
        return [r.choices[0].model_extra["token_ids"] for r in replies]

    assert asyncio.run(together()) == solo


def test_edited_values_never_reach_the_prefix_cache(openai_client):
    """A prompt of several full KV blocks: its tuned blocks carry a per-request cache salt, so
    a later plain request recomputes the prompt instead of reading the edited values."""
    question = "Here is a list of things to pack for a trip to the mountains: " * 40 + \
        "Which of them is heaviest?"
    plain = chat(openai_client, question, None, max_tokens=12)
    assert len(plain["prompt_token_ids"]) > 4 * 128
    chat(openai_client, question, {"every": 1, "steps": 4, "lr": 0.5})
    assert chat(openai_client, question, None, max_tokens=12)["token_ids"] == plain["token_ids"]


@pytest.mark.parametrize("vreason, param", [
    ({"every": 0}, "steering.vreason.every"),
    ({"lr": 50}, "steering.vreason.lr"),
    ({"lr": 0}, "steering.vreason.lr"),
    ({"steps": 1000}, "steering.vreason.steps"),
    ({"steps": 20}, "steering.vreason.steps"),  # within the schema, above the server's limit
    ({"ema": 1.0}, "steering.vreason.ema"),
    ({"positions": "video"}, "steering.vreason.positions"),
])
def test_bad_vreason_settings_are_400(http, vreason, param):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "steering": {"vreason": vreason}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_vreason_does_not_combine_with_particles(http):
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "steering": {"vreason": {}, "particles": {"n": 2}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.particles"
