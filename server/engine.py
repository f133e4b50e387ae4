"""The one place the API process touches vLLM: engine start-up, requests, telemetry, health.

The HTTP layer hands in token ids and `SamplingOptions` and gets back `ChoiceDelta`s carrying text,
token ids, logprobs and the per-token entropy the engine measured; it never sees vLLM types.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from steering.vllm_adapter.logits_processors import (
    EntropyTelemetryProcessor,
    ExtraArgs,
    TypicalLogitsProcessor,
)
from steering.vllm_adapter.telemetry import EntropyTrace, TelemetryCollector

from server.errors import EngineUnavailable, InvalidRequest

logger = logging.getLogger("entropy_steer.engine")

# How long a finished request waits for its last entropy values (sent before the token itself,
# so this only matters when the engine process is overloaded or dying).
TELEMETRY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # number of top alternatives; 0 = the sampled token's only
    typical_p: float | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous delta."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    entropy: list[float | None]  # one per token in token_ids (None if never measured)
    varentropy: list[float | None]
    finish_reason: str | None = None
    trace: EntropyTrace | None = field(default=None, repr=False)  # complete, on the last delta


class Engine:
    """vLLM `AsyncLLM` plus the telemetry collector, owned by the API process."""

    def __init__(self, engine_args) -> None:
        self._engine_args = engine_args
        self._llm = None
        self._collector: TelemetryCollector | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.tokenizer = None

    async def start(self) -> None:
        # Our processors implement the V1 model runner's interface. vLLM 0.32 picks Model Runner
        # V2 on GPUs with Triton, whose loader rejects V1 processors: pin V1 unless told otherwise.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from vllm.v1.engine.async_llm import AsyncLLM

        self._socket_dir = tempfile.TemporaryDirectory(prefix="steer-")
        address = f"ipc://{os.path.join(self._socket_dir.name, 'telemetry.sock')}"
        self._collector = TelemetryCollector(address)
        self._collector.start()
        args = self._engine_args
        args.logits_processors = [
            *(args.logits_processors or []),
            TypicalLogitsProcessor,
            EntropyTelemetryProcessor,
        ]
        additional = dict(args.additional_config or {})
        additional["entropy_steer"] = {"telemetry_address": address}
        args.additional_config = additional
        self._llm = AsyncLLM.from_engine_args(args)
        self.max_model_len = self._llm.model_config.max_model_len
        self.vocab_size = self._llm.model_config.get_vocab_size()
        self.tokenizer = self._llm.get_tokenizer()

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
        if self._collector is not None:
            self._collector.close()
        if self._socket_dir is not None:
            self._socket_dir.cleanup()

    @property
    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # template errors (e.g. role order) are the caller's input
            raise InvalidRequest(
                f"messages do not fit the model's chat template: {exc}", "messages"
            ) from exc
        # The template already holds the special tokens it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def admit(self, prompt_token_ids: list[int], options: SamplingOptions) -> SamplingOptions:
        """Check a choice before any work starts; returns it with `max_tokens` resolved
        (default: the rest of the context)."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        if max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size {self.vocab_size}", "prompt"
            )
        prompt_len = len(prompt_token_ids)
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len}",
                "prompt",
            )
        if options.max_tokens is None:
            return replace(options, max_tokens=room)
        if options.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens={options.max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                f"the model's context of {self.max_model_len}",
                "max_tokens",
            )
        return options

    def _sampling_params(self, options: SamplingOptions, steer_id: str):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extra_args = {ExtraArgs.STEER_ID: steer_id}
        if options.typical_p is not None and options.typical_p < 1:
            extra_args[ExtraArgs.TYPICAL_P] = options.typical_p
        return SamplingParams(
            n=1,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k if options.top_k is not None else 0,
            min_p=options.min_p,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty,
            seed=options.seed,
            stop=list(options.stop) or None,
            logprobs=options.logprobs,
            ignore_eos=options.ignore_eos,
            extra_args=extra_args,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        entropy_per_delta: bool,
    ) -> AsyncIterator[ChoiceDelta]:
        """Generate one choice (`options` as returned by `admit`). With `entropy_per_delta`, every delta waits for its tokens'
        entropy values; otherwise deltas carry what has arrived and only the last one waits."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        request_id = f"steer-{uuid.uuid4().hex}"
        params = self._sampling_params(options, request_id)
        trace = self._collector.register(request_id)
        produced = 0
        try:
            stream = self._llm.generate(
                {"prompt_token_ids": prompt_token_ids}, params, request_id=request_id
            )
            async with contextlib.aclosing(stream):
                async for output in stream:
                    completion = output.outputs[0]
                    start, produced = produced, produced + len(completion.token_ids)
                    finished = completion.finish_reason is not None
                    if entropy_per_delta or finished:
                        if not await trace.wait_for(produced, TELEMETRY_TIMEOUT_S):
                            logger.warning("entropy telemetry for %s is incomplete", request_id)
                    yield ChoiceDelta(
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        logprobs=_convert_logprobs(
                            completion.logprobs, completion.token_ids, options.logprobs
                        ),
                        entropy=_window(trace.entropy, start, produced),
                        varentropy=_window(trace.varentropy, start, produced),
                        finish_reason=completion.finish_reason,
                        trace=trace if finished else None,
                    )
        except EngineDeadError as exc:
            raise EngineUnavailable("the engine process died") from exc
        except ValueError as exc:  # vLLM's input validation (VLLMValidationError is a ValueError)
            raise InvalidRequest(str(exc)) from exc
        finally:
            self._collector.unregister(request_id)

    def prometheus_registry(self):
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()


def _window(values: list[float], start: int, stop: int) -> list[float | None]:
    out = values[start:stop]
    out += [math.nan] * (stop - start - len(out))
    return [None if math.isnan(v) else v for v in out]


def _convert_logprobs(logprobs, token_ids, top_k: int | None) -> list[TokenLogprob] | None:
    """vLLM gives, per token, the sampled token and the top-k alternatives keyed by id."""
    if logprobs is None or top_k is None:
        return None
    converted = []
    for token_id, candidates in zip(token_ids, logprobs):
        chosen = candidates[token_id]
        ranked = sorted(candidates.values(), key=lambda c: c.rank)[:top_k]
        converted.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=_finite(chosen.logprob),
                top=tuple((c.decoded_token or "", _finite(c.logprob)) for c in ranked),
            )
        )
    return converted


def _finite(x: float) -> float:
    """JSON has no -inf: clamp as OpenAI does for impossible tokens."""
    return max(x, -9999.0)
