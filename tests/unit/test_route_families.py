"""The Responses and Anthropic answers' shaping, without an engine: vLLM's shapes made valid
against OpenAI's published schema (the list of keys that keep their `null` is exactly what the
vendored schema requires and lets be null), the steering report placed, Anthropic's error
bodies and the chunk entropies held for the next event that carries tokens."""

from __future__ import annotations

import json

import pytest

from server.anthropic_messages import _hold_steering
from server.errors import anthropic_error_body
from server.openai_responses import NULLABLE_KEYS, tidy_event, tidy_response
from steering.errors import EngineBusy, InvalidRequest, NotFound, Unauthorized
from tests.openai_spec import RESPONSE, RESPONSE_STREAM_EVENT, SCHEMAS_PATH, validate


def _required_nullable_keys() -> set[str]:
    """Every property the Response and stream-event schemas require and let be null."""
    schemas = json.loads(SCHEMAS_PATH.read_text())["components"]["schemas"]

    def resolved(schema):
        while isinstance(schema, dict) and "$ref" in schema:
            schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
        return schema

    def nullable(schema) -> bool:
        schema = resolved(schema)
        kind = schema.get("type")
        return kind == "null" or (isinstance(kind, list) and "null" in kind) or any(
            nullable(s) for key in ("anyOf", "oneOf") for s in schema.get(key, ())) or (
            "allOf" in schema and all(nullable(s) for s in schema["allOf"]))

    def fields(schema) -> tuple[dict, set]:
        schema = resolved(schema)
        properties, required = dict(schema.get("properties", {})), set(schema.get("required", ()))
        for part in schema.get("allOf", ()):
            more, needed = fields(part)
            properties |= more
            required |= needed
        return properties, required

    found, seen = set(), set()

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                seen.add(name)
                walk(schemas[name])
            return
        properties, required = fields(node)
        found.update(k for k, v in properties.items() if k in required and nullable(v))
        for value in node.values():
            walk(value)

    walk({"$ref": f"#/{RESPONSE}"})
    walk({"$ref": f"#/{RESPONSE_STREAM_EVENT}"})
    return found


def test_the_kept_nulls_are_exactly_the_schemas_required_nullable_keys():
    assert NULLABLE_KEYS == _required_nullable_keys()


def _vllm_response(**changes) -> dict:
    """A Response as vLLM 0.32 dumps one (its nulls included), with a function call."""
    response = {
        "id": "resp_1", "created_at": 1, "incomplete_details": None, "instructions": None,
        "metadata": None, "model": "m", "object": "response", "parallel_tool_calls": True,
        "temperature": 1.0, "tool_choice": "auto", "top_p": 1.0, "background": False,
        "max_output_tokens": 8, "max_tool_calls": None, "previous_response_id": None,
        "prompt": None, "reasoning": None, "service_tier": "auto", "status": "completed",
        "text": None, "top_logprobs": None, "truncation": "disabled", "user": None,
        "tools": [{"type": "function", "name": "f", "strict": None, "defer_loading": None,
                   "description": None,
                   "parameters": {"type": "object", "properties": {
                       "x": {"type": ["string", "null"], "default": None}}}}],
        "output": [
            {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
             "phase": None, "content": [{"type": "output_text", "text": "hi",
                                         "annotations": [], "logprobs": None}]},
            {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "f",
             "arguments": "{}", "status": "completed", "namespace": None, "async": None,
             "caller": None}],
        "usage": {"input_tokens": 3, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 5}}
    return {**response, **changes}


def test_a_vllm_response_becomes_schema_valid_with_its_report():
    with pytest.raises(AssertionError):
        validate(RESPONSE, _vllm_response())
    report = {"methods": ["typical"]}
    tidy = tidy_response(_vllm_response(), report)
    validate(RESPONSE, tidy)
    assert tidy["error"] is None and "text" not in tidy and "user" not in tidy
    assert tidy["steering"] == report and tidy["output"][0]["steering"] == report
    assert "steering" not in tidy["output"][1]  # reports go on messages only
    assert tidy["tools"][0]["strict"] is None  # required, nullable: kept
    assert tidy["tools"][0]["parameters"]["properties"]["x"]["default"] is None  # the client's
    assert tidy["output"][0]["content"][0]["logprobs"] == []


def test_stream_events_become_schema_valid():
    events = [
        {"type": "response.created", "sequence_number": 0,
         "response": _vllm_response(status="in_progress", output=[], usage=None)},
        {"type": "response.output_item.done", "sequence_number": 1, "output_index": 1,
         "item": _vllm_response()["output"][1]},
        {"type": "response.content_part.added", "sequence_number": 2, "output_index": 0,
         "content_index": 0, "item_id": "msg_1",
         "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": None}},
        {"type": "error", "sequence_number": 3, "code": 400, "message": "bad", "param": None},
    ]
    for event in events:
        validate(RESPONSE_STREAM_EVENT, tidy_event(event))


@pytest.mark.parametrize("error, kind", [
    (InvalidRequest("must be positive", "max_tokens"), "invalid_request_error"),
    (Unauthorized("wrong key"), "authentication_error"),
    (NotFound("no such model"), "not_found_error"),
    (EngineBusy("busy"), "rate_limit_error"),
])
def test_anthropic_error_bodies(error, kind):
    import anthropic.types

    body = anthropic_error_body(error)
    anthropic.types.ErrorResponse.model_validate(body, strict=True)
    assert body["error"]["type"] == kind
    assert error.message in body["error"]["message"]
    if error.param:
        assert body["error"]["message"].startswith(f"{error.param}: ")


def test_chunk_entropies_wait_for_the_event_that_carries_their_tokens():
    held: dict = {}
    _hold_steering(held, {"chunk_entropy": [1.0], "chunk_varentropy": [0.1]})
    _hold_steering(held, {"chunk_entropy": [2.0, 3.0], "chunk_varentropy": [0.2, 0.3]})
    assert held == {"chunk_entropy": [1.0, 2.0, 3.0], "chunk_varentropy": [0.1, 0.2, 0.3]}
    _hold_steering(held, {"chunk_entropy": [], "chunk_varentropy": [], "methods": []})
    assert held["report"] == {"methods": []}
