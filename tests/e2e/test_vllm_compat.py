"""A drop-in for `vllm serve`: what plain vLLM accepts is accepted and honoured here, the answers
validate against OpenAI's published schema, and the steering methods compose with it.

Real server, real engine, bundled model; the official OpenAI SDK where an app would use it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import BaseModel, Field

from server.requests import ChatCompletionRequest, CompletionRequest
from tests.openai_spec import CHAT_CHUNK, CHAT_RESPONSE, COMPLETION_RESPONSE, validate
from tests.prometheus import metric

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name a color."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CAT_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}}


def chat(http, **body) -> dict:
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                       "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


def complete(http, **body) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "The sky is",
                                                  "max_tokens": 8, **body})
    assert response.status_code == 200, response.text
    return response.json()


def events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={"model": MODEL, **body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = [line[len("data: "):] for line in response.iter_lines()
                 if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def validate_completion_chunk(chunk: dict) -> None:
    """OpenAI's schema reuses the completion object for stream chunks, whose finish_reason is
    null until the last one (as OpenAI's own stream sends it)."""
    validate(COMPLETION_RESPONSE, {**chunk, "choices": [
        {**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]})


def cat_is_valid(text: str) -> dict:
    cat = json.loads(text)
    assert set(cat) == {"name", "age"} and isinstance(cat["name"], str) \
        and isinstance(cat["age"], int) and len(cat["name"]) <= 12
    return cat


# --- structured outputs ---------------------------------------------------------------------


class Cat(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


def test_sdk_parse_returns_the_pydantic_model(openai_client):
    reply = openai_client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format=Cat, max_tokens=48, temperature=0)
    assert isinstance(reply.choices[0].message.parsed, Cat)


@pytest.mark.parametrize("response_format", [JSON_SCHEMA, {"type": "json_object"}])
def test_response_format_is_enforced_by_a_grammar(http, response_format):
    reply = chat(http, messages=[{"role": "user", "content": "A cat, please."}],
                 response_format=response_format, max_tokens=48, seed=1)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    parsed = json.loads(choice["message"]["content"])
    if response_format is JSON_SCHEMA:
        cat_is_valid(choice["message"]["content"])
    else:
        assert isinstance(parsed, dict)
    validate(CHAT_RESPONSE, reply)


def test_plain_text_format_and_structured_outputs_choice(http):
    plain = chat(http, response_format={"type": "text"}, temperature=0)
    assert plain["choices"][0]["message"]["content"] == \
        chat(http, temperature=0)["choices"][0]["message"]["content"]
    for _ in range(3):
        reply = complete(http, structured_outputs={"choice": ["red", "green", "blue"]})
        assert reply["choices"][0]["text"] in {"red", "green", "blue"}


# --- tools ----------------------------------------------------------------------------------


def test_named_and_required_tool_choice_give_valid_calls(http, openai_client):
    for tool_choice in (NAMED, "required"):
        reply = openai_client.chat.completions.create(
            model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, max_tokens=64,
            temperature=0)
        message = reply.choices[0].message
        assert message.tool_calls, message
        call = message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        validate(CHAT_RESPONSE, reply.model_dump(exclude_unset=True))
    raw = chat(http, messages=WEATHER, tools=TOOLS, tool_choice="none", temperature=0)
    assert "tool_calls" not in raw["choices"][0]["message"]


def test_auto_tool_choice_parses_the_models_call(http):
    """The bundled model's template shows the tools in the Hermes format and the `hermes` parser
    reads calls back; a regex constraint steers the model into writing one so that the parse is
    what is tested. With `tool_choice: auto`, vLLM's grammar is "a tool call whose arguments fit
    the tool's schema, or the regex" (`vllm/parser/abstract_parser.py`), so the city is only
    known to be a string, not that it is the regex's "Paris"."""
    written = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    reply = chat(http, messages=WEATHER, tools=TOOLS, max_tokens=48, temperature=0,
                 structured_outputs={"regex": written.replace("{", r"\{").replace("}", r"\}")})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert list(arguments) == ["city"] and isinstance(arguments["city"], str)
    validate(CHAT_RESPONSE, reply)
    # The call and its result go back to the model as OpenAI's messages.
    follow = chat(http, messages=[*WEATHER, choice["message"],
                                  {"role": "tool", "tool_call_id": call["id"],
                                   "content": "sunny, 21 C"}], tools=TOOLS, max_tokens=6)
    assert follow["choices"][0]["message"]["content"] is not None


def test_streamed_tool_calls_arrive_as_openai_streams_them(http):
    body = {"messages": WEATHER, "tools": TOOLS, "tool_choice": NAMED, "max_tokens": 64,
            "temperature": 0}
    whole = chat(http, **body)["choices"][0]["message"]["tool_calls"][0]
    chunks = events(http, "/v1/chat/completions", body)
    fragments, ids, names = [], set(), set()
    for chunk in chunks:
        validate(CHAT_CHUNK, chunk)
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                assert delta["index"] == 0
                ids.update([delta["id"]] if "id" in delta else [])
                function = delta.get("function", {})
                names.update([function["name"]] if "name" in function else [])
                fragments.append(function.get("arguments", ""))
    assert len(ids) == 1 and names == {"get_weather"} and len(fragments) > 1
    assert json.loads("".join(fragments)) == json.loads(whole["function"]["arguments"])


# --- sampling and output fields -------------------------------------------------------------


def greedy_ids(http, **body) -> list[int]:
    return complete(http, temperature=0, return_token_ids=True, **body)["choices"][0][
        "token_ids"]


def test_logit_bias_bans_a_token(http, openai_client):
    first = greedy_ids(http)[0]
    reply = openai_client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
        logit_bias={str(first): -100}, extra_body={"return_token_ids": True})
    assert first not in reply.choices[0].model_extra["token_ids"]


def test_echo_with_logprobs_gives_the_prompts_own_logprobs(openai_client, hf_model):
    """What lm-evaluation-harness's log-likelihood tasks read: the prompt echoed, and the
    log-probability of each prompt token given the ones before (from HF as the reference)."""
    prompt = "The capital of France is Paris"
    reply = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                             temperature=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    model, tokenizer = hf_model
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0].log_softmax(-1)
    expected = [logits[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])]
    got = choice.logprobs.token_logprobs[:ids.shape[1]]
    assert got[0] is None
    assert got[1:] == pytest.approx(expected, abs=2e-3)


