"""DeepConf per request (paper Algorithms 1 and 2): traces as ordinary engine requests in the
engine's continuous batch, measured (and, online, cut) by the adapter, then filtered and voted.

Offline: `budget` traces at once; each is scored, the (1 − η) percentile of the scores is the
bar, and the traces at or above it vote, weighted by their score. Online: `warmup` traces at
once, measured; the bar is the (1 − η) percentile of their lowest group confidences and those
at or above it vote; then the rest of the budget runs with the bar in the engine, `parallel` at
a time, and each trace that ends uncut votes with its lowest group confidence. After every
vote, once the leader's share reaches `consensus`, no trace starts and the running ones are
aborted. Trace i samples with seed `seed + i` when the request sets one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import regex

from steering.errors import InvalidRequest
from steering.methods.deepconf.adapter import NAME
from steering.methods.deepconf.core import (
    Score,
    boxed_answer,
    consensus,
    last_number,
    regex_answer,
    threshold,
    trace_score,
    vote,
    winner,
)

DEFAULT_TRACE_TOKENS = 512  # per trace when the request sets no max_tokens
DEFAULT_MAX_TOTAL_TOKENS = 65536  # budget × per-trace tokens per request


class Mode(StrEnum):
    OFFLINE = "offline"
    ONLINE = "online"


class Phase(StrEnum):
    WARMUP = "warmup"
    FINAL = "final"


@dataclass(frozen=True)
class TraceSettings:
    """What one trace's engine request runs with (`adapter.decode`): the bar None measures."""

    top_k: int
    window: int
    threshold: float | None


@dataclass
class Trace:
    index: int
    phase: Phase
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    entropy: list[float | None] = field(default_factory=list)
    varentropy: list[float | None] = field(default_factory=list)
    values: dict[str, list] = field(default_factory=dict)  # the other methods' per token
    finish_reason: str | None = None
    stopped_at: int | None = None  # the token the engine cut it at (its group fell below the bar)
    cancelled: bool = False  # aborted once the vote reached consensus
    answer: str | None = None
    score: float = 0.0
    voted: bool = False

    def summary(self) -> dict:
        return {"index": self.index, "phase": self.phase.value, "answer": self.answer,
                "score": self.score, "tokens": len(self.token_ids),
                "stopped": self.stopped_at is not None, "stopped_at": self.stopped_at,
                "cancelled": self.cancelled, "voted": self.voted}


def answer_reader(spec: str) -> Callable[[str], str | None]:
    """How a trace's answer is read: "boxed", "last_number" or a regular expression."""
    if spec == "boxed":
        return boxed_answer
    if spec == "last_number":
        return last_number
    pattern = regex.compile(spec)
    return lambda text: regex_answer(pattern, text)


@dataclass
class DeepConfResult:
    traces: list[Trace]
    chosen: list[Trace]  # the answers, best first
    bar: float | None
    table: dict[str, float]
    consensus_reached: bool
    generated_tokens: int
    score: Score  # how its traces were scored

    def full_tokens(self, budget: int) -> int:
        """An estimate of the tokens the whole budget would have generated uncut: a cut or
        aborted trace, and one never started, as long as the traces that ran to their end
        were on average."""
        full = [len(t.token_ids) for t in self.traces
                if t.stopped_at is None and not t.cancelled]
        typical_length = sum(full) / len(full) if full else 0.0
        estimate = sum(max(len(t.token_ids), typical_length) if t.stopped_at is not None or
                       t.cancelled else len(t.token_ids) for t in self.traces)
        return round(estimate + (budget - len(self.traces)) * typical_length)

    def report(self, options) -> dict:
        """The run's report section, but for the trace each choice is (`chosen`)."""
        estimate = self.full_tokens(options.budget)
        return {"mode": options.mode, "budget": options.budget, "keep": options.keep,
                "window": options.window, "top_k": options.top_k, "score": self.score,
                "threshold": self.bar, "traces": [t.summary() for t in self.traces],
                "votes": self.table, "answer": winner(self.table),
                "consensus_reached": self.consensus_reached,
                "generated_tokens": self.generated_tokens,
                "estimated_full_tokens": estimate,
                "saved_tokens": max(0, estimate - self.generated_tokens)}


