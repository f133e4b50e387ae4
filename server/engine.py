"""The one place the API process touches vLLM: engine start-up, requests, telemetry, health.

The HTTP layer hands in token ids and `SamplingOptions` and gets back `ChoiceDelta`s carrying text,
token ids, logprobs and the per-token entropy the engine measured; it never sees vLLM types.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import logging
import os
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path

import torch

from server.default_model import seed_bundled_artifacts
from server.errors import APIError, EngineBusy, EngineUnavailable, InvalidRequest, NotFound
from steering.artifacts import ArtifactNotFound, ProbeStore, VectorStore
from steering.diffadapt import Continuation
from steering.gates import Gate
from steering.vllm_adapter.layer_steering import DEFAULT_CAPTURE_ROWS, DEFAULT_SLOTS
from steering.vllm_adapter.logits_processors import (
    EntropyTelemetryProcessor,
    ExtraArgs,
    GateProcessor,
    SteeringRowsProcessor,
    TypicalLogitsProcessor,
)
from steering.vllm_adapter.telemetry import EntropyTrace, TelemetryCollector
from steering.vllm_adapter.vreason import VReasonProcessor, encode_config
from steering.vreason import VReasonConfig

logger = logging.getLogger("entropy_steer.engine")

DEFAULT_VREASON_MAX_STEPS = 8  # optimiser steps per V-Reason update a request may ask for

# How long a finished request waits for its last entropy values (sent before the token itself,
# so this only matters when the engine process is overloaded or dying).
TELEMETRY_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EastSpec:
    """One steering vector in a request: `layers` None means the vector's own layer."""

    vector: str
    scale: float
    layers: tuple[int, ...] | None = None
    all_positions: bool = False


@dataclass(frozen=True)
class GateSpec:
    """One closed-loop gate of a request: the engine-free gate, and the vector its EAST action
    adds (`gate.then` holds `Action.EAST` exactly when `east` is set)."""

    gate: Gate
    east: EastSpec | None = None


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
    east: tuple[EastSpec, ...] = ()
    capture_layers: tuple[int, ...] = ()  # residual stream at the last prompt token
    capture_final: bool = False  # the last layer's, after the final norm
    vreason: VReasonConfig | None = None
    gates: tuple[GateSpec, ...] = ()
    dynatemp: tuple[float, float] | None = None  # (range, exponent)
    include_stop_str_in_output: bool = False

    @property
    def gated(self) -> bool:
        """Whether the gate processor samples this choice (`steering.gates`)."""
        return bool(self.gates) or self.dynatemp is not None

    @property
    def gate_east(self) -> tuple[EastSpec, ...]:
        return tuple(g.east for g in self.gates if g.east is not None)

    @property
    def capturing(self) -> bool:
        return bool(self.capture_layers) or self.capture_final

    @property
    def needs_capture_row(self) -> bool:
        """Whether the choice uses one of the engine's per-step capture rows while it runs."""
        return self.capturing or self.vreason is not None


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
    stop_reason: str | int | None = None  # the stop string (or token) that ended it, if any
    trace: EntropyTrace | None = field(default=None, repr=False)  # complete, on the last delta
    hidden_states: dict[int | str, list[float]] | None = None  # on the last delta, when asked
    vreason: dict | None = None  # V-Reason's updates, on the last delta