def test_vllm_sampling_extensions_are_honoured(http, hf_model):
    _, tokenizer = hf_model
    ids = greedy_ids(http, max_tokens=12)
    # min_tokens: no end-of-sequence before it
    short = complete(http, prompt="Say hi.", max_tokens=40, temperature=0,
                     return_token_ids=True)
    n = len(short["choices"][0]["token_ids"])
    longer = complete(http, prompt="Say hi.", max_tokens=40, temperature=0, min_tokens=n + 5,
                      return_token_ids=True)
    assert len(longer["choices"][0]["token_ids"]) >= n + 5
    # stop_token_ids
    stopped = complete(http, temperature=0, max_tokens=12, stop_token_ids=[ids[3]],
                       return_token_ids=True)["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["stop_reason"] == ids[3]
    assert stopped["token_ids"] == ids[:4]
    # include_stop_str_in_output
    word = tokenizer.decode(ids[2:3])
    kept = complete(http, temperature=0, max_tokens=12, stop=[word],
                    include_stop_str_in_output=True)["choices"][0]
    assert kept["text"].endswith(word) and kept["finish_reason"] == "stop"
    # bad_words
    banned = tokenizer.decode(ids[:1]).strip()
    text = complete(http, temperature=0, max_tokens=12, bad_words=[banned])["choices"][0]["text"]
    assert banned not in text.split()
    # allowed_token_ids
    allowed = sorted(set(ids[4:9]))
    got = greedy_ids(http, allowed_token_ids=allowed)
    assert set(got) <= set(allowed)
    # truncate_prompt_tokens
    usage = complete(http, prompt="one two three four five six seven", max_tokens=2,
                     truncate_prompt_tokens=3)["usage"]
    assert usage["prompt_tokens"] == 3
    # skip_special_tokens=False keeps the end-of-sequence text
    chat_text = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
        "temperature": 0, "skip_special_tokens": False, "include_stop_str_in_output": True,
    }).json()["choices"][0]
    if chat_text["finish_reason"] == "stop":
        assert chat_text["message"]["content"].endswith(tokenizer.eos_token)


