"""Per-token entropy from the engine process to the API process.

The entropy logits processor runs inside vLLM's worker; every decoding step it sends one small
message on a ZMQ PUSH socket: for each telemetered row, the request's steering id, the index of
the token being sampled, and its entropy and varentropy. The API process binds the PULL end and
files the values under each request (`EntropyTrace`). Messages on one socket arrive in order, so a
value written later for the same position (e.g. after a chunked prefill's partial step, whose
sample vLLM discards) replaces the earlier one.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec
import zmq
import zmq.asyncio


class StepTelemetry(msgspec.Struct, array_like=True):
    """One engine step: parallel lists, one entry per telemetered row. The gate processor's
    messages add, per row, the temperature the token was sampled at, the gates that fired and
    those on at it (bit g: gate g), the gate whose EAST action steers the next token (-1:
    none) and each gate's signal value."""

    ids: list[str]
    positions: list[int]
    entropy: list[float]
    varentropy: list[float]
    temperature: list[float] = []
    fired: list[int] = []
    on: list[int] = []
    east: list[int] = []
    signals: list[list[float]] = []


class GateStep(NamedTuple):
    """What the gates did at one token (`StepTelemetry`'s gate fields)."""

    temperature: float
    fired: int
    on: int
    east: int
    signals: list[float]


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


@dataclass
class EntropyTrace:
    """Entropy and varentropy of one request's generated tokens, by position."""

    entropy: list[float] = field(default_factory=list)
    varentropy: list[float] = field(default_factory=list)
    gates: list[GateStep | None] = field(default_factory=list)  # gated requests only
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, position: int, entropy: float, varentropy: float,
               gate: GateStep | None = None) -> None:
        _put(self.entropy, position, entropy, math.nan)
        _put(self.varentropy, position, varentropy, math.nan)
        if gate is not None:
            _put(self.gates, position, gate, None)
        self._changed.set()

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

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until the first `count` positions are known; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.entropy) < count:
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return len(self.entropy) >= count
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
            gates = (map(GateStep, step.temperature, step.fired, step.on, step.east,
                         step.signals)
                     if step.temperature else [None] * len(step.ids))
            for steer_id, position, h, v, gate in zip(
                step.ids, step.positions, step.entropy, step.varentropy, gates
            ):
                trace = traces.get(steer_id)
                if trace is not None:
                    trace.record(position, h, v, gate)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._socket.close()
        self._context.term()
