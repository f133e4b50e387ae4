"""The request bodies: vLLM's own OpenAI request models, so that every field `vllm serve`
accepts is accepted here and means the same, plus this project's extensions: `steering` and
the methods' request-level aliases (e.g. `typical_p`), both built from the method registry.

Three rules on top of vLLM's: JSON types are strict, `null` for any top-level field means the
field is unset (as the OpenAI API treats it), and `SamplingParams.extra_args` keys starting
with `steer_` belong to this server (a client's `vllm_xargs` may not set them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Discriminator,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    BatchChatCompletionRequest as VllmBatchChatCompletionRequest,
)
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest as VllmChatCompletionRequest,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest as VllmCompletionRequest,
)
from vllm.entrypoints.serve.tokenize import protocol as tokenize_protocol

from server.errors import validation_error
from server.protocol import MAX_N, MAX_PROMPTS, MAX_STOP_SEQUENCES
from steering.engine.client import refuse_reserved_keys
from steering.methods.registry import METHODS, REQUEST_FIELDS, SteeringOptions

MAX_LOGPROBS = 20  # vLLM's default `max_logprobs`
MAX_TOP_K = 2**31 - 1  # vLLM's engine messages carry top_k as a fixed-width integer


class StrictJSON(BaseModel):
    """A request body with JSON's types, as its schema says: `true` is not 1, `"5"` is not 5,
    at every depth (vLLM's models coerce, e.g. `tools[].function.defer_loading: 0`).

    FastAPI validates the parsed body as Python objects, in pydantic's lax mode; this validates
    it again as the JSON it came as, in strict mode (where integers still pass for numbers and
    strings for enums). `null` for a top-level field means the field is unset, as the OpenAI
    API treats it. Errors vLLM's own validators raise on ill-typed input (e.g.
    `AttributeError` on `"structured_outputs": false`) become validation errors, so a bad body
    is a 400 rather than a 500. Fields typed `Iterable` (e.g. the tools of an OpenAI
    `additional_tools` input item) are validated too: pydantic checks them only when they are
    iterated, so they are made lists here."""

    @model_validator(mode="wrap")
    @classmethod
    def _strict_json(cls, data: Any, handler, info: ValidationInfo):
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None}
        if info.mode != "python" or not isinstance(data, dict):
            return _without_crashes(handler, data)
        try:
            return _iterables_validated(cls.model_validate_json(json.dumps(data), strict=True))
        except ValidationError as exc:
            _without_crashes(handler, data)  # invalid even laxly: pydantic's own error (so a
            raise validation_error(exc.errors()) from None  # union tries its next member)


def _iterables_validated(value, loc: tuple = ()):
    """`value` with every lazily validated iterable in it replaced by the list it yields,
    which validates each item (an invalid one raises pydantic's error, located in the body)."""
    if isinstance(value, Iterator):
        try:
            value = list(value)
        except ValidationError as exc:
            raise ValidationError.from_exception_data(exc.title, [
                {**error, "loc": (*loc, *error["loc"])} for error in exc.errors()]) from None
    if isinstance(value, BaseModel):
        fields = vars(value)
    elif isinstance(value, dict | list):
        fields = value
    else:
        return value
    for key, item in (fields.items() if isinstance(fields, dict) else enumerate(fields)):
        fields[key] = _iterables_validated(item, (*loc, key))
    return value


def _without_crashes(handler, data):
    try:
        return handler(data)
    except (AttributeError, TypeError, KeyError) as exc:
        raise ValueError(f"malformed request: {type(exc).__name__}: {exc}") from None


class _Extensions(StrictJSON):
    """The extensions' checks, and the seam between a request and its steering session."""

    _session = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _methods_read(self):
        for method in METHODS:  # each refuses what contradicts itself (e.g. two typical forms)
            method.read(self)
        return self

    @field_validator("n", check_fields=False)
    @classmethod
    def _bounded_n(cls, n: int | None) -> int | None:
        if n is not None and not 1 <= n <= MAX_N:
            raise ValueError(f"between 1 and {MAX_N} choices per request")
        return n

    @field_validator("top_k", check_fields=False)
    @classmethod
    def _bounded_top_k(cls, top_k: int | None) -> int | None:
        if top_k is not None and not -1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be -1 (off) or at most {MAX_TOP_K}")
        return top_k

    @field_validator("stop", check_fields=False)
    @classmethod
    def _bounded_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES or not all(stops):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} non-empty stop strings")
        return stop

    @field_validator("vllm_xargs", check_fields=False)
    @classmethod
    def _no_reserved_keys(cls, xargs: dict | None) -> dict | None:
        refuse_reserved_keys(xargs or {})
        return xargs

    @property
    def ignored_fields(self) -> list[str]:
        """Top-level fields neither vLLM nor this server knows (vLLM ignores them)."""
        return sorted(self.model_extra or {})

    @property
    def stop_list(self) -> list[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def bind(self, session) -> None:
        """Route this request's engine requests through a steering session (anything with
        `tag(params)`)."""
        self._session = session

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict):
        """vLLM's conversion, tagged by the bound session (vLLM's serving layer calls this
        once per prompt, in prompt order).

        `n` > 1 with greedy decoding is allowed (vLLM refuses it): the session runs each choice
        as its own engine request, so n identical greedy choices are what the client asked."""
        n, self.n = self.n, 1
        try:
            params = super().to_sampling_params(max_tokens, default_sampling_params)
        finally:
            self.n = n
        params.n = n or 1
        if self._session is not None:
            self._session.tag(params)
        return params