def beam_search(model, prompt_ids: list[int], width: int, steps: int) -> list[float]:
    """The reference: the total log-probabilities of the beams a beam search over HF's
    log-probabilities keeps, best first (each step: every beam's 2 × width likeliest tokens
    are the candidates, the width likeliest sequences stay; no end-of-sequence)."""
    beams = [(0.0, [])]
    for _ in range(steps):
        candidates = []
        for total, tokens in beams:
            with torch.no_grad():
                logp = model(torch.tensor([prompt_ids + tokens])).logits[0, -1].log_softmax(-1)
            top = logp.topk(2 * width)
            candidates += [(total + v, tokens + [i])
                           for v, i in zip(top.values.tolist(), top.indices.tolist())]
        beams = sorted(candidates, key=lambda c: -c[0])[:width]
    return [total for total, _ in beams]


def sequence_logprob(model, prompt_ids: list[int], tokens: list[int]) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([prompt_ids + tokens])).logits[0].log_softmax(-1)
    return sum(logp[len(prompt_ids) + i - 1, t].item() for i, t in enumerate(tokens))


def test_beam_search_is_vllms_own_and_reports_nothing_measured(http, hf_model):
    """`use_beam_search` runs vLLM's beam search: its beams are as likely as the reference's,
    best first; their reports say nothing was steered or measured (vLLM's one-token engine
    requests per beam are not the server's choices), streamed too (vLLM streams beams in chat
    only)."""
    model, tokenizer = hf_model
    prompt = "The sky is"
    body = {"prompt": prompt, "max_tokens": 4, "n": 3, "use_beam_search": True,
            "ignore_eos": True, "return_token_ids": True}
    choices = complete(http, **body)["choices"]
    prompt_ids = tokenizer(prompt).input_ids
    got = [sequence_logprob(model, prompt_ids, c["token_ids"]) for c in choices]
    assert got == pytest.approx(beam_search(model, prompt_ids, 3, 4), abs=2e-3)
    assert all(c["steering"] == {"methods": [], "entropy": None, "varentropy": None}
               for c in choices)
    streamed = events(http, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4, "n": 3, "use_beam_search": True})
    last = {c["index"]: c for chunk in streamed for c in chunk["choices"]}
    assert [last[i]["steering"] for i in range(3)] == [choices[0]["steering"]] * 3


def test_prompt_logprobs_and_tokens_as_ids(http):
    reply = complete(http, max_tokens=2, prompt_logprobs=1, logprobs=1,
                     return_tokens_as_token_ids=True, return_token_ids=True)
    choice = reply["choices"][0]
    assert len(choice["prompt_logprobs"]) == reply["usage"]["prompt_tokens"]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]


def test_chat_template_controls(http):
    messages = [{"role": "user", "content": "Finish the sentence."},
                {"role": "assistant", "content": "The sky is"}]
    base = chat(http, messages=CHAT, return_token_ids=True)
    without = chat(http, messages=CHAT, add_generation_prompt=False, return_token_ids=True)
    assert len(without["prompt_token_ids"]) < len(base["prompt_token_ids"])
    cont = chat(http, messages=messages, add_generation_prompt=False,
                continue_final_message=True, return_token_ids=True, chat_template_kwargs={})
    assert cont["prompt_token_ids"][-3:] != base["prompt_token_ids"][-3:]
    assert not cont["choices"][0]["message"]["content"].startswith("<|im_start|>")


def test_chat_template_kwargs_reach_the_template(http, hf_model):
    """The bundled template reads `system_prompt` (in place of SmolLM2's default system turn)."""
    _, tokenizer = hf_model
    base = chat(http, messages=CHAT, max_tokens=1, return_token_ids=True)["prompt_token_ids"]
    told = chat(http, messages=CHAT, max_tokens=1, return_token_ids=True,
                chat_template_kwargs={"system_prompt": "Answer in French."})["prompt_token_ids"]
    assert "You are a helpful AI assistant" in tokenizer.decode(base)
    assert tokenizer.decode(told).startswith("<|im_start|>system\nAnswer in French.<|im_end|>")


