"""The route families beside chat and completions, on the real engine: the Responses API, the
Anthropic Messages API, the chat batch route and SageMaker's `/invocations`, each with
steering. Steering provably acts on each: a steered answer equals the chat route's answer with
the same steering (same tokens, same entropies, same gate firings) and differs from the
unsteered one, so a route that dropped the steering would fail. Answers are checked against
OpenAI's published schemas and Anthropic's SDK types."""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import API_KEY
from tests.openai_spec import RESPONSE, RESPONSE_STREAM_EVENT, validate

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "Tell me about the sea."
TOKENS = 16
ALWAYS = {"signal": "entropy", "above": -1.0}
# EAST moves the greedy answer; the gate fires on every token (top_k 3 keeps greedy greedy);
# typical sampling is reported (greedy keeps its top token); the entropy lists come back.
STEERING = {"east": {"vector": "explore", "scale": 4.0}, "typical": {"p": 0.9},
            "gates": [{**ALWAYS, "then": {"top_k": 3}}], "return_entropy": True}
TOOL = {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}


def chat(http, steering: dict | None, question: str = QUESTION) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "max_tokens": TOKENS, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def events(http, path: str, body: dict) -> list[tuple[str | None, dict]]:
    """A stream's (event name, data) pairs."""
    out, name = [], None
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: ") and line != "data: [DONE]":
                out.append((name, json.loads(line[len("data: "):])))
                name = None
    return out


def responses_body(steering: dict | None = None, **fields) -> dict:
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": TOKENS, "temperature": 0,
            **fields}
    if steering is not None:
        body["steering"] = steering
    return body


def messages_body(steering: dict | None = None, **fields) -> dict:
    body = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}], **fields}
    if steering is not None:
        body["steering"] = steering
    return body


@pytest.fixture(scope="module")
def steered_chat(http) -> dict:
    return chat(http, STEERING)


@pytest.fixture(scope="module")
def plain_chat(http) -> dict:
    return chat(http, None)


def _same_steering(report: dict, chat_answer: dict) -> None:
    """The same methods acted on the same tokens (entropies to float noise: another request in
    the same engine steps changes the batch's arithmetic a little)."""
    expected = chat_answer["choices"][0]["steering"]
    assert report["methods"] == expected["methods"] == ["east", "gates", "typical"]
    assert report["typical"] == expected["typical"] == {"p": 0.9}
    [gate], [expected_gate] = report["gates"]["gates"], expected["gates"]["gates"]
    assert gate["fired"] == expected_gate["fired"] == list(range(TOKENS))
    assert report["token_entropy"] == pytest.approx(expected["token_entropy"], abs=1e-3)


def test_steered_chat_differs_from_plain(steered_chat, plain_chat):
    """What the other tests rely on: this steering changes the greedy answer."""
    assert steered_chat["choices"][0]["message"]["content"] != \
        plain_chat["choices"][0]["message"]["content"]


def test_responses_steer_as_chat(http, steered_chat):
    r = http.post("/v1/responses", json=responses_body(STEERING))
    assert r.status_code == 200, r.text
    data = r.json()
    validate(RESPONSE, data)
    [message] = data["output"]
    assert message["content"][0]["text"] == steered_chat["choices"][0]["message"]["content"]
    assert data["usage"]["input_tokens"] == steered_chat["usage"]["prompt_tokens"]
    _same_steering(message["steering"], steered_chat)
    assert data["steering"] == message["steering"]


def test_messages_steer_as_chat(http, steered_chat):
    r = http.post("/v1/messages", json=messages_body(STEERING))
    assert r.status_code == 200, r.text
    data = r.json()
    import anthropic.types

    anthropic.types.Message.model_validate(data, strict=True)
    assert data["content"] == [{"type": "text",
                                "text": steered_chat["choices"][0]["message"]["content"]}]
    assert data["usage"]["input_tokens"] == steered_chat["usage"]["prompt_tokens"]
    _same_steering(data["steering"], steered_chat)


def test_streamed_responses_carry_every_token_entropy(http, steered_chat):
    stream = events(http, "/v1/responses", responses_body(STEERING))
    for _, event in stream:
        validate(RESPONSE_STREAM_EVENT, event)
    deltas = [e for _, e in stream if e["type"] == "response.output_text.delta"]
    [completed] = [e for _, e in stream if e["type"] == "response.completed"]
    text = steered_chat["choices"][0]["message"]["content"]
    assert "".join(d["delta"] for d in deltas) == text
    report = completed["response"]["steering"]
    _same_steering(report, steered_chat)
    entropies = [x for d in deltas for x in d["steering"]["chunk_entropy"]]
    assert entropies == pytest.approx(report["token_entropy"], abs=1e-6)


