"""What tells the two generation routes apart (`Dialect`), each one's view of a request as a
conversation whose questions a method may frame before generation (`Conversation`), and the
shape an answer is sent in (`Rendering`: OpenAI's, or another API family's built on them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from fastapi import Request

from server.requests import GenerationRequest
from server.serving import ChoiceReports, OpenAIServing, annotate_response, annotate_stream
from steering.framing import Framing


def _role(message) -> str | None:
    """A chat message's role (vLLM also accepts message objects, e.g. Harmony's, which have
    none of the OpenAI roles)."""
    return message.get("role") if isinstance(message, dict) else None


class Conversation:
    """A request as a method's pass before generation sees it: its questions, the tokens a
    framing of one would give, and the request with every question framed."""

    chat: bool

    def __init__(self, body: GenerationRequest, serving: OpenAIServing, engine) -> None:
        self.body, self.serving, self.engine = body, serving, engine

    @property
    def fields_set(self) -> set[str]:
        return self.body.model_fields_set

    @property
    def max_tokens(self) -> int | None:
        """The request's token limit, when it set one."""
        if {"max_tokens", "max_completion_tokens"} & self.body.model_fields_set:
            return self.body.token_limit
        return None

    def questions(self) -> list[str] | None:
        """The question of each prompt as text (None: some question is not text)."""
        raise NotImplementedError

    def question_is_last(self) -> bool:
        """Whether the model's answer would follow the question directly."""
        raise NotImplementedError

    async def render(self, question: str, framing: Framing) -> list[int]:
        """The token ids the engine would get for `question` so framed."""
        raise NotImplementedError

    def framed(self, questions: list[str], framings: list[Framing]) -> GenerationRequest:
        raise NotImplementedError


class ChatConversation(Conversation):
    """A chat: the question is the last user message; a framing's system prompt goes first
    when the chat has none, its prefill becomes the assistant's turn, which the model
    continues. Read only when a method asks (most requests never do)."""

    chat = True

    @cached_property
    def messages(self) -> list:
        return list(self.body.messages)

    @cached_property
    def last_user(self) -> int | None:
        return max((i for i, m in enumerate(self.messages) if _role(m) == "user"), default=None)

    def questions(self) -> list[str] | None:
        if self.last_user is None or not isinstance(
                self.messages[self.last_user].get("content"), str):
            return None
        return [self.messages[self.last_user]["content"]]

    def question_is_last(self) -> bool:
        return self.last_user == len(self.messages) - 1 \
            and "continue_final_message" not in self.body.model_fields_set

    def _asking(self, question: str, framing: Framing) -> GenerationRequest:
        changed = [*self.messages]
        changed[self.last_user] = {**self.messages[self.last_user],
                                   "content": framing.wrap(question)}
        if framing.system and not any(_role(m) in ("system", "developer")
                                      for m in self.messages):
            changed.insert(0, {"role": "system", "content": framing.system})
        update = {"messages": changed}
        if framing.prefill:  # the model continues the assistant's turn from it
            changed.append({"role": "assistant", "content": framing.prefill})
            update |= {"continue_final_message": True, "add_generation_prompt": False}
        return self.body.model_copy(update=update)

    async def render(self, question: str, framing: Framing) -> list[int]:
        return await self.serving.chat_prompt_ids(self._asking(question, framing))

    def framed(self, questions: list[str], framings: list[Framing]) -> GenerationRequest:
        return self._asking(questions[0], framings[0])


class CompletionConversation(Conversation):
    """Completions: each prompt is a question; a framing wraps it and appends its prefill."""

    chat = False

    def questions(self) -> list[str] | None:
        prompts = self.body.prompts()
        return prompts if all(isinstance(p, str) for p in prompts) else None

    def question_is_last(self) -> bool:
        return True

    async def render(self, question: str, framing: Framing) -> list[int]:
        return self.engine.encode(framing.wrap(question) + framing.prefill)

    def framed(self, questions: list[str], framings: list[Framing]) -> GenerationRequest:
        return self.body.model_copy(update={"prompt": [
            f.wrap(q) + f.prefill for q, f in zip(questions, framings)]})


class Rendering:
    """How a generation's answer (in its dialect's OpenAI shape: a whole answer, or its
    server-sent events) is sent: as it is, or converted into another API family's answer."""

    def whole(self, answer: dict) -> dict:
        return answer

    def stream(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        return events


OPENAI = Rendering()


@dataclass(frozen=True)
class Dialect:
    """A generation route's answer shape and its ways into vLLM's serving layer.
    `prompt_ids` is the prompt an orchestration answers; `from_chat` (None: the dialect has
    choices of its own) turns an orchestration's answer, made in chat's shape, into the
    dialect's; `conversation` is how a method's pass before generation sees the request."""

    object: str  # the answer's `object`; a stream chunk's is `chunk_object`
    chunk_object: str
    id_prefix: str
    create: Callable[[OpenAIServing, GenerationRequest, Request], Awaitable]
    annotate: Callable[[Any, ChoiceReports], dict]  # vLLM's whole answer, with the reports
    annotate_stream: Callable[[AsyncIterator, ChoiceReports, bool], AsyncIterator[str]]
    prompt_ids: Callable[[OpenAIServing, GenerationRequest], Awaitable[list[list[int]]]]
    conversation: type[Conversation]
    text_field: str = ""  # where a choice's text goes: "message" (chat) or "text"
    from_chat: Callable[[GenerationRequest, Any], Rendering] | None = None

    def choice_text(self, text: str, stream: bool) -> dict:
        if self.text_field == "text":
            return {"text": text}
        message = {"role": "assistant", "content": text}
        return {"delta": message} if stream else {"message": {**message, "refusal": None}}


async def _chat_prompt_ids(serving: OpenAIServing, body) -> list[list[int]]:
    return [await serving.chat_prompt_ids(body)]


def _annotated(result, reports: ChoiceReports) -> dict:
    return annotate_response(result.model_dump(), reports)


CHAT = Dialect("chat.completion", "chat.completion.chunk", "chatcmpl",
               lambda serving, body, raw: serving.chat.create_chat_completion(body, raw),
               _annotated, annotate_stream, _chat_prompt_ids, ChatConversation, "message")
COMPLETION = Dialect("text_completion", "text_completion", "cmpl",
                     lambda serving, body, raw: serving.completion.create_completion(body, raw),
                     _annotated, annotate_stream,
                     lambda serving, body: serving.completion_prompt_ids(body),
                     CompletionConversation, "text")
