"""vLLM's own OpenAI serving layer, driven over the steering engine client.

Chat templates (with tools), structured outputs (`response_format`, `structured_outputs`, the
grammar behind `tool_choice: required` and named tools), tool-call and reasoning parsers,
logprobs, `echo`, prompt logprobs, `n`, tokenization: all of it is vLLM's code, so a request
means here exactly what it means to `vllm serve`. This module builds vLLM's serving objects,
turns their answers into this server's (every choice gains its `steering` report, each stream
chunk its tokens' entropy when asked) and makes them valid against OpenAI's published schema
where vLLM's are not (no `null` where the schema wants an object or an array).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.errors import in_band_error
from steering.errors import error_for_status
from steering.methods.base import Outcome
from steering.methods.plan import UNMEASURED_REPORT

# Keys whose `null` OpenAI's schema allows (or vLLM's own `stop_reason`, where null means the
# end-of-sequence token); any other null is dropped from an answer.
NULLABLE_KEYS = frozenset({"content", "refusal", "logprobs", "finish_reason", "stop_reason",
                           "bytes", "text_offset"})


@dataclass(frozen=True)
class FrontendOptions:
    """`vllm serve`'s options for its OpenAI layer, with the same names and defaults."""

    chat_template: str | None = None
    chat_template_content_format: str = "auto"
    response_role: str = "assistant"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    tool_strict_level: str = "auto"
    return_tokens_as_token_ids: bool = False
    enable_prompt_tokens_details: bool = False
    default_chat_template_kwargs: dict[str, Any] | None = None


class OpenAIServing:
    """vLLM's chat, completion, Responses, Anthropic Messages and tokenization serving
    objects over `client`."""

    def __init__(self, client, model_name: str, model_path: str,
                 options: FrontendOptions) -> None:
        """`client`: the engine client vLLM's serving objects talk to."""
        from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.openai.responses.serving import OpenAIServingResponses
        from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer

        template = load_chat_template(options.chat_template)
        reasoning = client.vllm_config.structured_outputs_config.reasoning_parser or ""
        shared = dict(chat_template=template,
                      chat_template_content_format=options.chat_template_content_format,
                      default_chat_template_kwargs=options.default_chat_template_kwargs)
        tools = dict(enable_auto_tools=options.enable_auto_tool_choice,
                     tool_parser=options.tool_call_parser, reasoning_parser=reasoning,
                     tool_strict_level=options.tool_strict_level)
        self.models = OpenAIServingModels(client, [BaseModelPath(model_name, model_path)])
        self.renderer = OnlineRenderer(client.model_config, client.renderer,
                                       request_logger=None, **shared, **tools)
        self.chat = OpenAIServingChat(
            client, self.models, options.response_role, online_renderer=self.renderer,
            request_logger=None, return_tokens_as_token_ids=options.return_tokens_as_token_ids,
            enable_prompt_tokens_details=options.enable_prompt_tokens_details, **shared,
            **tools)
        self.completion = OpenAIServingCompletion(
            client, self.models, online_renderer=self.renderer, request_logger=None,
            return_tokens_as_token_ids=options.return_tokens_as_token_ids,
            enable_prompt_tokens_details=options.enable_prompt_tokens_details)
        self.tokenization = ServingTokenization(self.models, self.renderer, **shared)
        self.responses = OpenAIServingResponses(
            client, self.models, self.renderer, request_logger=None,
            return_tokens_as_token_ids=options.return_tokens_as_token_ids,
            enable_prompt_tokens_details=options.enable_prompt_tokens_details, **shared,
            **tools)
        self.messages = AnthropicServingMessages(
            client, self.models, options.response_role, online_renderer=self.renderer,
            request_logger=None, return_tokens_as_token_ids=options.return_tokens_as_token_ids,
            enable_prompt_tokens_details=options.enable_prompt_tokens_details, **shared,
            **tools)

    async def chat_prompt_ids(self, request) -> list[int]:
        """The token ids vLLM would generate from for a chat request (template, tools)."""
        result = await self.chat.render_chat_request(request)
        raise_error(result)
        _, inputs = result
        return list(inputs[0]["prompt_token_ids"])

    async def completion_prompt_ids(self, request) -> list[list[int]]:
        result = await self.completion.render_completion_request(request)
        raise_error(result)
        return [list(i["prompt_token_ids"]) for i in result]


