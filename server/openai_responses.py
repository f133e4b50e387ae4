"""The OpenAI Responses API (`/v1/responses`, retrieve, cancel), as `vllm serve` answers it,
with steering.

vLLM's own Responses serving code does the work (input items, `instructions`, function tools
and every `tool_choice`, `function_call_output` turns, `text.format`, streaming events,
`store` / `previous_response_id` / background / retrieve / cancel as vLLM does them, which
store only when the server runs with `VLLM_ENABLE_RESPONSES_API_STORE=1`); the request's
engine request is steered through a session, as on chat, after DiffAdapt's pass when asked
(`ResponsesConversation`). A method that answers the request itself (the particle filter,
DeepConf) runs on the prompt vLLM's Responses layer renders, and its answer becomes a Response
(`FromChat`). The answer gains the `steering` report (on the Response and on each output
message), streamed text and argument deltas their tokens' entropy when asked, and OpenAI's
`Response` schema's shape where vLLM's differs (an `error` key always, no `null` where the
schema wants a value or nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from functools import cached_property
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from openai.types.responses import ResponseOutputMessage, ResponseOutputText
from pydantic import field_validator
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.responses.protocol import (
    ResponsesRequest as VllmResponsesRequest,
)
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse, ResponseUsage

from server.deps import HoldDep, StateDep, require_api_key
from server.dialects import Conversation, Dialect, Rendering
from server.errors import ERROR_RESPONSES, in_band_error
from server.requests import SteeringFields
from server.routes import event_stream, generate
from server.serving import ChoiceReports, raise_error, without_nulls
from steering.errors import NotFound
from steering.framing import Framing

router = APIRouter(prefix="/v1/responses", dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)

# The keys OpenAI's `Response` and stream event schemas require but let be `null`; every other
# null vLLM sends (e.g. `text`, `user`, `usage`) means "unset" and is left out.
NULLABLE_KEYS = frozenset({
    "annotation", "call_id", "code", "environment", "error", "incomplete_details",
    "instructions", "keys", "max_output_length", "metadata", "outputs", "param", "parameters",
    "result", "strict", "temperature", "timeout_ms", "top_p"})
# Values that are a client's own JSON (tool parameters, a `text.format` schema, metadata).
OPAQUE_KEYS = frozenset({"parameters", "schema", "metadata"})


class ResponsesRequest(SteeringFields, VllmResponsesRequest):
    """vLLM's Responses request with `steering` and the methods' request-level fields, and
    the chat fields an orchestration reads, as a Response has them."""

    @field_validator("input")
    @classmethod
    def _assistant_turns_as_one_text(cls, items):
        """An earlier assistant message in `input` becomes one text part, its parts' text and
        refusals in order: vLLM renders an assistant turn from its first part's `text` only,
        which a refusal part or an empty `content` does not have (it answered 500)."""
        if isinstance(items, str):
            return items
        return [item.model_copy(update={"content": [ResponseOutputText(
                    type="output_text", annotations=[],
                    text="".join(part.text if isinstance(part, ResponseOutputText)
                                 else part.refusal for part in item.content))]})
                if isinstance(item, ResponseOutputMessage) else item for item in items]

    @property
    def n(self) -> None:
        """A Response has one answer."""
        return None

    @property
    def token_limit(self) -> int | None:
        return self.max_output_tokens

    @property
    def logprobs(self) -> bool:
        return self.is_include_output_logprobs()

    @property
    def return_token_ids(self) -> bool:
        return False

    @property
    def stream_options(self) -> StreamOptions:
        """A Response's stream ends with its usage."""
        return StreamOptions(include_usage=True)

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict | None = None):
        """vLLM's conversion, tagged by the bound session."""
        params = VllmResponsesRequest.to_sampling_params(self, max_tokens,
                                                         default_sampling_params)
        if self._session is not None:
            self._session.tag(params)
        return params


class SteeredResponse(ResponsesResponse):
    steering: dict


