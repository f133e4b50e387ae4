"""The generation routes' answers as `/openapi.json` documents them: vLLM's answer models, each
choice with its `steering` report (`steering.methods.plan.SteeringReport`, built from every
method's report section)."""

from __future__ import annotations

from vllm.entrypoints.openai.chat_completion import protocol as chat_protocol
from vllm.entrypoints.openai.completion import protocol as completion_protocol

from steering.methods.plan import SteeringReport


class ChatCompletionResponseChoice(chat_protocol.ChatCompletionResponseChoice):
    steering: SteeringReport


class ChatCompletionResponse(chat_protocol.ChatCompletionResponse):
    """vLLM's answer, each choice with its `steering` report."""

    choices: list[ChatCompletionResponseChoice]


class CompletionResponseChoice(completion_protocol.CompletionResponseChoice):
    steering: SteeringReport


class CompletionResponse(completion_protocol.CompletionResponse):
    """vLLM's answer, each choice with its `steering` report."""

    choices: list[CompletionResponseChoice]
