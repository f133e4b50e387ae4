"""The engine as the API process owns it: vLLM's `AsyncLLM` started with every method's adapter,
its health, its resources (vector slots, capture rows, telemetry), and the one path every
engine request of this server takes (`Engine.choice`).

`choice` holds a choice's resources, encodes each method's settings into its `SamplingParams`
(`Method.encode`), runs it, waits for its tokens' entropy and collects what the methods kept
when it ends. vLLM's serving layer reaches it through `SteeringClient` (plain choices, n > 1,
continuations); multi-pass methods through `generate`. Nothing here names a method: it loops
over the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from steering.artifacts import ArtifactNotFound, ProbeStore, VectorStore
from steering.engine.args import CAPTURE_ROWS, DEFAULT_VECTOR_SLOTS
from steering.engine.entropy import EntropyProcessor
from steering.engine.session import ChoiceRecord
from steering.engine.slots import VectorSlots
from steering.errors import EngineUnavailable, InvalidRequest, NotFound
from steering.methods.base import ChoiceDelta, Sampling, Sharing
from steering.methods.registry import METHODS
from steering.runtime import keys
from steering.runtime.telemetry import EntropyTrace, TelemetryCollector

logger = logging.getLogger("entropy_steer.engine")

# How long a finished request waits for its last entropy values (sent before the token itself,
# so this only matters when the engine process is overloaded or dying).
TELEMETRY_TIMEOUT_S = 10.0


class Engine:
    """vLLM `AsyncLLM`, the telemetry collector, the artifact stores and the steering
    resources, owned by the API process."""

    def __init__(self, engine_args, model_name: str, artifacts_dir: Path,
                 vector_slots: int = DEFAULT_VECTOR_SLOTS) -> None:
        from steering.engine.client import SteeringClient

        self.engine_args = engine_args
        self.model_name = model_name
        self.model_path = engine_args.model
        self._artifacts_dir = artifacts_dir
        self._slot_count = vector_slots
        self._slots: VectorSlots | None = None
        self._capture_rows: asyncio.Semaphore | None = None
        self._unsupported: dict[str, str | None] = {}
        self.vectors: VectorStore | None = None
        self.probes: ProbeStore | None = None
        self.num_layers = 0
        self.max_model_len = 0
        self.max_num_seqs = 0
        self.vocab_size = 0
        self.tokenizer = None
        self._llm = None
        self._collector: TelemetryCollector | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self.client = SteeringClient(self)  # what vLLM's OpenAI serving layer talks to

    async def start(self) -> None:
        # Our processors implement the V1 model runner's interface. vLLM 0.32 picks Model Runner
        # V2 on GPUs with Triton, whose loader rejects V1 processors: pin V1 unless told otherwise.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from vllm.v1.engine.async_llm import AsyncLLM

        self._socket_dir = tempfile.TemporaryDirectory(prefix="steer-")
        address = f"ipc://{os.path.join(self._socket_dir.name, 'telemetry.sock')}"
        self._collector = TelemetryCollector(address)
        self._collector.start()
        args = self.engine_args
        args.logits_processors = [*(args.logits_processors or []), EntropyProcessor,
                                  *(m.processor for m in METHODS if m.processor is not None)]
        args.worker_extension_cls = "steering.engine.worker.SteeringWorkerExtension"
        additional = dict(args.additional_config or {})
        additional["entropy_steer"] = {
            "telemetry_address": address,
            "layer_steering": {"slots": self._slot_count, "capture_rows": CAPTURE_ROWS}}
        args.additional_config = additional
        self._llm = AsyncLLM.from_engine_args(args)
        self.max_model_len = self._llm.model_config.max_model_len
        self.max_num_seqs = self._llm.vllm_config.scheduler_config.max_num_seqs
        self.vocab_size = self._llm.model_config.get_vocab_size()
        self.tokenizer = self._llm.get_tokenizer()
        table = (await self._llm.collective_rpc("steer_install"))[0]
        self.num_layers = table["layers"]
        self._slots = VectorSlots(self._llm, table["slots"])
        self._capture_rows = asyncio.Semaphore(table["capture_rows"])
        self._unsupported = table["unsupported"]
        for name, reason in self._unsupported.items():
            if reason is not None:
                logger.warning("steering.%s is not available on this server (its requests get "
                               "a 400): %s", name, reason)
        self.vectors = VectorStore(self._artifacts_dir / "vectors", self.model_name,
                                   table["hidden_size"], self.num_layers)
        self.probes = ProbeStore(self._artifacts_dir / "probes", self.model_name,
                                 table["hidden_size"])

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

    @property
    def llm(self):
        """vLLM's `AsyncLLM`."""
        return self._llm

    def unsupported(self, method: str) -> str | None:
        """Why `method`'s in-engine part cannot run on this engine (None: it can)."""
        return self._unsupported.get(method)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def check_token_ids(self, prompt_token_ids: list[int]) -> None:
        if max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size {self.vocab_size}", "prompt"
            )

    def admit(self, prompt_token_ids: list[int], sampling: Sampling) -> Sampling:
        """Check a choice before any work starts; returns its sampling with `max_tokens`
        resolved (default: the rest of the context)."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        self.check_token_ids(prompt_token_ids)
        prompt_len = len(prompt_token_ids)
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len}",
                "prompt",
            )
        if sampling.max_tokens is None:
            return replace(sampling, max_tokens=room)
        if sampling.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens={sampling.max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                f"the model's context of {self.max_model_len}",
                "max_tokens",
            )
        return sampling

    # --- the one path ------------------------------------------------------------------------

    async def choice(self, prompt: dict, params, steering: Mapping[str, Any], request_id: str,
                     record: ChoiceRecord, *, stream_entropy: bool = False,
                     **kwargs) -> AsyncIterator:
        """Run one choice: `prompt` (vLLM's prompt dict) sampled by `params` (vLLM's
        `SamplingParams`, `n` = 1) with each method's `steering`, filling in `record` as its
        outputs arrive. With `stream_entropy` every output waits for its tokens' entropy;
        otherwise only the last does. Yields vLLM's outputs."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        delta = streams_deltas(params)
        with engine_errors():
            async with self._resources(request_id, steering) as (slots, salt, trace):
                record.trace = trace
                params.extra_args = {**(params.extra_args or {}), keys.STEER_ID: request_id}
                encoding = methods_encoding(steering)
                streams = tuple(dict.fromkeys(
                    name for m in encoding for name in m.streams(steering[m.name], params)))
                for m in encoding:
                    m.encode(steering[m.name], params, slots[m.name], steering)
                if salt is not None:
                    user_salt = prompt.get("cache_salt")
                    prompt = {**prompt, "cache_salt": f"{user_salt}:{salt}" if user_salt
                              else salt}
                stream = self._llm.generate(prompt, params, request_id, **kwargs)
                async with contextlib.aclosing(stream):
                    async for output in stream:
                        completion = output.outputs[0]
                        count = len(completion.token_ids)
                        produced = record.produced + count if delta else count
                        if count and record.first_token_at is None:
                            record.first_token_at = _first_token_time(output)
                        finished = completion.finish_reason is not None
                        if finished or stream_entropy:
                            await _await_trace(trace, produced, request_id, streams)
                        if finished:
                            record.collected = await self._collect(request_id, steering)
                        record.produced = produced
                        yield output

    async def generate(self, prompt_token_ids: list[int], sampling: Sampling,
                       steering: Mapping[str, Any] | None = None, *, deltas: bool = True
                       ) -> AsyncIterator[ChoiceDelta]:
        """One choice for a multi-pass method's orchestration: `sampling` as `admit` returns
        it, each method's in-engine `steering`. Deltas carry the entropy that has arrived; the
        last one waits for all of it and carries the trace and what the methods collected.
        Without `deltas` the engine sends the choice once, when it ends (no per-token work in
        this process for a caller that needs only the end)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        steering = steering or {}
        params = SamplingParams(
            n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k is not None else 0,
            min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty, seed=sampling.seed,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=sampling.include_stop_str_in_output,
            ignore_eos=sampling.ignore_eos, extra_args={},
            output_kind=RequestOutputKind.DELTA if deltas else RequestOutputKind.FINAL_ONLY)
        record = ChoiceRecord(steering)
        start = 0
        async for output in self.choice({"prompt_token_ids": prompt_token_ids}, params,
                                        steering, f"steer-{uuid.uuid4().hex}", record):
            completion = output.outputs[0]
            entropy, varentropy = record.trace.window(start, record.produced)
            start = record.produced
            finished = completion.finish_reason is not None
            yield ChoiceDelta(text=completion.text, token_ids=list(completion.token_ids),
                              entropy=entropy, varentropy=varentropy,
                              finish_reason=completion.finish_reason,
                              stop_reason=completion.stop_reason,
                              trace=record.trace if finished else None,
                              collected=record.collected if finished else {})

    @contextlib.asynccontextmanager
    async def _resources(self, request_id: str, steering: Mapping[str, Any]):
        """The engine resources one steered choice holds while it runs (a capture row, vector
        slots, a telemetry trace); yields each method's vector slots, its cache salt (None: it
        may share prefix-cache blocks with anyone) and its trace."""
        needs = {m.name: m.needs(steering[m.name]) for m in METHODS if m.name in steering}
        capture_row = any(n.capture_row for n in needs.values())
        vectors = [(name, *self._vector_version(name))
                   for need in needs.values() for name in need.vectors]
        if capture_row:  # the engine keeps a fixed number of capture rows per step
            await self._capture_rows.acquire()
        acquired, trace = [], self._collector.register(request_id)
        try:
            acquired = await self._slots.acquire(vectors) if vectors else []
            slots, taken = {}, iter(acquired)
            for name, need in needs.items():
                slots[name] = [next(taken) for _ in need.vectors]
            yield slots, _cache_salt(request_id, needs, vectors), trace
        finally:
            self._collector.unregister(request_id)
            self._slots.release(acquired)
            if capture_row:
                self._capture_rows.release()

    async def _collect(self, request_id: str, steering: Mapping[str, Any]) -> dict[str, Any]:
        """What a finished choice's methods kept in the engine."""
        collected = {}
        for m in METHODS:
            if m.name in steering:
                value = await m.collect(steering[m.name], self, request_id)
                if value is not None:
                    collected[m.name] = value
        return collected

    async def take(self, method: str, key: str, *args):
        """What request `key` left with `method`'s worker part: the call reaches every engine
        (with `--data-parallel-size`, one per DP rank) and every worker; the one holding the
        request answers, the others answer None. (`AsyncLLM.collective_rpc` would return DP
        rank 0's answer only.)"""
        per_engine = await self._llm.engine_core.call_utility_all_async(
            "collective_rpc", "steer_take", None, (method, key, *args), None)
        return next((ranks[0] for ranks in per_engine if ranks[0] is not None), None)

    def _vector_version(self, name: str):
        try:
            values, meta = self.vectors.get(name)
        except ArtifactNotFound:  # deleted between admission and start
            raise NotFound(f"no steering vector named '{name}'") from None
        return meta.created, values

    def prometheus_registry(self):
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()


