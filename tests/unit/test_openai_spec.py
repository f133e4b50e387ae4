"""The vendored OpenAI schemas: every `$ref` resolves, and the Responses API's answers (`Response`
and `ResponseStreamEvent`) accept what OpenAI documents and reject what they must not."""

import copy

import pytest

from tests.openai_spec import (
    CHAT_CHUNK,
    CHAT_RESPONSE,
    COMPLETION_RESPONSE,
    RESPONSE,
    RESPONSE_STREAM_EVENT,
    _document,
    validate,
)

PREFIX = "#/components/schemas/"
DROP = object()  # a change that removes the key

OUTPUT_TEXT = {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}
MESSAGE = {
    "type": "message",
    "id": "msg_1",
    "status": "completed",
    "role": "assistant",
    "content": [OUTPUT_TEXT],
}
NULL_LOGPROBS = dict(OUTPUT_TEXT, logprobs=None)
NO_STATUS = {key: value for key, value in MESSAGE.items() if key != "status"}
RESPONSE_PAYLOAD = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "completed_at": 1741476778,
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "max_output_tokens": None,
    "model": "my-model",
    "output": [MESSAGE],
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": {"effort": None, "summary": None},
    "store": False,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": 1.0,
    "truncation": "disabled",
    "usage": {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    },
    "metadata": {},
}


def _refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _response(**changes) -> dict:
    payload = copy.deepcopy(RESPONSE_PAYLOAD)
    for key, value in changes.items():
        if value is DROP:
            payload.pop(key, None)
        else:
            payload[key] = value
    return payload


def test_every_ref_resolves_and_nothing_openapi_only_is_left():
    schemas = _document()["components"]["schemas"]
    for name in (CHAT_RESPONSE, CHAT_CHUNK, COMPLETION_RESPONSE, RESPONSE, RESPONSE_STREAM_EVENT):
        assert name in schemas
    refs = set(_refs(schemas))
    assert all(ref.startswith(PREFIX) for ref in refs)
    assert {ref[len(PREFIX) :] for ref in refs} <= set(schemas)

    def walk(node):
        if isinstance(node, dict):
            assert "nullable" not in node
            assert not any(key.startswith("x-") for key in node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schemas)


def test_minimal_completed_response_is_valid():
    validate(RESPONSE, RESPONSE_PAYLOAD)


def test_only_the_required_keys_suffice():
    required = {
        "id", "object", "created_at", "error", "incomplete_details", "instructions", "model",
        "tools", "output", "parallel_tool_calls", "metadata", "tool_choice", "temperature",
        "top_p",
    }  # fmt: skip
    validate(RESPONSE, {key: RESPONSE_PAYLOAD[key] for key in required})
    for key in required:
        with pytest.raises(AssertionError, match=f"'{key}' is a required property"):
            validate(RESPONSE, _response(**{key: DROP}))


@pytest.mark.parametrize(
    "changes",
    [
        {"error": {"code": "server_error", "message": "boom"}, "status": "failed"},
        {"incomplete_details": {"reason": "max_output_tokens"}, "status": "incomplete"},
        {"instructions": "Be brief."},
        {"metadata": None, "temperature": None, "top_p": None, "completed_at": None},
        {"output": [dict(MESSAGE, phase="final_answer")]},
        {"output": [dict(MESSAGE, phase=None)]},
        {"output": [dict(MESSAGE, content=[{"type": "refusal", "refusal": "No."}])]},
        {"status": DROP, "usage": DROP, "text": DROP, "user": DROP},
        {"user": "user-1234"},
    ],
)
def test_other_valid_responses(changes):
    validate(RESPONSE, _response(**changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"text": None}, "None is not of type 'object'"),
        ({"usage": None}, "None is not of type 'object'"),
        ({"user": None}, "None is not of type 'string'"),  # though OpenAI's own example has it
        ({"error": DROP}, "'error' is a required property"),
        ({"status": "done"}, "'done' is not one of"),
        ({"object": "chat.completion"}, "'chat.completion' is not one of"),
        ({"output": [dict(MESSAGE, content=[NULL_LOGPROBS])]}, "None is not of type 'array'"),
        ({"output": [NO_STATUS]}, "'status' is a required property"),
    ],
)
def test_invalid_responses(changes, message):
    with pytest.raises(AssertionError, match=message):
        validate(RESPONSE, _response(**changes))


def test_output_text_needs_logprobs_though_openai_examples_omit_it():
    text = {k: v for k, v in OUTPUT_TEXT.items() if k != "logprobs"}
    with pytest.raises(AssertionError, match="'logprobs' is a required property"):
        validate(RESPONSE, _response(output=[dict(MESSAGE, content=[text])]))


def _stream() -> list[dict]:
    """The events of a streamed one-message answer, in order."""
    in_progress = _response(status="in_progress", completed_at=None, output=[], usage=DROP)
    item = dict(MESSAGE, status="in_progress", content=[])
    part = dict(OUTPUT_TEXT, text="")
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events = [
        {"type": "response.created", "response": in_progress},
        {"type": "response.in_progress", "response": in_progress},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **at, "part": part},
        {"type": "response.output_text.delta", **at, "delta": "Hel", "logprobs": []},
        {"type": "response.output_text.delta", **at, "delta": "lo!", "logprobs": []},
        {"type": "response.output_text.done", **at, "text": "Hello!", "logprobs": []},
        {"type": "response.content_part.done", **at, "part": OUTPUT_TEXT},
        {"type": "response.output_item.done", "output_index": 0, "item": MESSAGE},
        {"type": "response.completed", "response": RESPONSE_PAYLOAD},
    ]
    return [dict(event, sequence_number=n) for n, event in enumerate(events)]


def test_stream_events_are_valid():
    for event in _stream():
        validate(RESPONSE_STREAM_EVENT, event)


def test_other_valid_stream_events():
    incomplete = _response(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    failed = _response(status="failed", error={"code": "server_error", "message": "boom"})
    logprob = {"token": "Hel", "logprob": -0.1, "top_logprobs": [{"token": "Hel", "logprob": -0.1}]}
    for event in [
        {"type": "response.incomplete", "response": incomplete, "sequence_number": 9},
        {"type": "response.failed", "response": failed, "sequence_number": 9},
        {"type": "error", "code": None, "message": "boom", "param": None, "sequence_number": 3},
        dict(_stream()[4], logprobs=[logprob]),
    ]:
        validate(RESPONSE_STREAM_EVENT, event)


@pytest.mark.parametrize(
    "index, changes, message",
    [
        (4, {"logprobs": DROP}, "'logprobs' is a required property"),  # output_text.delta
        (4, {"sequence_number": DROP}, "'sequence_number' is a required property"),
        (4, {"delta": None}, r"\$.delta: None is not of type 'string'"),
        (4, {"type": "response.output_text.deltas"}, "'response.output_text.deltas' is not one"),
        (9, {"response": _response(text=None)}, r"\$.response.text: None is not of type"),
        (9, {"response": DROP}, "'response' is a required property"),  # response.completed
    ],
)
def test_invalid_stream_events(index, changes, message):
    event = _stream()[index]
    for key, value in changes.items():
        if value is DROP:
            del event[key]
        else:
            event[key] = value
    with pytest.raises(AssertionError, match=message):
        validate(RESPONSE_STREAM_EVENT, event)