@pytest.mark.parametrize("spaces", [True, False])
def test_special_tokens_text_follows_the_detokenizer_flags(http, hf_model, spaces):
    """`skip_special_tokens: false` with `spaces_between_special_tokens`: the text is the
    tokenizer's own decoding with the same flags (SmolLM2's fast tokenizer puts no space
    between special tokens either way, as in plain vLLM)."""
    _, tokenizer = hf_model
    specials = [1, 3, 4, 5]  # <|im_start|>, <repo_name>, <reponame>, <file_sep>
    choice = complete(http, max_tokens=6, temperature=0, allowed_token_ids=specials,
                      skip_special_tokens=False, spaces_between_special_tokens=spaces,
                      return_token_ids=True)["choices"][0]
    assert set(choice["token_ids"]) <= set(specials)
    assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=False,
                                              spaces_between_special_tokens=spaces)
    assert choice["text"].startswith(tokenizer.convert_ids_to_tokens(choice["token_ids"][0]))


def test_request_id_and_xargs(http):
    reply = chat(http, request_id="my-request-7", vllm_xargs={"note": "kept"}, temperature=0)
    assert reply["id"] == "chatcmpl-my-request-7"
    assert reply["choices"][0]["message"]["content"] == \
        chat(http, temperature=0)["choices"][0]["message"]["content"]


def prefix_cache_hits(http) -> float:
    """vLLM's own count of prompt tokens served from the prefix cache."""
    return metric(http.get("/metrics").text, "vllm:prefix_cache_hits_total")


def test_cache_salt_separates_prefix_caches(http):
    """Same prompt, same salt: its blocks come from the prefix cache; another salt: none do."""
    body = {"prompt": "A long shared preamble about lighthouses. " * 24, "max_tokens": 1}
    complete(http, **body, cache_salt="tenant-a")
    before = prefix_cache_hits(http)
    complete(http, **body, cache_salt="tenant-a")
    again = prefix_cache_hits(http)
    complete(http, **body, cache_salt="tenant-b")
    assert again - before >= 128 and prefix_cache_hits(http) == again


def test_openai_fields_apps_send_without_caring(http):
    reply = chat(http, metadata={"app": "x"}, store=False, service_tier="auto", user="u1",
                 reasoning_effort="low", modalities=["text"], parallel_tool_calls=True,
                 prediction={"type": "content", "content": "Blue"})
    validate(CHAT_RESPONSE, reply)


# --- null means unset; unknown fields -------------------------------------------------------


def optional_fields(model) -> list[str]:
    return sorted(name for name, info in model.model_fields.items() if not info.is_required())


UNSEEDED = {"seed", "max_tokens", "max_completion_tokens"}  # null changes the answer's length/draw


@pytest.mark.parametrize("route,model,base", [
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": CHAT}),
    ("/v1/completions", CompletionRequest, {"prompt": "The sky is"}),
])
def test_null_for_every_optional_field_means_unset(http, route, model, base):
    body = {"model": MODEL, **base, "max_tokens": 3, "seed": 7}
    expected = http.post(route, json=body).json()["choices"][0]
    fields = [f for f in optional_fields(model) if f not in base]
    assert len(fields) > 40  # generated from the request model, not listed here
    for field in fields:
        response = http.post(route, json={**body, field: None})
        assert response.status_code == 200, (field, response.text)
        if field not in UNSEEDED:
            got = response.json()["choices"][0]
            assert got.get("text", got.get("message")) == \
                expected.get("text", expected.get("message")), field


def test_unknown_fields_are_ignored_and_named(http):
    response = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 2, "extra_body": {"x": 1},
        "frobnicate": True})
    assert response.status_code == 200
    assert response.headers["x-steer-ignored-fields"] == "extra_body,frobnicate"
    response = http.post("/v1/chat/completions", json={  # any name, percent-encoded
        "model": MODEL, "messages": CHAT, "max_tokens": 2, "é\n,x": 1})
    assert response.status_code == 200
    assert response.headers["x-steer-ignored-fields"] == "%C3%A9%0A%2Cx"
    response = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 2, "steering": {"frobnicate": True}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "steering.frobnicate"