def methods_encoding(steering: Mapping[str, Any]):
    """The methods whose `encode` writes this choice's settings: a method that takes over
    sampling applies the truncation stages itself, so theirs are not encoded separately."""
    taken_over = any(m.takes_over_sampling for m in METHODS if m.name in steering)
    return [m for m in METHODS if m.name in steering and not (taken_over and m.stage)]


def _cache_salt(request_id: str, needs, vectors) -> str | None:
    """A choice whose KV cache depends on its own run shares it with nothing; one steered by
    fixed vectors only with identically steered choices; others with anyone."""
    if any(n.sharing is Sharing.PRIVATE for n in needs.values()):
        return request_id
    parts = [(name, n.fingerprint) for name, n in needs.items() if n.fingerprint]
    if not parts:
        return None
    versions = [(name, created) for name, created, _ in vectors]
    return "steer:" + hashlib.sha256(repr((parts, versions)).encode()).hexdigest()


def streams_deltas(params) -> bool:
    """Whether the engine sends each output's new tokens only (a stream), not all so far."""
    from vllm.sampling_params import RequestOutputKind

    return params.output_kind == RequestOutputKind.DELTA


@contextlib.contextmanager
def engine_errors():
    """vLLM's exceptions as this server's errors."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError as exc:
        raise EngineUnavailable("the engine process died") from exc
    except (ValueError, VLLMValidationError) as exc:  # vLLM's input validation
        raise InvalidRequest(str(exc)) from exc


async def _await_trace(trace: EntropyTrace, produced: int, request_id: str,
                       streams: tuple[str, ...]) -> None:
    if not await trace.wait_for(produced, TELEMETRY_TIMEOUT_S, streams):
        logger.warning("entropy telemetry for %s is incomplete", request_id)


def _first_token_time(output) -> float:
    """Wall-clock time of a request's first token (the engine's own figure when it keeps
    statistics; otherwise now)."""
    stats = getattr(output, "metrics", None)
    arrival = getattr(stats, "arrival_time", 0.0)
    latency = getattr(stats, "first_token_latency", 0.0)
    return arrival + latency if arrival and latency else time.time()