def test_streamed_messages_carry_every_token_entropy(http, steered_chat):
    import anthropic.types
    from pydantic import TypeAdapter

    stream = events(http, "/v1/messages", messages_body(STEERING))
    adapter = TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for name, event in stream:
        assert name == event["type"]
        adapter.validate_python(event)
    deltas = [e for _, e in stream if e["type"] == "content_block_delta"]
    [stop] = [e for _, e in stream if e["type"] == "message_delta"]
    assert "".join(d["delta"]["text"] for d in deltas) == \
        steered_chat["choices"][0]["message"]["content"]
    _same_steering(stop["steering"], steered_chat)
    entropies = [x for d in deltas for x in d["steering"]["chunk_entropy"]]
    assert entropies == pytest.approx(stop["steering"]["token_entropy"], abs=1e-6)
    assert [name for name, _ in stream][:1] == ["message_start"]
    assert [name for name, _ in stream][-1] == "message_stop"


@pytest.mark.parametrize("body", [
    responses_body(tools=[{"type": "function", **TOOL}], tool_choice="required",
                   max_output_tokens=60),
    responses_body(max_output_tokens=60, text={"format": {
        "type": "json_schema", "name": "city", "strict": True,
        "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}),
    responses_body(max_output_tokens=40, text={"format": {"type": "json_object"}}),
    responses_body(instructions="Answer in one word.", top_logprobs=2,
                   include=["message.output_text.logprobs"]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_every_responses_shape_is_valid_against_openais_schema(http, body, stream):
    if stream:
        for _, event in events(http, "/v1/responses", body):
            validate(RESPONSE_STREAM_EVENT, event)
        return
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    validate(RESPONSE, data)
    if "tools" in body:
        [call] = data["output"]
        assert call["type"] == "function_call" and set(json.loads(call["arguments"])) == {"city"}
    elif "text" in body:
        json.loads(data["output"][0]["content"][0]["text"])
    else:
        assert data["output"][0]["content"][0]["logprobs"]


def test_a_function_call_output_turn(openai_client):
    first = openai_client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[{"type": "function", **TOOL}],
        tool_choice="required", max_output_tokens=60, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    second = openai_client.responses.create(
        model=MODEL, max_output_tokens=30, temperature=0, tools=[{"type": "function", **TOOL}],
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "Sunny, 24 degrees"}],
        extra_body={"steering": {"return_entropy": True}})
    validate(RESPONSE, second.model_dump(mode="json", exclude_unset=True))
    message = second.output[-1]
    assert message.type == "message" and second.output_text
    assert len(message.model_extra["steering"]["token_entropy"]) == second.usage.output_tokens
    assert second.usage.input_tokens > first.usage.input_tokens


def test_anthropic_sdk_create_stream_tools(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0,
                                 timeout=120)
    steering = {"temperature": 0, "steering": {"return_entropy": True}}
    made = client.messages.create(model=MODEL, max_tokens=TOKENS, extra_body=steering,
                                  messages=[{"role": "user", "content": QUESTION}])
    with client.messages.stream(model=MODEL, max_tokens=TOKENS, extra_body=steering,
                                messages=[{"role": "user", "content": QUESTION}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == made.content[0].text == final.content[0].text
    assert final.stop_reason == made.stop_reason == "max_tokens"
    assert len(made.model_extra["steering"]["token_entropy"]) == made.usage.output_tokens

    tools = [{"name": TOOL["name"], "description": TOOL["description"],
              "input_schema": TOOL["parameters"]}]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    forced = client.messages.create(model=MODEL, max_tokens=60, tools=tools,
                                    tool_choice={"type": "any"}, messages=[question],
                                    extra_body={"temperature": 0})
    [use] = [block for block in forced.content if block.type == "tool_use"]
    assert forced.stop_reason == "tool_use" and set(use.input) == {"city"}
    answered = client.messages.create(
        model=MODEL, max_tokens=30, tools=tools, extra_body={"temperature": 0},
        messages=[question, {"role": "assistant", "content": [use.model_dump()]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "Sunny, 24 degrees"}]}])
    assert answered.content[0].type == "text" and answered.content[0].text
    assert answered.usage.input_tokens > forced.usage.input_tokens


def test_a_system_prompt_and_stored_turns_render_as_chat_would(http):
    """Anthropic's `system`, the Responses API's `instructions`, and a stored response
    continued by `previous_response_id`, each give the prompt (and the greedy answer) of the
    chat request with the same turns."""
    system = "You answer in French."
    question = [{"role": "user", "content": QUESTION}]
    asked = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0,
               "messages": [{"role": "system", "content": system}, *question]}
    expected = http.post("/v1/chat/completions", json=asked).json()
    text = expected["choices"][0]["message"]["content"]
    message = http.post("/v1/messages", json=messages_body(system=system)).json()
    assert message["content"][0]["text"] == text
    first = http.post("/v1/responses", json=responses_body(instructions=system)).json()
    assert first["output"][0]["content"][0]["text"] == text
    assert first["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"]

    stored = http.get(f"/v1/responses/{first['id']}")  # the server stores (as vLLM, when asked)
    assert stored.status_code == 200, stored.text
    validate(RESPONSE, stored.json())
    assert stored.json()["output"][0]["content"][0]["text"] == text
    follow_up = "Say it again."
    chat_body = {**asked, "messages": [*asked["messages"],
                                       {"role": "assistant", "content": text},
                                       {"role": "user", "content": follow_up}]}
    expected = http.post("/v1/chat/completions", json=chat_body).json()
    second = http.post("/v1/responses", json=responses_body(
        input=follow_up, instructions=system, previous_response_id=first["id"],
        steering={"return_entropy": True})).json()
    validate(RESPONSE, second)
    assert second["output"][0]["content"][0]["text"] == \
        expected["choices"][0]["message"]["content"]
    assert len(second["steering"]["token_entropy"]) == second["usage"]["output_tokens"]
    missing = http.post("/v1/responses", json=responses_body(previous_response_id="resp_none"))
    assert missing.status_code == 404, missing.text


def test_an_assistant_turn_with_a_refusal_or_no_parts_renders_as_chat_would(http):
    """An earlier assistant message in `input` is its parts' text and refusals joined, as a
    chat assistant turn (vLLM alone answered a refusal part or empty `content` with a 500)."""
    def assistant(*parts) -> dict:
        return {"type": "message", "role": "assistant", "status": "completed", "id": "msg_1",
                "content": list(parts)}

    refusal = {"type": "refusal", "refusal": "I cannot."}
    text = {"type": "output_text", "text": " Ask again.", "annotations": []}
    for parts, said in (((refusal, text), "I cannot. Ask again."), ((), "")):
        turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": said},
                 {"role": "user", "content": "Why?"}]
        chat = http.post("/v1/chat/completions", json={
            "model": MODEL, "max_tokens": TOKENS, "temperature": 0, "messages": turns}).json()
        response = http.post("/v1/responses", json=responses_body(input=[
            turns[0], assistant(*parts), turns[2]]))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
        assert response.json()["output"][0]["content"][0]["text"] == \
            chat["choices"][0]["message"]["content"]


def test_count_tokens_counts_the_prompt_the_model_gets(http, steered_chat):
    r = http.post("/v1/messages/count_tokens", json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}]})
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] == steered_chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, status, kind, words", [
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, 400,
     "invalid_request_error", "max_tokens"),
    (messages_body(max_tokens=-1), 400, "invalid_request_error", "max_tokens"),
    (messages_body(steering={"typical": {"p": 2}}), 400, "invalid_request_error",
     "steering.typical.p"),
    (messages_body(model="other"), 404, "not_found_error", "other"),
])
def test_messages_errors_are_anthropic_error_bodies(http, body, status, kind, words):
    r = http.post("/v1/messages", json=body)
    assert r.status_code == status, r.text
    data = r.json()
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert data["error"]["type"] == kind and words in data["error"]["message"]