def raise_error(result) -> None:
    """vLLM's serving methods return errors as values: raise them as this server's."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise error_for_status(result.error.code, result.error.message, result.error.param)


def without_nulls(value, nullable: frozenset[str] = NULLABLE_KEYS,
                  opaque: frozenset[str] = frozenset()):
    """An answer with every null that the schema does not allow dropped: `nullable` keys keep
    theirs; the values under `opaque` keys (a client's own JSON schema) are left as sent."""
    if isinstance(value, dict):
        return {k: v if k in opaque else without_nulls(v, nullable, opaque)
                for k, v in value.items() if v is not None or k in nullable}
    if isinstance(value, list):
        return [without_nulls(v, nullable, opaque) for v in value]
    return value


def tidy_choice(choice: dict) -> dict:
    """A chat choice (or stream choice) as OpenAI's schema has it: its message tidied, and
    `refusal` beside the logprobs' `content` (the schema requires both)."""
    message = choice.get("message", choice.get("delta"))
    if message is not None:
        tidy_message(message)
    if isinstance(choice.get("logprobs"), dict) and "content" in choice["logprobs"]:
        choice["logprobs"].setdefault("refusal", None)
    return choice


def tidy_message(message: dict) -> dict:
    """A chat message or delta as OpenAI writes one: no empty `tool_calls` list, and the
    reasoning text also under `reasoning_content`, the name most clients read."""
    if message.get("tool_calls") == []:
        del message["tool_calls"]
    if message.get("reasoning") is not None:
        message["reasoning_content"] = message["reasoning"]
    return message


class ChoiceReports:
    """The steering reports of one served request's choices and what each adds to the metrics
    (`n` choices per prompt). A choice vLLM's beam search made alone is reported unmeasured."""

    def __init__(self, plan, session, n: int, metrics) -> None:
        self.plan, self.session, self.n, self.metrics = plan, session, n, metrics
        self._outcomes: dict[int, Outcome] = {}

    def _outcome(self, index: int) -> Outcome:
        """A finished choice's outcome, gathered once for its report and its metrics."""
        if index not in self._outcomes:
            self._outcomes[index] = self.session.outcome(index, self.n)
        return self._outcomes[index]

    def report(self, index: int) -> dict:
        if self.session.record(index) is None:  # a beam of vLLM's beam search
            return dict(UNMEASURED_REPORT)
        return self.plan.report(self._outcome(index))

    def finished(self, index: int) -> None:
        """Choice `index` ended: into the metrics (once)."""
        if self.session.record(index) is not None:
            self.metrics.observe_choice(self.plan, self._outcome(index))

    def request_finished(self, now: float) -> None:
        firsts = [r.first_token_at for r in self.session.choices.values() if r.first_token_at]
        self.metrics.observe_latency(self.plan, self.session.arrival,
                                     min(firsts) if firsts else None, now)


def annotate_response(data: dict, reports: ChoiceReports) -> dict:
    """A whole answer: each choice gains its steering report."""
    data = without_nulls(data)
    prompt_ids = data.get("prompt_token_ids")  # vLLM's chat puts it beside the choices
    for choice in data["choices"]:
        tidy_choice(choice)
        if prompt_ids is not None:
            choice.setdefault("prompt_token_ids", prompt_ids)
        choice["steering"] = reports.report(choice["index"])
    return data


async def annotate_stream(events: AsyncIterator[str], reports: ChoiceReports,
                          return_entropy: bool) -> AsyncIterator[str]:
    """Server-sent events from vLLM's stream: each choice's chunk gains the entropy of the
    tokens it carries (when asked), its last chunk the whole report.

    A chunk carries the tokens its choice produced since that choice's previous chunk: vLLM's
    serving layer turns each engine output into its chunk with no `await` in between, so the
    choice's record still counts exactly the tokens delivered up to that chunk."""
    sent: dict[int, int] = {}
    async for event in events:
        if not event.startswith("data: {"):
            yield event
            continue
        chunk = without_nulls(json.loads(event[len("data: "):]))
        if "error" in chunk:
            error = chunk["error"]  # vLLM's, in this server's error body
            mapped = error_for_status(error.get("code") or 500,
                                      error.get("message") or "internal error",
                                      error.get("param"))
            yield f"data: {json.dumps(in_band_error(mapped))}\n\n"
            continue
        for choice in chunk.get("choices", []):
            index = choice["index"]
            tidy_choice(choice)
            if _announces_role(choice):
                continue
            record = reports.session.record(index)  # None: a beam of vLLM's beam search
            steering = {}
            if choice.get("finish_reason") is not None:
                steering = reports.report(index)
                reports.finished(index)
            if return_entropy:
                start, sent[index] = sent.get(index, 0), record.produced
                steering["chunk_entropy"], steering["chunk_varentropy"] = record.window(start)
            if steering:
                choice["steering"] = steering
        yield f"data: {json.dumps(chunk)}\n\n"


def _announces_role(choice: dict) -> bool:
    """vLLM's first chunk of a chat choice: the role, before any token."""
    delta = choice.get("delta")
    return delta is not None and "role" in delta and not delta.get("content") \
        and not delta.get("tool_calls") and choice.get("finish_reason") is None