@pytest.mark.parametrize("body,param", [
    ({"vllm_xargs": {"steer_typical_p": 0.5}}, "vllm_xargs"),
    ({"n": 17}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, None),
    ({"steering": {"particles": {"n": 2}}, "response_format": {"type": "json_object"}},
     "response_format"),
    ({"steering": {"particles": {"n": 2}}, "tools": TOOLS, "tool_choice": NAMED}, "tool_choice"),
    ({"use_beam_search": True, "typical_p": 0.9}, "use_beam_search"),
    ({"use_beam_search": True, "steering": {"return_entropy": True}}, "use_beam_search"),
])
def test_what_cannot_be_honoured_is_a_400(http, body, param):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT,
                                                       "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


# --- routes beside generation ---------------------------------------------------------------


def test_tokenize_detokenize_version_ping(http, hf_model):
    _, tokenizer = hf_model
    tokens = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert tokens["tokens"] == tokenizer.encode("Hello world") and tokens["count"] == 2
    chat_tokens = http.post("/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    assert chat_tokens["count"] == len(chat(http, return_token_ids=True)["prompt_token_ids"])
    text = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    assert http.get("/version").json()["version"] == "0.32.0"
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200


# --- every answer's shape against OpenAI's schema -------------------------------------------


def test_every_answer_shape_validates(http):
    validate(CHAT_RESPONSE, chat(http, logprobs=True, top_logprobs=2, n=2))
    validate(CHAT_RESPONSE, chat(http, steering={"return_entropy": True}))
    for chunk in events(http, "/v1/chat/completions", {
            "messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 1, "n": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "steering": {"return_entropy": True}}):
        validate(CHAT_CHUNK, chunk)
    validate(COMPLETION_RESPONSE, complete(http, logprobs=2, n=2, prompt=["a", "b"]))
    for chunk in events(http, "/v1/completions", {"prompt": "The sky is", "max_tokens": 5,
                                                  "logprobs": 1,
                                                  "stream_options": {"include_usage": True}}):
        validate_completion_chunk(chunk)
    particles = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "max_tokens": 8,
        "steering": {"particles": {"n": 2, "max_steps": 2}}}).json()
    validate(CHAT_RESPONSE, particles)


# --- steering on top ------------------------------------------------------------------------


def test_typical_p_composes_with_json_schema(http):
    """Both act: every finished output is valid against the schema, and typical sampling
    changes the draw (seeded outputs with and without τ differ for some seed)."""
    body = {"messages": [{"role": "user", "content": "A cat, please."}], "max_tokens": 64,
            "response_format": JSON_SCHEMA, "temperature": 1.0}
    differs, finished = False, 0
    for seed in range(4):
        plain = chat(http, **body, seed=seed)["choices"][0]
        typical = chat(http, **body, seed=seed, typical_p=0.3)["choices"][0]
        assert typical["steering"]["methods"] == ["typical"]
        for choice in (plain, typical):
            if choice["finish_reason"] == "stop":
                cat_is_valid(choice["message"]["content"])
                finished += 1
        differs |= typical["message"]["content"] != plain["message"]["content"]
    assert differs and finished >= 4


def test_typical_mask_is_computed_on_the_grammar_masked_distribution(http):
    """The grammar's mask comes first: typical sampling picks among the allowed tokens. (Were it
    computed on the unmasked distribution, its small typical set would hold none of these
    unlikely words' tokens and the grammar would leave nothing to sample.)"""
    words = ["zebra", "quartz"]
    for seed in range(4):
        reply = complete(http, prompt="The sky is", structured_outputs={"choice": words},
                         typical_p=0.2, seed=seed, temperature=1.0, max_tokens=8)
        assert reply["choices"][0]["text"] in words
        assert reply["choices"][0]["steering"]["methods"] == ["typical"]


def test_entropy_is_measured_after_the_grammar_mask(http):
    """Where the grammar leaves one token, the reported entropy is 0: telemetry sees the
    masked distribution that is sampled from ("7", then the end of sequence)."""
    reply = complete(http, structured_outputs={"choice": ["7"]}, max_tokens=4,
                     steering={"return_entropy": True}, return_token_ids=True)
    choice = reply["choices"][0]
    assert choice["text"] == "7" and len(choice["token_ids"]) == 2
    assert [abs(h) < 1e-6 for h in choice["steering"]["token_entropy"]] == [True, True]
    free = complete(http, max_tokens=4, steering={"return_entropy": True})
    assert max(free["choices"][0]["steering"]["token_entropy"]) > 0.1


def test_east_composes_with_a_named_tool(http):
    """The steered model still returns a valid call (the grammar holds it to the schema, whose
    city is short enough for a steered model to finish), and the steering acts."""
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"]}}}]
    body = {"messages": WEATHER, "tools": tools, "tool_choice": NAMED, "max_tokens": 64,
            "temperature": 0}
    plain = chat(http, **body)["choices"][0]
    steered = chat(http, **body, steering={"east": {"vector": "explore", "scale": 1.0}})
    choice = steered["choices"][0]
    assert choice["steering"]["methods"] == ["east"]
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    json.loads(call["function"]["arguments"])
    assert choice["steering"]["entropy"] != plain["steering"]["entropy"]


def test_diffadapt_composes_with_response_format(http):
    reply = chat(http, messages=[{"role": "user", "content": "What is 2 + 3? Answer as JSON."}],
                 response_format={"type": "json_object"}, max_tokens=48,
                 steering={"diffadapt": {"probe": "default"}})
    choice = reply["choices"][0]
    assert choice["steering"]["diffadapt"]["difficulty"] in {"easy", "normal", "hard"}
    content = choice["message"]["content"]  # the grammar's, finished or not: an object
    assert not content.strip() or content.lstrip().startswith("{"), content
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)


