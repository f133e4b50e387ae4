"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`), as `vllm serve`
answers it, with steering.

vLLM's own Anthropic layer does the translation both ways: a Messages request becomes a chat
completion request (system, content blocks, images, tools, `tool_choice`, tool results,
thinking), and the chat answer becomes a Message or its stream of events. In between, the chat
request runs through this server's generation path (`server.routes.generate`), so every method
and orchestration works here as on chat. The `steering` report rides the answer: on the
Message, on the stream's `message_delta` event, each `content_block_delta` carries its tokens'
entropy when asked, and an orchestration's progress arrives in `ping` events (which Anthropic's
SDKs skip).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, ValidationError
from vllm.entrypoints.anthropic.protocol import (
    AnthropicCountTokensRequest,
    AnthropicCountTokensResponse,
    AnthropicMessagesRequest,
    AnthropicMessagesResponse,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse as VllmChatCompletionResponse,
)

from server.deps import HoldDep, StateDep, require_api_key
from server.dialects import CHAT, Rendering
from server.errors import ANTHROPIC_ERROR_RESPONSES, anthropic_error_body, validation_error
from server.requests import ChatCompletionRequest, SteeringFields, StrictJSON
from server.routes import generate
from server.serving import raise_error
from steering.errors import error_for_status
from steering.methods.registry import REQUEST_FIELDS

PREFIX = "/v1/messages"

router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_api_key)],
                   responses=ANTHROPIC_ERROR_RESPONSES)

# The fields a Messages request shares with a chat request's steering extensions.
STEERING_FIELDS = ("steering", *REQUEST_FIELDS)


class MessagesRequest(SteeringFields, AnthropicMessagesRequest):
    """vLLM's Messages request with `steering` and the methods' request-level fields."""

    model_config = ConfigDict(extra="allow")


class CountTokensRequest(StrictJSON, AnthropicCountTokensRequest):
    model_config = ConfigDict(extra="allow")


class MessagesResponse(AnthropicMessagesResponse):
    steering: dict


@router.post("", response_model=MessagesResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "a Message, or its events with `stream: true`"}})
async def create_message(body: MessagesRequest, request: Request, state: StateDep,
                         hold: HoldDep):
    messages = state.serving.messages
    chat = await _chat_request(body, messages)
    return await generate(CHAT, chat, request, state, hold,
                          rendering=MessagesRendering(messages), ignored=body.ignored_fields)


@router.post("/count_tokens", response_model=AnthropicCountTokensResponse)
async def count_tokens(body: CountTokensRequest, request: Request, state: StateDep):
    result = await state.serving.messages.count_tokens(body, request)
    raise_error(result)
    return JSONResponse(result.model_dump(exclude_none=True))


async def _chat_request(body: MessagesRequest, messages) -> ChatCompletionRequest:
    """The chat request vLLM's Anthropic layer makes of `body`, with its steering fields."""
    effort = "none"
    if body.thinking is not None and body.thinking.type == "disabled":
        effort = await messages._get_disabled_thinking_effort()
    chat = messages.to_chat_completion_request(
        body, merge_inline_system=messages._merge_inline_system,
        disabled_thinking_effort=effort)
    fields = chat.model_dump(mode="json", exclude_unset=True)
    fields |= body.model_dump(mode="json", include=set(STEERING_FIELDS), exclude_unset=True)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


class MessagesRendering(Rendering):
    """A chat answer as vLLM's Anthropic layer converts it, with the choice's steering."""

    def __init__(self, messages) -> None:
        self.messages = messages

    def whole(self, answer: dict) -> dict:
        choice = answer["choices"][0]
        message = self.messages.messages_full_converter(
            VllmChatCompletionResponse.model_validate(answer))
        return {**_dumped(message), "steering": choice["steering"]}

    async def stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """vLLM's converter over the chat stream; each chat chunk's `steering` is kept aside
        and given to the next event that carries tokens (a tool call's text may be held
        back), the report to `message_delta`."""
        held: dict = {}
        side: list[str] = []  # events of ours, sent before the converter's next

        async def chat_chunks() -> AsyncIterator[str]:
            head = True
            async for event in events:
                if not event.startswith("data: {"):
                    yield event
                    continue
                chunk = json.loads(event[len("data: "):])
                if "error" in chunk:
                    side.append(_error_event(chunk["error"]))
                    return
                if head:  # vLLM's converter turns the first chunk into `message_start`
                    yield _data({**chunk, "choices": [], "usage": None})
                    head = False
                if not chunk["choices"] and "steering" in chunk:  # an orchestration's progress
                    side.append(_event("ping", {"type": "ping", "steering": chunk["steering"]}))
                    continue
                for choice in chunk["choices"]:
                    _hold_steering(held, choice.pop("steering", {}))
                yield _data(chunk)

        async for event in self.messages.message_stream_converter(chat_chunks()):
            while side:
                yield side.pop(0)
            name, _, data = event.partition("\ndata: ")
            name = name.removeprefix("event: ")
            if name == "content_block_delta" and "chunk_entropy" in held:
                payload = json.loads(data)
                payload["steering"] = {k: held.pop(k) for k in ("chunk_entropy",
                                                                  "chunk_varentropy")}
                event = _event(name, payload)
            elif name == "message_delta":
                payload = json.loads(data)
                payload["steering"] = held.pop("report", {})
                event = _event(name, payload)
            yield event
        while side:
            yield side.pop(0)


def _hold_steering(held: dict, steering: dict) -> None:
    """Keep a chat chunk's steering until an Anthropic event can carry it: token entropies
    add up, the report (the rest of a last chunk's steering) waits for `message_delta`."""
    for key in ("chunk_entropy", "chunk_varentropy"):
        if key in steering:
            held[key] = held.get(key, []) + steering.pop(key)
    if steering:
        held["report"] = steering


def _dumped(message: AnthropicMessagesResponse) -> dict:
    """A Message as Anthropic's API writes one (`stop_sequence` is always present)."""
    return {"stop_sequence": None, **message.model_dump(exclude_none=True)}


def _data(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _event(name: str, payload: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


def _error_event(error: dict) -> str:
    """An error after the stream began, as Anthropic sends it."""
    mapped = error_for_status(error.get("code") or 500, error.get("message") or "internal error")
    return _event("error", anthropic_error_body(mapped))