def test_messages_take_the_key_as_anthropic_sends_it(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model=MODEL, max_tokens=2,
                               messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "authentication_error"
    right = anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    assert right.messages.count_tokens(model=MODEL, messages=[
        {"role": "user", "content": "x"}]).input_tokens > 0


@pytest.mark.parametrize("steering", [
    {"particles": {"n": 2, "max_steps": 2}},
    {"deepconf": {"budget": 3, "warmup": 2}},
])
def test_an_orchestration_answers_a_response_as_it_answers_chat(http, steering):
    """Same prompt, same seed: the orchestration's answer and report on the Responses route
    are the chat route's; streamed, its progress arrives in `response.in_progress` events and
    every event holds to OpenAI's schema."""
    name = next(iter(steering))
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "seed": 5,
        "temperature": 0.8, "max_tokens": TOKENS, "steering": steering})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    body = responses_body(steering, seed=5, temperature=0.8)
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    validate(RESPONSE, data)
    [message] = data["output"]
    assert message["content"][0]["text"] == choice["message"]["content"]
    assert _close(message["steering"][name], choice["steering"][name])
    assert data["usage"]["output_tokens"] == r.json()["usage"]["completion_tokens"]
    stream = events(http, "/v1/responses", body)
    for _, event in stream:
        validate(RESPONSE_STREAM_EVENT, event)
    progress = [e for _, e in stream if e["type"] == "response.in_progress" and "steering" in e]
    assert progress and all(name in e["steering"] for e in progress)
    [done] = [e for _, e in stream if e["type"] == "response.completed"]
    assert done["response"]["output"][0]["content"][0]["text"] == choice["message"]["content"]
    assert _close(done["response"]["steering"][name], choice["steering"][name])


