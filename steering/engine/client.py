"""vLLM's `EngineClient` as its OpenAI serving layer sees it: the `AsyncLLM`, except that
`generate` runs every engine request of a steering session as its steered choices
(`Engine.choice`).

vLLM's `n` > 1 becomes n engine requests here (one telemetry trace, one seed `seed + j` each),
merged back into the outputs vLLM's serving layer expects. A prompt's override (a strategy a
method picked) changes its sampling; with a continuation, a choice its budget cuts off goes on
after a forced prefix, inside the same choice as vLLM's serving layer sees it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import uuid
import weakref
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from steering.engine.engine import streams_deltas
from steering.engine.session import (
    ORDINAL_KEY,
    SESSION_KEY,
    ChoiceRecord,
    PromptOverride,
    SteeringSession,
)
from steering.errors import APIError
from steering.framing import Continuation
from steering.runtime.keys import PREFIX


def refuse_reserved_keys(extra_args: Mapping[str, Any]) -> None:
    """A client's own `extra_args` (vLLM's `vllm_xargs`) may not set this server's keys;
    raises ValueError naming them."""
    reserved = sorted(k for k in extra_args if k.startswith(PREFIX))
    if reserved:
        raise ValueError(f"keys starting with '{PREFIX}' are this server's own "
                         f"({', '.join(reserved)}); use the steering object")


class SteeringClient:
    def __init__(self, engine) -> None:
        self._engine = engine
        self._sessions: weakref.WeakValueDictionary[str, SteeringSession] = \
            weakref.WeakValueDictionary()

    def __getattr__(self, name: str):
        return getattr(self._engine.llm, name)

    def open_session(self, steering: Mapping[str, Any], stream_entropy: bool) -> SteeringSession:
        """A session for one HTTP request; it lives as long as the request holds it."""
        session = SteeringSession(f"s-{uuid.uuid4().hex}", steering, stream_entropy)
        self._sessions[session.id] = session
        return session

    async def generate(self, prompt, sampling_params, request_id: str, **kwargs):
        extra = dict(sampling_params.extra_args or {})
        session = self._sessions.get(extra.pop(SESSION_KEY, None))
        ordinal = extra.pop(ORDINAL_KEY, 0)
        if session is None:  # not one of our routes' requests (e.g. vLLM's beam search)
            async for output in self._engine.llm.generate(prompt, sampling_params,
                                                          request_id, **kwargs):
                yield output
            return
        n = sampling_params.n
        override = session.overrides.get(ordinal, PromptOverride())
        children = []
        for j in range(n):
            params = sampling_params.clone()
            params.n = 1
            params.extra_args = dict(extra)
            if params.seed is not None:
                params.seed += j
            if override.temperature is not None:
                params.temperature = override.temperature
            if override.top_p is not None:
                params.top_p = override.top_p
            if override.max_tokens is not None:
                params.max_tokens = override.max_tokens
            children.append(self._choice(session, ordinal * n + j, j, prompt, params,
                                         f"{request_id}-{j}" if n > 1 else request_id,
                                         override.continuation, kwargs))
        if n == 1:
            async for output in children[0]:
                yield output
            return
        from vllm.utils.async_utils import merge_async_iterators

        if streams_deltas(sampling_params):
            async for _, output in merge_async_iterators(*children):
                output.request_id = request_id
                yield output
            return
        finals = [None] * n
        async for j, output in merge_async_iterators(*children):
            finals[j] = output
        merged = finals[0]
        merged.request_id = request_id
        merged.outputs = [f.outputs[0] for f in finals]
        yield merged

    async def _choice(self, session: SteeringSession, index: int, j: int, prompt, params,
                      request_id: str, continuation: Continuation | None, kwargs):
        """Choice `index` of the session, `j` within its prompt, continued when
        `continuation` is set and the budget cuts it off (not under a grammar, whose state the
        continuation would not carry). This server's errors leave as vLLM's
        `GracefulHTTPError`, so that vLLM's serving layer answers them (in a stream too) with
        their own status."""
        try:
            record = session.choices[index] = ChoiceRecord(session.steering)
            stream = self._steered(session, record, j, prompt, params, request_id, kwargs)
            if continuation is None or params.structured_outputs is not None:
                async for output in stream:
                    yield output
                return
            delta = streams_deltas(params)
            tokens: list[int] = []
            cut_off = None
            async with contextlib.aclosing(stream):
                async for output in stream:
                    completion = output.outputs[0]
                    if not delta:
                        tokens.clear()
                    tokens.extend(completion.token_ids)
                    if completion.finish_reason == "length":
                        cut_off = output
                    else:
                        yield output
            if cut_off is not None:
                async for output in self._continue(session, record, j, cut_off, tokens, params,
                                                   continuation, f"{request_id}-continued",
                                                   kwargs):
                    yield output
        except APIError as exc:
            raise _serving_error(exc) from exc

    async def _steered(self, session: SteeringSession, record: ChoiceRecord, j: int, prompt,
                       params, request_id: str, kwargs):
        """The engine's choice, numbered `j` within its prompt as vLLM expects."""
        stream = self._engine.choice(prompt, params, record.steering, request_id, record,
                                     stream_entropy=session.stream_entropy, **kwargs)
        async with contextlib.aclosing(stream):
            async for output in stream:
                output.outputs[0].index = j
                yield output

    async def _continue(self, session: SteeringSession, record: ChoiceRecord, j: int, cut_off,
                        tokens: list[int], params, continuation: Continuation,
                        request_id: str, kwargs):
        """A choice, cut off by its budget after `tokens`, continued: the continuation's
        prefix (forced tokens: no entropy, no logprob), then tokens sampled as the
        continuation says, unsteered (as the DiffAdapt authors do), until its stop string.
        vLLM's serving layer sees one choice going on: in a stream, the cut-off output without
        its finish reason, the prefix, then the continuation's deltas; otherwise one output
        with all of it. The continuation's entropy joins the choice's trace after the prefix."""
        from vllm import SamplingParams

        engine = self._engine
        first = cut_off.outputs[0]
        prefix_ids = engine.tokenizer.encode(continuation.prefix, add_special_tokens=False)
        so_far = [*cut_off.prompt_token_ids, *tokens, *prefix_ids]
        room = engine.max_model_len - len(so_far)
        if room < 1:  # no context left to go on in: the answer stays cut off
            yield cut_off
            return
        more = SamplingParams(
            temperature=continuation.temperature, top_p=continuation.top_p,
            max_tokens=min(continuation.max_tokens, room), stop=[continuation.stop],
            include_stop_str_in_output=True, seed=params.seed, logprobs=params.logprobs,
            skip_special_tokens=params.skip_special_tokens, output_kind=params.output_kind,
            extra_args={})
        ran = ChoiceRecord({})
        first.finish_reason = first.stop_reason = None
        prefix = copy.copy(first)
        prefix.text, prefix.token_ids = continuation.prefix, prefix_ids
        prefix.logprobs = None if first.logprobs is None else [None] * len(prefix_ids)
        delta = streams_deltas(params)
        if delta:
            yield cut_off  # its last tokens, no longer the end
        offset, copied = record.produced + len(prefix_ids), 0
        stream = engine.choice({"prompt_token_ids": so_far}, more, {}, request_id, ran,
                               stream_entropy=session.stream_entropy, **kwargs)
        async with contextlib.aclosing(stream):  # a client gone mid-way aborts it at once
            async for output in stream:
                piece = output.outputs[0]
                record.trace.copy_from(ran.trace, copied, ran.produced, offset)
                copied = ran.produced
                record.continued = {"prefix_tokens": len(prefix_ids), "tokens": ran.produced,
                                    "finish_reason": piece.finish_reason}
                if delta and prefix is not None:  # the prefix goes out before the first tokens
                    record.produced += len(prefix_ids)
                    yield _with_completion(cut_off, prefix)
                    prefix = None
                if not delta:  # one output: everything so far
                    piece.text = first.text + continuation.prefix + piece.text
                    piece.token_ids = [*first.token_ids, *prefix_ids, *piece.token_ids]
                    if first.logprobs is not None:
                        piece.logprobs = [*first.logprobs, *prefix.logprobs, *piece.logprobs]
                piece.index = j
                record.produced = offset + ran.produced
                yield _with_completion(cut_off, piece)


def _with_completion(output, completion):
    """A copy of engine output `output` carrying `completion` as its one choice."""
    out = copy.copy(output)
    out.outputs = [completion]
    return out


@functools.cache
def _serving_error_class():
    from vllm.exceptions import GracefulHTTPError

    class ServingError(GracefulHTTPError):
        """One of this server's errors, carried through vLLM's serving layer."""

        def __init__(self, error: APIError) -> None:
            super().__init__(error.message, HTTPStatus(error.status))
            self.error = error

    return ServingError


def _serving_error(error: APIError) -> Exception:
    return _serving_error_class()(error)