@router.post("", response_model=SteeredResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a Response, or its events with `stream: true`"}})
async def create_response(body: ResponsesRequest, request: Request, state: StateDep,
                          hold: HoldDep):
    return await generate(RESPONSES, body, request, state, hold)


@router.get("/{response_id}", response_model=ResponsesResponse)
async def retrieve_response(response_id: str, state: StateDep,
                            starting_after: Annotated[int | None, Query()] = None,
                            stream: Annotated[bool, Query()] = False) -> Response:
    """A stored response (or, with `stream`, a background response's events)."""
    result = await state.serving.responses.retrieve_responses(
        response_id, starting_after=starting_after, stream=stream)
    raise_error(result)
    if isinstance(result, ResponsesResponse):
        return JSONResponse(tidy_response(_dumped(result)))
    return event_stream(_tidy_events(result))


@router.post("/{response_id}/cancel", response_model=ResponsesResponse)
async def cancel_response(response_id: str, state: StateDep) -> Response:
    """Cancel a background response (vLLM's semantics: only background responses can be)."""
    result = await state.serving.responses.cancel_responses(response_id)
    raise_error(result)
    return JSONResponse(tidy_response(_dumped(result)))


def _dumped(model) -> dict:
    return model.model_dump(mode="json", by_alias=True)


def tidy_response(response: dict, report: dict | None = None) -> dict:
    """A Response as OpenAI's schema has it, with the steering report (when there is one) on
    it and on each output message."""
    response = without_nulls(response, NULLABLE_KEYS, OPAQUE_KEYS)
    response.setdefault("error", None)
    if (usage := response.get("usage")) is not None:
        usage.setdefault("input_tokens_details", {}).setdefault("cache_write_tokens", 0)
    for item in response.get("output", []):
        tidy_item(item)
        if report is not None and item.get("type") == "message":
            item["steering"] = report
    if report is not None:
        response["steering"] = report
    return response


def tidy_item(item: dict) -> dict:
    """An output item's text parts with their `logprobs` list (the schema requires one)."""
    for part in item.get("content") or []:
        tidy_part(part)
    return item


def tidy_part(part: dict) -> dict:
    if part.get("type") == "output_text" and part.get("logprobs") is None:
        part["logprobs"] = []
    return part


def _annotated(result: ResponsesResponse, reports: ChoiceReports) -> dict:
    reports.finished(0)
    return tidy_response(_dumped(result), reports.report(0))


async def _annotated_stream(events: AsyncIterator, reports: ChoiceReports,
                            return_entropy: bool) -> AsyncIterator[str]:
    """vLLM's events as server-sent events: each delta gains the entropy of the tokens
    produced since the previous one (when asked), the final response the report."""
    sent = 0
    async for event in _events(events, lambda exc: reports.metrics.count_error(reports.plan,
                                                                              exc)):
        kind = event["type"]
        if kind.endswith(".delta") and return_entropy:
            record = reports.session.record(0)
            start, sent = sent, record.produced
            entropy, varentropy = record.window(start)
            event["steering"] = {"chunk_entropy": entropy, "chunk_varentropy": varentropy}
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            reports.finished(0)
            event["response"] = tidy_response(event["response"], reports.report(0))
        yield _sse(event)


async def _tidy_events(events: AsyncIterator) -> AsyncIterator[str]:
    async for event in _events(events):
        yield _sse(event)


async def _events(events: AsyncIterator, failed=None) -> AsyncIterator[dict]:
    """vLLM's stream events as OpenAI's schema has them; an error raised mid-stream becomes
    an `error` event (and is passed to `failed`)."""
    try:
        async for event in events:
            yield tidy_event(_dumped(event))
    except Exception as exc:  # the status line is gone: report in-band
        if failed is not None:
            failed(exc)
        error = in_band_error(exc)["error"]
        yield {"type": "error", "code": error["type"], "message": error["message"],
               "param": error["param"], "sequence_number": -1}


def tidy_event(event: dict) -> dict:
    if isinstance(event.get("response"), dict):
        event["response"] = tidy_response(event["response"])
    if isinstance(event.get("item"), dict):
        event["item"] = tidy_item(without_nulls(event["item"], NULLABLE_KEYS, OPAQUE_KEYS))
    if isinstance(event.get("part"), dict):
        tidy_part(event["part"])
    if event.get("type") == "error":
        code = event.get("code")
        event["code"] = None if code is None else str(code)
    return event


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def prompt_ids(serving, body: ResponsesRequest) -> list[list[int]]:
    """The token ids vLLM's Responses layer generates from (input, instructions, tools, the
    stored previous response's turns), as the one prompt of the request."""
    previous = None
    if body.previous_response_id is not None:
        previous = serving.responses.response_store.get(body.previous_response_id)
        if previous is None:
            raise NotFound(f"no stored response '{body.previous_response_id}'",
                           "previous_response_id")
    result = await serving.responses._render_resolved_response_inputs(body, previous)
    raise_error(result)
    return [list(result.engine_input["prompt_token_ids"])]


class ResponsesConversation(Conversation):
    """A Responses request as a method's pass before generation sees it: the question is the
    last user message with text content; a framing's system prompt becomes `instructions` when
    the request has none, its prefill an unfinished assistant message the model continues."""

    chat = True

    @cached_property
    def items(self) -> list:
        given = self.body.model_dump(mode="json", include={"input"})["input"]
        return [{"role": "user", "content": given}] if isinstance(given, str) else given

    @cached_property
    def last_user(self) -> int | None:
        return max((i for i, item in enumerate(self.items)
                    if item.get("role") == "user" and isinstance(item.get("content"), str)),
                   default=None)

    def questions(self) -> list[str] | None:
        return None if self.last_user is None else [self.items[self.last_user]["content"]]

    def question_is_last(self) -> bool:
        return self.last_user == len(self.items) - 1

    @property
    def max_tokens(self) -> int | None:
        return self.body.max_output_tokens

    def _asking(self, question: str, framing: Framing) -> ResponsesRequest:
        items = [*self.items]
        items[self.last_user] = {**items[self.last_user], "content": framing.wrap(question)}
        if framing.prefill:  # unfinished: vLLM continues the assistant's message
            items.append({"type": "message", "role": "assistant", "id": "msg_prefill",
                          "status": "in_progress", "content": [
                              {"type": "output_text", "text": framing.prefill,
                               "annotations": []}]})
        fields = self.body.model_dump(mode="json", exclude_unset=True) | {"input": items}
        has_system = self.body.instructions is not None or any(
            item.get("role") in ("system", "developer") for item in self.items)
        if framing.system and not has_system:
            fields["instructions"] = framing.system
        return ResponsesRequest.model_validate(fields)

    async def render(self, question: str, framing: Framing) -> list[int]:
        return (await prompt_ids(self.serving, self._asking(question, framing)))[0]

    def framed(self, questions: list[str], framings: list[Framing]) -> ResponsesRequest:
        return self._asking(questions[0], framings[0])


class FromChat(Rendering):
    """An orchestration's answer (made in chat's shape: one choice) as a Response: one output
    message with the chosen text, and its stream as the Responses events, the
    orchestration's progress in `response.in_progress` events."""

    def __init__(self, body: ResponsesRequest, state) -> None:
        self.body, self.model = body, state.model_name
        self.id, self.created = body.request_id, int(time.time())
        budget = body.max_output_tokens or state.engine.max_model_len
        self.sampling = VllmResponsesRequest.to_sampling_params(body, budget, {})

    def response(self, status: str, choice: dict | None = None, text: str = "",
                 usage: dict | None = None) -> dict:
        """The Response, in progress or (with the chosen `choice` and its `text`) done."""
        output = [] if choice is None else [self.message(text)]
        response = ResponsesResponse.from_request(
            self.body, self.sampling, model_name=self.model, created_time=self.created,
            output=output, status=status, usage=None if usage is None else ResponseUsage(
                input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
                total_tokens=usage["total_tokens"],
                input_tokens_details={"cached_tokens": 0, "cache_write_tokens": 0},
                output_tokens_details={}))
        return tidy_response(_dumped(response), None if choice is None else choice["steering"])

    def message(self, text: str | None) -> dict:
        """The output message: with `text`, completed; without, as it starts."""
        return {"id": f"msg_{self.id}", "type": "message", "role": "assistant",
                "status": "in_progress" if text is None else "completed",
                "content": [] if text is None else [self.part(text)]}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def whole(self, answer: dict) -> dict:
        [choice] = answer["choices"]
        return self.response(_status(choice), choice, choice["message"]["content"],
                             answer["usage"])

    async def stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        number = 0

        def event(kind: str, **fields) -> str:
            nonlocal number
            number += 1
            return _sse({"type": kind, "sequence_number": number - 1, **fields})

        yield event("response.created", response=self.response("in_progress"))
        yield event("response.in_progress", response=self.response("in_progress"))
        choice, text = None, ""
        async for line in events:
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                error = chunk["error"]
                yield event("error", code=error["type"], message=error["message"],
                            param=error["param"])
                return
            if "usage" in chunk:  # the last chunk
                yield event("response.completed", response=self.response(
                    _status(choice), choice, text, chunk["usage"]))
                continue
            if not chunk["choices"]:  # the orchestration's progress
                yield event("response.in_progress", response=self.response("in_progress"),
                            steering=chunk["steering"])
                continue
            [choice] = chunk["choices"]
            at = {"item_id": f"msg_{self.id}", "output_index": 0, "content_index": 0}
            text = choice["delta"]["content"]
            yield event("response.output_item.added", output_index=0, item=self.message(None))
            yield event("response.content_part.added", part=self.part(""), **at)
            yield event("response.output_text.delta", delta=text, logprobs=[], **at)
            yield event("response.output_text.done", text=text, logprobs=[], **at)
            yield event("response.content_part.done", part=self.part(text), **at)
            yield event("response.output_item.done", output_index=0,
                        item={**self.message(text), "steering": choice["steering"]})


def _status(choice: dict) -> str:
    """vLLM's: a Response its token budget cut off is incomplete."""
    return "incomplete" if choice["finish_reason"] == "length" else "completed"


RESPONSES = Dialect("response", "response", "resp",
                    lambda serving, body, raw: serving.responses.create_responses(body, raw),
                    _annotated, _annotated_stream, prompt_ids, ResponsesConversation,
                    from_chat=FromChat)