def _close(a, b) -> bool:
    """Equal, floats to 1e-4 (the particles share engine steps in different company)."""
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, abs=1e-4)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def test_fields_an_orchestration_cannot_honour_on_responses_are_a_400(http):
    r = http.post("/v1/responses", json=responses_body(
        {"particles": {"n": 2, "max_steps": 2}}, tools=[{"type": "function", **TOOL}]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools"


def test_diffadapt_frames_a_responses_request_as_a_chat_one(http):
    """The probe reads the same question, picks the same strategy, and the framed request
    samples the same tokens (its temperature is the strategy's; same seed)."""
    steering = {"diffadapt": {"probe": "default"}, "return_entropy": True}
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "seed": 3,
        "max_tokens": TOKENS, "steering": steering})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    body = responses_body(steering, seed=3)
    del body["temperature"]  # DiffAdapt picks it
    response = http.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    [message] = response.json()["output"]
    assert message["steering"]["diffadapt"] == choice["steering"]["diffadapt"]
    assert message["content"][0]["text"] == choice["message"]["content"]


def test_an_orchestration_rides_the_messages_route(http):
    particles = {"particles": {"n": 2, "max_steps": 2}}
    r = http.post("/v1/messages", json=messages_body(particles, temperature=0.8))
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["steering"]["methods"] == ["particles"]
    assert data["content"][0]["text"] and data["steering"]["particles"]["steps"]
    stream = events(http, "/v1/messages", messages_body(particles, temperature=0.8))
    names = [name for name, _ in stream]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    progress = [e for name, e in stream if name == "ping" and "steering" in e]
    assert progress and all("particles" in e["steering"] for e in progress)
    [stop] = [e for name, e in stream if name == "message_delta"]
    assert stop["steering"]["methods"] == ["particles"]


def test_the_batch_route_answers_each_conversation_as_chat(http, steered_chat, plain_chat):
    r = http.post("/v1/chat/completions/batch", json={
        "model": MODEL, "max_tokens": TOKENS, "temperature": 0, "stream": True,
        "steering": STEERING,
        "messages": [[{"role": "user", "content": QUESTION}],
                     [{"role": "user", "content": "Name a color."}]]})
    assert r.status_code == 200, r.text
    assert r.headers["X-Steer-Ignored-Fields"] == "stream"  # vLLM's batch never streams
    data = r.json()
    first, second = data["choices"]
    assert [first["index"], second["index"]] == [0, 1]
    assert first["message"]["content"] == steered_chat["choices"][0]["message"]["content"]
    _same_steering(first["steering"], steered_chat)
    alone = chat(http, STEERING, "Name a color.")
    assert second["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert data["usage"]["prompt_tokens"] == steered_chat["usage"]["prompt_tokens"] + \
        alone["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body, text_of", [
    ({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS,
      "temperature": 0, "steering": STEERING},
     lambda choice: choice["message"]["content"]),
])
def test_invocations_is_chat_with_messages(http, steered_chat, body, text_of):
    r = http.post("/invocations", json=body)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    assert text_of(choice) == steered_chat["choices"][0]["message"]["content"]
    _same_steering(choice["steering"], steered_chat)
    r = http.post("/invocations", json={"prompt": "Once upon a time", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_load_counts_requests_in_flight(http, server):
    import httpx

    assert http.get("/load").json() == {"server_load": 0}
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 2000, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as other:
        with other.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # held: a closed iterator would close the stream
            first = next(line for line in lines if line)
            assert json.loads(first[len("data: "):])["choices"], first  # a token, no error
            # the stream is open: its request is in flight until it is closed
            assert http.get("/load").json() == {"server_load": 1}
    deadline = time.monotonic() + 60  # a closed stream's request ends when the server sees it
    while http.get("/load").json() != {"server_load": 0} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http.get("/load").json() == {"server_load": 0}