class VectorSlots:
    """Which stored vector sits in which slot of the engine's steering table.

    A slot in use by a running request is never reassigned; otherwise the least recently used
    slot is refilled (one `collective_rpc` to every worker) when a request needs a vector that
    is not resident. Keys include the vector's creation time, so a re-uploaded vector of the
    same name gets fresh values.
    """

    def __init__(self, llm, count: int) -> None:
        self._llm = llm
        self._count = count
        self._key_of: dict[int, tuple[str, float]] = {}
        self._slot_of: dict[tuple[str, float], int] = {}
        self._users = [0] * count
        self._last_used = [0.0] * count
        self._lock = asyncio.Lock()

    async def acquire(self, vectors: list[tuple[str, float, torch.Tensor]]) -> list[int]:
        async with self._lock:
            slots = []
            try:
                for name, created, values in vectors:
                    key = (name, created)
                    slot = self._slot_of.get(key)
                    if slot is None:
                        free = [i for i in range(self._count)
                                if self._users[i] == 0 and i not in slots]
                        if not free:
                            raise EngineBusy(f"all {self._count} steering-vector slots are in "
                                             "use by running requests; retry shortly")
                        slot = min(free, key=lambda i: self._last_used[i])
                        old = self._key_of.pop(slot, None)
                        if old is not None:
                            del self._slot_of[old]
                        await self._llm.collective_rpc("steer_set_vector",
                                                       args=(slot, values.tolist()))
                        self._key_of[slot], self._slot_of[key] = key, slot
                    self._users[slot] += 1
                    self._last_used[slot] = time.monotonic()
                    slots.append(slot)
            except BaseException:  # busy, or the request was cancelled mid-load
                self.release(slots)
                raise
            return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self._users[slot] -= 1