def test_vreason_composes_with_json_schema(http):
    reply = chat(http, messages=[{"role": "user", "content": "A cat, please."}],
                 response_format=JSON_SCHEMA, max_tokens=48, temperature=0,
                 steering={"vreason": {"every": 4}, "return_entropy": True})
    choice = reply["choices"][0]
    cat_is_valid(choice["message"]["content"])
    updates = choice["steering"]["vreason"]["updates"]
    assert updates and all(math.isfinite(u["entropy_after"]) for u in updates)


def test_streamed_entropy_with_n_and_prompts_matches_the_reports(http):
    """Each chunk's entropy and varentropy are its own tokens' (as many as its `token_ids`):
    concatenated per choice they are the final report's lists, for n > 1 and several prompts
    (choices merged in one stream)."""
    chunks = events(http, "/v1/completions", {
        "prompt": ["One, two,", "Red, green,"], "n": 2, "max_tokens": 6, "seed": 2,
        "return_token_ids": True, "steering": {"return_entropy": True}})
    streamed, tokens, reports = {}, {}, {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            i, steering = choice["index"], choice["steering"]
            ids = choice.get("token_ids") or []
            assert len(steering["chunk_entropy"]) == len(steering["chunk_varentropy"]) == \
                len(ids)
            for key in ("chunk_entropy", "chunk_varentropy"):
                streamed.setdefault((i, key), []).extend(steering[key])
            tokens.setdefault(i, []).extend(ids)
            if choice["finish_reason"] is not None:
                reports[i] = steering
    assert sorted(reports) == [0, 1, 2, 3]
    for i, report in reports.items():
        assert streamed[i, "chunk_entropy"] == report["token_entropy"]
        assert streamed[i, "chunk_varentropy"] == report["token_varentropy"]
        assert len(report["token_entropy"]) == len(tokens[i]) > 0


def test_choice_i_samples_with_seed_plus_i(http):
    together = complete(http, prompt="Once upon a time", n=3, seed=40, max_tokens=8,
                        temperature=1.0, return_token_ids=True)["choices"]
    for i, choice in enumerate(together):
        alone = complete(http, prompt="Once upon a time", seed=40 + i, max_tokens=8,
                         temperature=1.0, return_token_ids=True)["choices"][0]
        assert choice["token_ids"] == alone["token_ids"], i
    assert len({tuple(c["token_ids"]) for c in together}) > 1


@pytest.mark.parametrize("steering", [None, {"particles": {"n": 2, "max_steps": 1}}])
def test_a_prompt_beyond_the_context_is_a_400(http, steering):
    context = http.get("/v1/models").json()["data"][0]["max_model_len"]
    body = {"model": MODEL, "prompt": [7] * (context + 1), "max_tokens": 1,
            **({"steering": steering} if steering else {})}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and str(context) in error["message"]
    assert http.get("/health").status_code == 200
