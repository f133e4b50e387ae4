"""Per-token values from the engine process to the API process.

Inside vLLM's worker, processors send one small message per decoding step on a ZMQ PUSH socket
(one socket per worker process, so a step's messages arrive in the order they were sent): for
each row, the request's steering id, the index of the token being sampled, and the values. The
engine's entropy processor sends every steered row's entropy and varentropy; a method's
processor may send its own per-token values under its name (`StepTelemetry.method`), e.g. what
a gate did at that token. The API process binds the PULL end and files the values under each
request (`EntropyTrace`). A value written later for the same position (e.g. after a chunked
prefill's partial step, whose sample vLLM discards) replaces the earlier one.
"""

from __future__ import annotations

import asyncio
import functools
import math
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio


class StepTelemetry(msgspec.Struct, array_like=True):
    """One engine step of one sender: parallel lists, one entry per row. `entropy` and
    `varentropy` are empty when the message carries only a method's `values` (one list of
    numbers per row, the method's own encoding)."""

    ids: list[str]
    positions: list[int]
    entropy: list[float] = []
    varentropy: list[float] = []
    method: str = ""
    values: list[list[float]] = []


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepTelemetry)


class TelemetryPublisher:
    """Engine side: a non-blocking PUSH socket connected to the API process."""

    def __init__(self, address: str) -> None:
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 100_000)
        self._socket.connect(address)

    def publish(self, step: StepTelemetry) -> None:
        try:
            self._socket.send(_encoder.encode(step), zmq.NOBLOCK)
        except zmq.Again:  # API process gone or far behind: drop rather than stall decoding
            pass


def telemetry_address(vllm_config) -> str | None:
    """Where the API process listens (set by the engine in `additional_config`)."""
    return (vllm_config.additional_config or {}).get("entropy_steer", {}).get("telemetry_address")


@functools.cache
def _publisher_at(address: str) -> TelemetryPublisher:
    return TelemetryPublisher(address)


def publisher(vllm_config) -> TelemetryPublisher | None:
    """This worker's one publisher (None: not an entropy-steer engine, or not the output rank:
    every tensor-parallel rank sees the same logits, one reports)."""
    address = telemetry_address(vllm_config)
    return _publisher_at(address) if address is not None and _is_output_rank() else None


def _is_output_rank() -> bool:
    from vllm.distributed import parallel_state

    try:
        return parallel_state.get_tensor_model_parallel_rank() == 0
    except AssertionError:  # parallel groups not initialised (single process)
        return True


@dataclass
class EntropyTrace:
    """Entropy and varentropy of one request's generated tokens, by position, and the
    per-token values of the methods that send them (`values[method][position]`)."""

    entropy: list[float] = field(default_factory=list)
    varentropy: list[float] = field(default_factory=list)
    values: dict[str, list[list[float] | None]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, position: int, entropy: float, varentropy: float) -> None:
        _put(self.entropy, position, entropy, math.nan)
        _put(self.varentropy, position, varentropy, math.nan)
        self._changed.set()

    def record_values(self, method: str, position: int, values: list[float]) -> None:
        _put(self.values.setdefault(method, []), position, values, None)
        self._changed.set()

    def method_values(self, method: str, stop: int) -> list[list[float] | None]:
        """A method's values for positions [0, stop); None where it sent none."""
        out = self.values.get(method, [])[:stop]
        return out + [None] * (stop - len(out))

    def copy_from(self, other: EntropyTrace, start: int, stop: int, offset: int) -> None:
        """Positions [start, stop) of `other` as positions `offset + start` on of this trace
        (a continuation's tokens after those before it)."""
        for position in range(start, min(stop, len(other.entropy))):
            self.record(offset + position, other.entropy[position], other.varentropy[position])

    def window(self, start: int, stop: int) -> tuple[list[float | None], list[float | None]]:
        """Entropy and varentropy of positions [start, stop); None where never measured."""
        def known(values: list[float]) -> list[float | None]:
            out = values[start:stop]
            out += [math.nan] * (stop - start - len(out))
            return [None if math.isnan(v) else v for v in out]
        return known(self.entropy), known(self.varentropy)

    def _has(self, count: int, methods: tuple[str, ...]) -> bool:
        return len(self.entropy) >= count and all(
            len(self.values.get(m, ())) >= count for m in methods)

    async def wait_for(self, count: int, timeout: float, methods: tuple[str, ...] = ()) -> bool:
        """Wait until the first `count` positions are known (and the values of `methods`);
        False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._has(count, methods):
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self._has(count, methods)
        return True


def _put(values: list, position: int, value, missing) -> None:
    """values[position] = value; a gap (a lost message) is filled with `missing` so that
    positions stay aligned."""
    if position > len(values):
        values.extend([missing] * (position - len(values)))
    if position == len(values):
        values.append(value)
    else:
        values[position] = value


class TelemetryCollector:
    """API side: binds the PULL socket and routes step messages to registered traces."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._traces: dict[str, EntropyTrace] = {}
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 100_000)
        self._socket.bind(address)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="steer-telemetry")

    def register(self, steer_id: str) -> EntropyTrace:
        trace = self._traces[steer_id] = EntropyTrace()
        return trace

    def unregister(self, steer_id: str) -> None:
        self._traces.pop(steer_id, None)

    async def _run(self) -> None:
        while True:
            step = _decoder.decode(await self._socket.recv(copy=False))
            traces = self._traces
            for row, (steer_id, position) in enumerate(zip(step.ids, step.positions)):
                trace = traces.get(steer_id)
                if trace is None:
                    continue
                if step.entropy:
                    trace.record(position, step.entropy[row], step.varentropy[row])
                if step.method:
                    trace.record_values(step.method, position, step.values[row])

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._socket.close()
        self._context.term()