class Engine:
    """vLLM `AsyncLLM`, the telemetry collector and the steering vectors, owned by the API
    process."""

    def __init__(self, engine_args, model_name: str, artifacts_dir: Path,
                 vector_slots: int = DEFAULT_SLOTS, bundled_model: bool = False,
                 vreason_max_steps: int = DEFAULT_VREASON_MAX_STEPS) -> None:
        self._engine_args = engine_args
        self.vreason_max_steps = vreason_max_steps
        self.vreason_unsupported: str | None = None
        self._bundled_model = bundled_model  # then its ready-made vectors are installed
        self.model_name = model_name
        self.model_path = engine_args.model
        self._artifacts_dir = artifacts_dir
        self._slot_count = vector_slots
        self._slots: VectorSlots | None = None
        self.vectors: VectorStore | None = None
        self.probes: ProbeStore | None = None
        self.num_layers = 0
        self._llm = None
        self._collector: TelemetryCollector | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.tokenizer = None
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
        args = self._engine_args
        args.logits_processors = [
            *(args.logits_processors or []),
            TypicalLogitsProcessor,
            GateProcessor,
            EntropyTelemetryProcessor,
            SteeringRowsProcessor,
            VReasonProcessor,
        ]
        args.worker_extension_cls = "steering.vllm_adapter.worker.SteeringWorkerExtension"
        additional = dict(args.additional_config or {})
        additional["entropy_steer"] = {
            "telemetry_address": address,
            "layer_steering": {"slots": self._slot_count, "capture_rows": DEFAULT_CAPTURE_ROWS}}
        args.additional_config = additional
        self._llm = AsyncLLM.from_engine_args(args)
        self.max_model_len = self._llm.model_config.max_model_len
        self.max_num_seqs = self._llm.vllm_config.scheduler_config.max_num_seqs
        self.vocab_size = self._llm.model_config.get_vocab_size()
        self.tokenizer = self._llm.get_tokenizer()
        table = (await self._llm.collective_rpc("steer_install"))[0]
        self.num_layers = table["layers"]
        self._slots = VectorSlots(self._llm, table["slots"])
        self._capture_slots = asyncio.Semaphore(table["capture_rows"])
        self.vreason_unsupported = table["vreason_unsupported"]
        if self.vreason_unsupported is not None:
            logger.warning("V-Reason is not available on this server (its requests get a 400): "
                           "%s", self.vreason_unsupported)
        self.vectors = VectorStore(self._artifacts_dir / "vectors", self.model_name,
                                   table["hidden_size"], self.num_layers)
        self.probes = ProbeStore(self._artifacts_dir / "probes", self.model_name,
                                 table["hidden_size"])
        if self._bundled_model:
            seed_bundled_artifacts(self.vectors, self.probes)

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
        self.check_token_ids(prompt_token_ids)
        prompt_len = len(prompt_token_ids)
        room = self.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"the prompt has {prompt_len} tokens; this model's context is "
                f"{self.max_model_len}",
                "prompt",
            )
        options = self.check_steering(options)
        if options.max_tokens is None:
            return replace(options, max_tokens=room)
        if options.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens={options.max_tokens} plus the prompt's {prompt_len} tokens exceeds "
                f"the model's context of {self.max_model_len}",
                "max_tokens",
            )
        return options

    def check_token_ids(self, prompt_token_ids: list[int]) -> None:
        if max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size {self.vocab_size}", "prompt"
            )

    def check_steering(self, options: SamplingOptions) -> SamplingOptions:
        """Check a choice's steering against this engine and its stores, before any work;
        returns it with each EAST vector's layers filled in."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        for layer in options.capture_layers:
            if not 0 <= layer < self.num_layers:
                raise InvalidRequest(f"layer {layer} is outside [0, {self.num_layers})",
                                     "steering.return_hidden_states")
        if options.vreason is not None:
            self._check_vreason(options.vreason)
        return replace(options, east=tuple(
            self._resolve_east(spec, "steering.east" + (f".{i}" if len(options.east) > 1 else ""))
            for i, spec in enumerate(options.east)), gates=tuple(
            replace(g, east=self._resolve_east(g.east, f"steering.gates.{i}.then.east"))
            if g.east is not None else g for i, g in enumerate(options.gates)))

    def _check_vreason(self, config: VReasonConfig) -> None:
        if self.vreason_unsupported is not None:
            raise InvalidRequest(f"steering.vreason is not available on this server: "
                                 f"{self.vreason_unsupported}", "steering.vreason")
        if config.steps > self.vreason_max_steps:
            raise InvalidRequest(f"steering.vreason.steps={config.steps} exceeds this server's "
                                 f"limit of {self.vreason_max_steps}", "steering.vreason.steps")

    def _resolve_east(self, spec: EastSpec, param: str) -> EastSpec:
        """Check a vector use against the store; fill in the vector's own layer."""
        try:
            _, meta = self.vectors.get(spec.vector)
        except ArtifactNotFound:
            raise NotFound(f"no steering vector named '{spec.vector}'", f"{param}.vector",
                           "vector_not_found") from None
        layers = spec.layers if spec.layers is not None else (meta.layer,)
        for layer in layers:
            if not 0 <= layer < self.num_layers:
                raise InvalidRequest(f"layer {layer} is outside [0, {self.num_layers})",
                                     f"{param}.layers")
        return replace(spec, layers=tuple(layers))

    def _sampling_params(self, options: SamplingOptions, extra_args: dict):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

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
            include_stop_str_in_output=options.include_stop_str_in_output,
            logprobs=options.logprobs,
            ignore_eos=options.ignore_eos,
            extra_args=extra_args,
            output_kind=RequestOutputKind.DELTA,
        )

    @contextlib.asynccontextmanager
    async def _steered(self, request_id: str, options: SamplingOptions):
        """The engine resources one steered choice holds while it runs (a capture row, vector
        slots, a telemetry trace); yields its `extra_args`, its cache salt (None: it may
        share prefix-cache blocks with anyone) and its trace."""
        specs = options.east + options.gate_east
        vectors = [(spec.vector, *self._vector_version(spec.vector)) for spec in specs]
        capture_row = options.needs_capture_row
        if capture_row:  # the engine keeps a fixed number of capture rows per step
            await self._capture_slots.acquire()
        east_slots, trace = [], self._collector.register(request_id)
        try:
            east_slots = await self._slots.acquire(vectors) if vectors else []
            salt = None
            if options.vreason is not None or options.gate_east:
                salt = request_id  # its KV cache depends on its own tokens' entropy
            elif options.east:  # steered KV cache must never be shared with other requests
                salt = _steering_fingerprint(options.east, vectors)
            yield _extra_args(options, request_id, east_slots), salt, trace
        finally:
            self._collector.unregister(request_id)
            self._slots.release(east_slots)
            if capture_row:
                self._capture_slots.release()

    async def _finish(self, request_id: str, options: SamplingOptions):
        """What a finished choice left in the engine: its hidden states and V-Reason log."""
        hidden_states = vreason = None
        if options.capturing:
            hidden_states = await self._take_capture(request_id, options)
        if options.vreason is not None:
            vreason = await self._take("steer_take_vreason", request_id)
        return hidden_states, vreason

    async def _take(self, method: str, *args):
        """A request's leftovers from the engine that ran it: the call reaches every engine
        (with `--data-parallel-size`, one per DP rank) and every worker; the one holding the
        request answers, the others answer None. (`AsyncLLM.collective_rpc` would return DP
        rank 0's answer only.)"""
        per_engine = await self._llm.engine_core.call_utility_all_async(
            "collective_rpc", method, None, args, None)
        return next((ranks[0] for ranks in per_engine if ranks[0] is not None), None)

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        entropy_per_delta: bool,
    ) -> AsyncIterator[ChoiceDelta]:
        """Generate one choice (`options` as returned by `admit`); the server's own
        orchestration (particles, DiffAdapt's probe pass) uses this.

        With `entropy_per_delta`, every delta waits for its tokens' entropy values; otherwise
        deltas carry what has arrived and only the last one waits."""
        if not self.healthy:
            raise EngineUnavailable("the engine is not running")
        request_id = f"steer-{uuid.uuid4().hex}"
        produced = 0
        with _engine_errors():
            async with self._steered(request_id, options) as (extra_args, salt, trace):
                params = self._sampling_params(options, extra_args)
                _hand_sampling_to_gates(params, options)
                prompt = {"prompt_token_ids": prompt_token_ids}
                if salt is not None:
                    prompt["cache_salt"] = salt
                stream = self._llm.generate(prompt, params, request_id=request_id)
                async with contextlib.aclosing(stream):
                    async for output in stream:
                        completion = output.outputs[0]
                        start, produced = produced, produced + len(completion.token_ids)
                        finished = completion.finish_reason is not None
                        if entropy_per_delta or finished:
                            await _await_trace(trace, produced, request_id)
                        entropy, varentropy = trace.window(start, produced)
                        hidden_states, vreason = (await self._finish(request_id, options)
                                                  if finished else (None, None))
                        yield ChoiceDelta(
                            hidden_states=hidden_states,
                            vreason=vreason,
                            text=completion.text,
                            token_ids=list(completion.token_ids),
                            logprobs=_convert_logprobs(
                                completion.logprobs, completion.token_ids, options.logprobs
                            ),
                            entropy=entropy,
                            varentropy=varentropy,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                            trace=trace if finished else None,
                        )

    async def _take_capture(self, request_id: str, options: SamplingOptions):
        layers = list(options.capture_layers)
        taken = await self._take("steer_take_capture", request_id, layers,
                                 options.capture_final)
        if taken is None:
            raise EngineUnavailable("the engine did not capture the hidden states")
        hidden_states = dict(zip(layers, taken["layers"]))
        if options.capture_final:
            hidden_states["final"] = taken["final"]
        return hidden_states

    async def prompt_features(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """The last layer's hidden state after the final norm at the prompt's last token (what
        a DiffAdapt probe reads), from a one-token, unsteered pass; the prompt's KV blocks stay
        in the prefix cache for the generation that follows."""
        options = self.admit(prompt_token_ids, SamplingOptions(
            max_tokens=1, temperature=0.0, capture_final=True))
        async for delta in self.generate(prompt_token_ids, options, entropy_per_delta=False):
            if delta.hidden_states is not None:
                return torch.tensor(delta.hidden_states["final"])
        raise EngineUnavailable("the engine did not capture the hidden states")

    def _vector_version(self, name: str) -> tuple[float, torch.Tensor]:
        try:
            values, meta = self.vectors.get(name)
        except ArtifactNotFound:  # deleted between admission and start
            raise NotFound(f"no steering vector named '{name}'") from None
        return meta.created, values

    def prometheus_registry(self):
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        return get_prometheus_registry()


class RewardModel:
    """A process reward model on a second vLLM engine (pooling runner): a sequence classifier
    (e.g. `LlamaForSequenceClassification`) whose last label's probability at a trajectory's
    last token is the trajectory's score (a single label: its sigmoid)."""

    def __init__(self, engine_args) -> None:
        self._engine_args = engine_args
        self._llm = None
        self.tokenizer = None

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(self._engine_args)
        if self._llm.model_config.runner_type != "pooling":
            self._llm.shutdown()
            raise SystemExit(f"--prm {self._engine_args.model}: not a classifier / reward model "
                             "(architecture '...ForSequenceClassification' expected)")
        self.tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()

    async def score(self, texts: list[str]) -> list[float]:
        """One score in [0, 1] per text, all texts sent to the engine at once."""
        from vllm import PoolingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None or self._llm.errored:
            raise EngineUnavailable("the reward model's engine is not running")

        async def one(text: str) -> float:
            ids = self.tokenizer.encode(text)[-self.max_model_len:]
            output = None
            async for output in self._llm.encode({"prompt_token_ids": ids},
                                                 PoolingParams(task="classify"),
                                                 request_id=f"steer-prm-{uuid.uuid4().hex}"):
                pass
            return float(output.outputs.data.flatten()[-1])

        try:
            return list(await asyncio.gather(*(one(t) for t in texts)))
        except EngineDeadError as exc:
            raise EngineUnavailable("the reward model's engine died") from exc


def _steering_fingerprint(specs: tuple[EastSpec, ...], vectors) -> str:
    """Requests with identical steering may share KV-cache blocks; nothing else may."""
    parts = [(name, created, spec.scale, spec.layers, spec.all_positions)
             for spec, (name, created, _) in zip(specs, vectors)]
    return "east:" + hashlib.sha256(repr(sorted(parts)).encode()).hexdigest()


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


def _extra_args(options: SamplingOptions, steer_id: str, east_slots: list[int]) -> dict:
    """The engine encoding of a choice's steering (`SamplingParams.extra_args`, read by the
    logits processors and the worker extension)."""
    extra_args = {ExtraArgs.STEER_ID: steer_id}
    if options.typical_p is not None and options.typical_p < 1 and not options.gated:
        extra_args[ExtraArgs.TYPICAL_P] = options.typical_p
    if options.gates:
        extra_args[ExtraArgs.GATES] = [
            [int(g.signal), g.above, g.below, g.hold, g.ema,
             [[int(action), value] for action, value in g.then]]
            for g in (spec.gate for spec in options.gates)]
        gate_slots = iter(east_slots[len(options.east):])  # one per gate with an EAST action
        gate_east = []
        for spec in options.gates:
            slot = next(gate_slots) if spec.east is not None else None
            gate_east.append([] if slot is None else
                             [[slot, spec.east.scale, layer] for layer in spec.east.layers])
        extra_args[ExtraArgs.GATE_EAST] = gate_east
    if options.capturing:
        extra_args[ExtraArgs.CAPTURE] = True
    if options.vreason is not None:
        extra_args[ExtraArgs.VREASON] = encode_config(options.vreason)
    if options.east:
        extra_args[ExtraArgs.EAST] = [
            [slot, spec.scale, layer, int(spec.all_positions)]
            for slot, spec in zip(east_slots, options.east) for layer in spec.layers]
    return extra_args


def _hand_sampling_to_gates(params, options: SamplingOptions) -> None:
    """A gated choice reaches vLLM at temperature 1 with min-p and top-k off, so that the gate
    processor sees the T = 1 distribution (after penalties) and applies the choice's own
    temperature, min-p, typical and top-k itself, with the gates' actions (top-p stays
    vLLM's). A greedy choice (temperature 0) becomes a sampled row whose chain keeps only the
    argmax, unless a gate's temperature holds."""
    if not options.gated:
        return
    spread, exponent = options.dynatemp if options.dynatemp is not None else (None, 1.0)
    params.extra_args[ExtraArgs.SAMPLING] = [
        params.temperature, params.min_p, options.typical_p or 1.0, max(params.top_k, 0),
        spread, exponent]
    params.temperature, params.min_p, params.top_k = 1.0, 0.0, 0


@contextlib.contextmanager
def _engine_errors():
    """vLLM's exceptions as this server's errors."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except EngineDeadError as exc:
        raise EngineUnavailable("the engine process died") from exc
    except (ValueError, VLLMValidationError) as exc:  # vLLM's input validation
        raise InvalidRequest(str(exc)) from exc


async def _await_trace(trace: EntropyTrace, produced: int, request_id: str) -> None:
    if not await trace.wait_for(produced, TELEMETRY_TIMEOUT_S):
        logger.warning("entropy telemetry for %s is incomplete", request_id)


@dataclass
class ChoiceRecord:
    """What the engine measured for one choice of a session, filled in as it runs."""

    steering: SamplingOptions  # as run (DiffAdapt may have changed the budget)
    trace: EntropyTrace
    produced: int = 0  # tokens delivered to vLLM's serving layer so far
    hidden_states: dict[int | str, list[float]] | None = None
    vreason: dict | None = None
    first_token_at: float | None = None  # wall-clock time, for the TTFT metric
    continued: dict | None = None  # how a continuation (DiffAdapt's) went on, when one ran

    @property
    def steered(self) -> int:
        """Tokens the choice's own steering ran on (a continuation runs unsteered)."""
        if self.continued is None:
            return self.produced
        return self.produced - self.continued["prefix_tokens"] - self.continued["tokens"]

    def window(self, start: int):
        """Entropy and varentropy of the tokens delivered from `start` on."""
        return self.trace.window(start, self.produced)


@dataclass
class PromptOverride:
    """Per-prompt changes to the sampling parameters (DiffAdapt's chosen strategy)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    continuation: Continuation | None = None  # for a choice that `max_tokens` cuts off


@dataclass
class SteeringSession:
    """One HTTP request's steering, shared by every engine request that vLLM's serving layer
    makes for it. The request carries only the session's id (and its prompt's ordinal) in
    `SamplingParams.extra_args`; `SteeringClient.generate` finds the rest here.

    Choice `ordinal * n + j` is prompt `ordinal`'s j-th sample, as vLLM numbers choices."""

    id: str
    steering: SamplingOptions  # the steering fields only (typical, EAST, capture, V-Reason)
    stream_entropy: bool  # every streamed delta waits for its tokens' entropy
    overrides: dict[int, PromptOverride] = field(default_factory=dict)
    choices: dict[int, ChoiceRecord] = field(default_factory=dict)
    arrival: float = field(default_factory=time.time)

    def record(self, index: int) -> ChoiceRecord | None:
        return self.choices.get(index)


class SteeringClient:
    """vLLM's `EngineClient` as its OpenAI serving layer sees it: the `AsyncLLM`, except that
    `generate` runs every engine request of a steering session as its steered choices.

    vLLM's `n` > 1 becomes n engine requests here (one telemetry trace, one seed `seed + j`
    each), merged back into the outputs vLLM's serving layer expects."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions: weakref.WeakValueDictionary[str, SteeringSession] = \
            weakref.WeakValueDictionary()

    def __getattr__(self, name: str):
        return getattr(self._engine._llm, name)

    def open_session(self, steering: SamplingOptions, stream_entropy: bool) -> SteeringSession:
        """A session for one HTTP request; it lives as long as the request holds it."""
        session = SteeringSession(f"s-{uuid.uuid4().hex}", steering, stream_entropy)
        self._sessions[session.id] = session
        return session

    async def generate(self, prompt, sampling_params, request_id: str, **kwargs):
        extra = dict(sampling_params.extra_args or {})
        session = self._sessions.get(extra.pop(ExtraArgs.SESSION, None))
        ordinal = extra.pop(ExtraArgs.ORDINAL, 0)
        if session is None:  # not one of our routes' requests (e.g. vLLM's beam search)
            async for output in self._engine._llm.generate(prompt, sampling_params,
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

        if _streams_deltas(sampling_params):
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
        """One steered engine request: choice `index` of the session, `j` within its prompt,
        continued when `continuation` is set and the budget cuts it off (not under a
        grammar, whose state the continuation would not carry). This server's errors leave as
        vLLM's `GracefulHTTPError`, so that vLLM's serving layer answers them (in a stream
        too) with their own status."""
        try:
            stream = self._steered_choice(session, index, j, prompt, params, request_id, kwargs)
            if continuation is None or params.structured_outputs is not None:
                async for output in stream:
                    yield output
                return
            delta = _streams_deltas(params)
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
                async for output in self._continue(session, index, j, cut_off, tokens, params,
                                                   continuation, f"{request_id}-continued",
                                                   kwargs):
                    yield output
        except APIError as exc:
            raise _serving_error(exc) from exc

    async def _continue(self, session: SteeringSession, index: int, j: int, cut_off,
                        tokens: list[int], params, continuation: Continuation,
                        request_id: str, kwargs):
        """Choice `index`, cut off by its budget after `tokens`, continued: the continuation's
        prefix (forced tokens: no entropy, no logprob), then tokens sampled as the
        continuation says, unsteered as the DiffAdapt authors do, until its stop string. vLLM's
        serving layer sees one choice going on: in a stream, the cut-off output without its
        finish reason, the prefix, then the continuation's deltas; otherwise one output with
        all of it. The continuation's entropy joins the choice's trace after the prefix."""
        from vllm import SamplingParams

        engine = self._engine
        record = session.record(index)
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
        inner = SteeringSession(f"{session.id}-continued", SamplingOptions(max_tokens=None),
                                session.stream_entropy)
        first.finish_reason = first.stop_reason = None
        prefix = copy.copy(first)
        prefix.text, prefix.token_ids = continuation.prefix, prefix_ids
        prefix.logprobs = None if first.logprobs is None else [None] * len(prefix_ids)
        delta = _streams_deltas(params)
        if delta:
            yield cut_off  # its last tokens, no longer the end
        offset, copied = record.produced + len(prefix_ids), 0
        stream = self._steered_choice(inner, 0, j, {"prompt_token_ids": so_far}, more,
                                      request_id, kwargs)
        async with contextlib.aclosing(stream):  # a client gone mid-way aborts it at once
            async for output in stream:
                piece, ran = output.outputs[0], inner.record(0)
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

    async def _steered_choice(self, session: SteeringSession, index: int, j: int, prompt,
                              params, request_id: str, kwargs):
        engine = self._engine
        if not engine.healthy:
            raise EngineUnavailable("the engine is not running")
        steering = replace(session.steering, max_tokens=params.max_tokens)
        delta = _streams_deltas(params)
        with _engine_errors():
            async with engine._steered(request_id, steering) as (extra_args, salt, trace):
                record = session.choices[index] = ChoiceRecord(steering, trace)
                params.extra_args.update(extra_args)
                _hand_sampling_to_gates(params, steering)
                if salt is not None:
                    user_salt = prompt.get("cache_salt")
                    prompt = {**prompt, "cache_salt": f"{user_salt}:{salt}" if user_salt
                              else salt}
                stream = engine._llm.generate(prompt, params, request_id, **kwargs)
                async with contextlib.aclosing(stream):
                    async for output in stream:
                        completion = output.outputs[0]
                        completion.index = j
                        count = len(completion.token_ids)
                        produced = record.produced + count if delta else count
                        if count and record.first_token_at is None:
                            record.first_token_at = _first_token_time(output)
                        finished = completion.finish_reason is not None
                        if finished or session.stream_entropy:
                            await _await_trace(trace, produced, request_id)
                        if finished:
                            record.hidden_states, record.vreason = await engine._finish(
                                request_id, steering)
                        record.produced = produced
                        yield output


def _streams_deltas(params) -> bool:
    """Whether the engine sends each output's new tokens only (a stream), not all so far."""
    from vllm.sampling_params import RequestOutputKind

    return params.output_kind == RequestOutputKind.DELTA


def _with_completion(output, completion):
    """A copy of engine output `output` carrying `completion` as its one choice."""
    out = copy.copy(output)
    out.outputs = [completion]
    return out


def _first_token_time(output) -> float:
    """Wall-clock time of a request's first token (the engine's own figure when it keeps
    statistics; otherwise now)."""
    stats = getattr(output, "metrics", None)
    arrival = getattr(stats, "arrival_time", 0.0)
    latency = getattr(stats, "first_token_latency", 0.0)
    return arrival + latency if arrival and latency else time.time()


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
