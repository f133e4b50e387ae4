"""The OpenAI API through the official `openai` client, against the real server and model."""

import json

import httpx
import openai
import pytest

from tests.conftest import API_KEY

CHAT = [{"role": "user", "content": "Name a color."}]


def test_models_and_health(openai_client, http):
    models = openai_client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    assert http.get("/health").json() == {"status": "ok"}


def test_chat_completion_reports_entropy(openai_client):
    reply = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    steering = choice.model_extra["steering"]
    assert steering["methods"] == []
    entropy = steering["entropy"]
    assert 0 <= entropy["mean"] <= entropy["max"] and entropy["last"] >= 0
    assert "token_entropy" not in steering
    assert reply.usage.completion_tokens == len(reply.choices[0].message.content) or \
        reply.usage.completion_tokens > 0


def test_completion_with_typical_and_entropy_lists(openai_client):
    reply = openai_client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The sky is", max_tokens=10, seed=3,
        extra_body={"typical_p": 0.6, "steering": {"return_entropy": True},
                    "return_token_ids": True})
    choice = reply.choices[0]
    steering = choice.model_extra["steering"]
    assert steering["methods"] == ["typical"] and steering["typical"] == {"p": 0.6}
    n = len(choice.model_extra["token_ids"])
    assert n == reply.usage.completion_tokens == len(steering["token_entropy"])
    assert len(steering["token_varentropy"]) == n
    assert all(h is not None and h >= 0 for h in steering["token_entropy"])
    assert steering["entropy"]["last"] == steering["token_entropy"][-1]
    assert steering["entropy"]["max"] == max(steering["token_entropy"])


def test_steering_typical_form_is_the_same_as_typical_p(openai_client):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=12,
                  seed=11, temperature=0.9)
    a = openai_client.completions.create(**kwargs, extra_body={"typical_p": 0.4})
    b = openai_client.completions.create(**kwargs, extra_body={"steering": {"typical": {"p": 0.4}}})
    assert a.choices[0].text == b.choices[0].text


def test_seeded_sampling_is_reproducible_and_n_choices_differ(openai_client):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="My favourite animal is", max_tokens=12,
                  n=4, seed=5, temperature=1.0)
    a = openai_client.completions.create(**kwargs)
    b = openai_client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert len({c.text for c in a.choices}) > 1


def test_batched_prompts_index_choices_prompt_major(openai_client):
    reply = openai_client.completions.create(
        model="SmolLM2-135M-Instruct", prompt=["One, two,", "Red, green,"], n=2, max_tokens=4,
        temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text
    assert reply.choices[0].text != reply.choices[2].text


def test_stop_and_length_finish_reasons(openai_client):
    reply = openai_client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
        stop=[" 7"])
    assert reply.choices[0].finish_reason == "stop" and " 7" not in reply.choices[0].text
    reply = openai_client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="1, 2, 3, 4,", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_logprobs_completion_and_chat(openai_client):
    reply = openai_client.completions.create(
        model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=3,
        temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) == 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert lp.token_logprobs[0] == pytest.approx(max(lp.top_logprobs[0].values()))
    chat = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_chat_stream_carries_per_token_entropy_and_final_report(openai_client):
    stream = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"steering": {"return_entropy": True}})
    text, chunk_entropy, final, usage = "", [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            steering = choice.model_extra.get("steering")
            if steering:
                chunk_entropy += steering["chunk_entropy"]
                if choice.finish_reason:
                    final = steering
    whole = openai_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=CHAT, max_tokens=10, temperature=0,
        extra_body={"steering": {"return_entropy": True}})
    assert text == whole.choices[0].message.content
    assert chunk_entropy == final["token_entropy"]
    assert final["token_entropy"] == pytest.approx(
        whole.choices[0].model_extra["steering"]["token_entropy"], abs=1e-5)
    assert usage.completion_tokens == len(chunk_entropy)


def test_completion_stream_matches_non_stream(openai_client):
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt="Water boils at", max_tokens=8,
                  temperature=0)
    pieces = [c.choices[0].text for c in openai_client.completions.create(**kwargs, stream=True)
              if c.choices]
    assert "".join(pieces) == openai_client.completions.create(**kwargs).choices[0].text


@pytest.mark.parametrize("body,param", [
    ({"typical_p": 1.5}, "typical_p"),
    ({"typical_p": 0}, "typical_p"),
    ({"steering": {"typical": {"p": -1}}}, "steering.typical.p"),
    ({"steering": {"bogus": True}}, "steering.bogus"),
    ({"steering": {"return_entropy": "yes please"}}, "steering.return_entropy"),
    ({"typical_p": 0.5, "steering": {"typical": {"p": 0.5}}}, None),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"logprobs": 99}, "logprobs"),
])
def test_bad_completion_input_is_a_400_naming_the_field(http, body, param):
    payload = {"model": "SmolLM2-135M-Instruct", "prompt": "hi", "max_tokens": 2, **body}
    response = http.post("/v1/completions", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
        assert param in error["message"]


def test_openai_client_sees_bad_request_errors(openai_client):
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=CHAT, extra_body={"typical_p": 2})
    assert "typical_p" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[])
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="gpt-4", messages=CHAT)


def test_malformed_json_and_wrong_key(server, http):
    response = http.post("/v1/completions", content=b'{"prompt": "x",',
                         headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {API_KEY}"}):
        r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # /health and /metrics are for probes and scrapers: no key.
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_server_keeps_serving_after_errors(http, openai_client):
    for _ in range(3):
        http.post("/v1/chat/completions", content=b"\xff\xfe not json")
        http.post("/v1/chat/completions", json={"messages": "nope"})
    reply = openai_client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi",
                                             max_tokens=2)
    assert reply.choices[0].text is not None


def test_stream_sse_ends_with_done(http):
    with http.stream("POST", "/v1/completions", json={
            "prompt": "Hello", "max_tokens": 3, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_request_with_a_chunked_prompt(openai_client, http):
    """A prompt longer than one step's token budget is prefilled in chunks; vLLM 0.32's CPU
    runner crashed on seeded requests there (steering/vllm_adapter/cpu_fixes.py). The same
    request again (prompt now prefix-cached, so not chunked) must give the same tokens."""
    prompt = "Tell me about rivers. " * 700  # ~3500 tokens; the CPU step budget is 2048
    kwargs = dict(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=8, temperature=1.0,
                  seed=42)
    first = openai_client.completions.create(**kwargs).choices[0].text
    second = openai_client.completions.create(**kwargs).choices[0].text
    assert first == second
    assert http.get("/health").status_code == 200