class DeepConfRun:
    """One request's DeepConf on the engine: its traces sample with the request's sampling and
    run the other methods' in-engine `steering`; `meters` are DeepConf's metrics."""

    def __init__(self, engine, meters, max_total_tokens: int, options, prompt_ids: list[int],
                 sampling, steering, label: tuple[str, str], choices: int) -> None:
        self.engine, self.meters, self.options = engine, meters, options
        self.prompt_ids, self.steering, self.label = prompt_ids, steering, label
        room = engine.max_model_len - len(prompt_ids)
        budget = sampling.max_tokens or min(DEFAULT_TRACE_TOKENS, room)
        self.sampling = engine.admit(prompt_ids, replace(sampling, max_tokens=budget))
        total = options.budget * budget
        if total > max_total_tokens:
            raise InvalidRequest(f"deepconf: budget={options.budget} × max_tokens={budget} = "
                                 f"{total} tokens exceeds this server's limit of "
                                 f"{max_total_tokens}", "steering.deepconf.budget")
        if choices > options.budget:
            raise InvalidRequest(f"n={choices} is more than steering.deepconf.budget="
                                 f"{options.budget} traces", "n")
        self.choices = choices
        self.read_answer = answer_reader(options.answer)
        # online, a trace's score is what the bar bounds: its lowest group confidence
        self.score = options.score if options.mode == Mode.OFFLINE else Score.LOWEST_GROUP
        self.generated_tokens = 0

    async def run(self, on_event: Callable[[dict], Awaitable[None]]) -> DeepConfResult:
        o = self.options
        traces: list[Trace] = []
        voters: list[Trace] = []
        if o.mode == Mode.OFFLINE:
            traces = await self._batch(Phase.FINAL, 0, o.budget, on_event)
            bar = threshold([t.score for t in traces], o.keep)
            voters = [t for t in traces if t.score >= bar]
            reached = False
        else:
            bar = o.threshold
            if bar is None:
                traces = await self._batch(Phase.WARMUP, 0, o.warmup, on_event)
                bar = threshold([t.score for t in traces], o.keep)
                voters = [t for t in traces if t.score >= bar]
                await on_event({"event": "threshold", "threshold": bar})
            reached = await self._online(traces, voters, bar, on_event)
        for t in voters:
            t.voted = True
        table = self._vote(voters)
        chosen = self._ranked(traces, voters, table)[:self.choices]
        return DeepConfResult(traces=traces, chosen=chosen, bar=bar, table=table,
                              consensus_reached=reached, generated_tokens=self.generated_tokens,
                              score=self.score)

    async def _batch(self, phase: Phase, start: int, count: int, on_event) -> list[Trace]:
        """`count` traces at once, measured only."""
        traces = [Trace(index=start + i, phase=phase) for i in range(count)]
        await asyncio.gather(*(self._trace(t, None, on_event) for t in traces))
        return traces

    async def _online(self, traces: list[Trace], voters: list[Trace], bar: float,
                      on_event) -> bool:
        """The rest of the budget with the bar in the engine, `parallel` at a time, until the
        vote reaches consensus; True if it did."""
        o = self.options
        running: dict[asyncio.Task, Trace] = {}
        next_index = len(traces)
        reached = self._agreed(voters)
        try:
            while not reached and (next_index < o.budget or running):
                while next_index < o.budget and len(running) < o.parallel:
                    trace = Trace(index=next_index, phase=Phase.FINAL)
                    traces.append(trace)
                    running[asyncio.create_task(self._trace(trace, bar, on_event))] = trace
                    next_index += 1
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                    trace = running.pop(task)
                    if trace.stopped_at is None:
                        voters.append(trace)
                reached = self._agreed(voters)
            if reached:
                table = self._vote(voters)
                await on_event({"event": "consensus", "answer": winner(table),
                                "share": consensus(table)})
        finally:
            for task, trace in running.items():
                trace.cancelled = True
                task.cancel()
            if running:
                await asyncio.wait(running)
        for trace in traces:
            if trace.cancelled:
                await on_event({"event": "cancelled", "trace": trace.index,
                                "tokens": len(trace.token_ids)})
        return reached

    def _vote(self, voters: list[Trace]) -> dict[str, float]:
        weights = [t.score if self.options.weighted else 1.0 for t in voters]
        return vote([t.answer for t in voters], weights)

    def _agreed(self, voters: list[Trace]) -> bool:
        if self.options.consensus is None:
            return False
        table = self._vote(voters)
        return bool(table) and consensus(table) >= self.options.consensus

    async def _trace(self, trace: Trace, bar: float | None, on_event) -> None:
        o = self.options
        seed = self.sampling.seed
        sampling = replace(self.sampling, seed=None if seed is None else seed + trace.index)
        steering = {**self.steering, NAME: TraceSettings(o.top_k, o.window, bar)}
        await on_event({"event": "started", "trace": trace.index, "phase": trace.phase.value})
        try:
            # only an online trace may be aborted midway: its tokens so far count in `usage`
            async for delta in self.engine.generate(self.prompt_ids, sampling, steering,
                                                    deltas=bar is not None):
                trace.text += delta.text
                trace.token_ids += delta.token_ids
                self.generated_tokens += len(delta.token_ids)
                if delta.trace is not None:
                    self._finish(trace, delta)
        except asyncio.CancelledError:
            trace.cancelled = True
            raise
        if trace.stopped_at is not None:
            await on_event({"event": "stopped", "trace": trace.index, "at": trace.stopped_at,
                            "tokens": len(trace.token_ids)})
        else:
            await on_event({"event": "finished", "trace": trace.index,
                            "tokens": len(trace.token_ids), "answer": trace.answer,
                            "score": trace.score})

    def _finish(self, trace: Trace, delta) -> None:
        count = len(trace.token_ids)
        values = delta.trace.method_values(NAME, count)
        trace.confidences = [v[0] for v in values if v is not None]
        cut = [i for i, v in enumerate(values) if v is not None and v[2] > 0]
        trace.stopped_at = cut[0] if cut else None
        trace.entropy, trace.varentropy = delta.trace.window(0, count)
        trace.values = {name: delta.trace.method_values(name, count)
                        for name in delta.trace.values if name != NAME}
        trace.finish_reason = delta.finish_reason
        trace.answer = self.read_answer(trace.text)
        trace.score = trace_score(trace.confidences, self.score, self.options.window)

    def _ranked(self, traces: list[Trace], voters: list[Trace],
                table: dict[str, float]) -> list[Trace]:
        """The answers, best first: the voters by their answer's place in the vote (the
        winner's first), then their score, then the others by score."""
        places = {a: i for i, a in enumerate(sorted(table, key=lambda a: -table[a]))}
        voted = sorted(voters, key=lambda t: (places.get(t.answer, len(places)), -t.score))
        rest = sorted((t for t in traces if not t.voted and not t.cancelled),
                      key=lambda t: -t.score)
        return voted + rest or sorted(traces, key=lambda t: -len(t.token_ids))