SteeringFields = create_model(
    "SteeringFields", __base__=_Extensions,
    steering=(SteeringOptions | None, None),
    **REQUEST_FIELDS)


class ChatCompletionRequest(SteeringFields, VllmChatCompletionRequest):
    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SteeringFields, VllmCompletionRequest):
    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) or (
            isinstance(prompt, list) and prompt and isinstance(prompt[0], int)) else prompt
        if isinstance(prompts, list) and (not prompts or not all(prompts)):
            raise ValueError("the prompt is empty")
        if isinstance(prompts, list) and len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return prompt

    @field_validator("logprobs")
    @classmethod
    def _bounded_logprobs(cls, logprobs: int | None) -> int | None:
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}")
        return logprobs

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p or [])


GenerationRequest = ChatCompletionRequest | CompletionRequest


class BatchChatCompletionRequest(SteeringFields, VllmBatchChatCompletionRequest):
    """vLLM's batch of conversations sharing every other field (steering too)."""

    def conversations(self) -> list[ChatCompletionRequest]:
        """Each conversation as a chat request with the batch's declared fields."""
        shared = self.model_dump(mode="json", exclude_unset=True,
                                 include=set(type(self).model_fields) - {"messages"})
        try:
            return [ChatCompletionRequest.model_validate({**shared, "messages": conversation})
                    for conversation in self.model_dump(mode="json")["messages"]]
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None


def _invocation_kind(body: Any) -> str:
    return "ChatCompletionRequest" if isinstance(body, dict) and "messages" in body \
        else "CompletionRequest"


# SageMaker's `/invocations` body: a chat request if it has `messages`, else a completion one.
# Documented as either (`anyOf`): a chat body is often a valid completion body too, which a
# `oneOf` would call invalid.
InvocationRequest = Annotated[
    Annotated[ChatCompletionRequest, Tag("ChatCompletionRequest")] |
    Annotated[CompletionRequest, Tag("CompletionRequest")],
    Discriminator(_invocation_kind),
    WithJsonSchema({"anyOf": [{"$ref": f"#/components/schemas/{model.__name__}"}
                              for model in (ChatCompletionRequest, CompletionRequest)]})]


class TokenizeCompletionRequest(StrictJSON, tokenize_protocol.TokenizeCompletionRequest):
    pass


class TokenizeChatRequest(StrictJSON, tokenize_protocol.TokenizeChatRequest):
    pass


class DetokenizeRequest(StrictJSON, tokenize_protocol.DetokenizeRequest):
    pass


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest
