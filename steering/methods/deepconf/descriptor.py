"""DeepConf's descriptor: `steering.deepconf`, its server option, its conflicts, metrics, and
the orchestration that answers the request (`run`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Literal

import regex
from pydantic import ConfigDict, Field, field_validator, model_validator

from steering.errors import InvalidRequest
from steering.methods.base import Answer, Method, Progress, ReportModel, StrictModel
from steering.methods.deepconf.adapter import MAX_TOP_K, MAX_WINDOW, NAME, DeepConfProcessor
from steering.methods.deepconf.core import Score
from steering.methods.deepconf.run import (
    DEFAULT_MAX_TOTAL_TOKENS,
    DeepConfResult,
    DeepConfRun,
    Mode,
    TraceSettings,
)

MAX_TRACES = 64


class DeepConfOptions(StrictModel):
    """DeepConf (Fu et al. 2025, arXiv 2508.15260): `budget` parallel traces scored by the
    model's token confidence; the least confident are filtered out (offline) or cut in the
    engine as soon as their group confidence falls below a bar set on warm-up traces
    (online), and the rest vote, weighted by confidence."""

    model_config = ConfigDict(title="DeepConf")

    mode: Mode = Mode.ONLINE
    budget: Annotated[int, Field(ge=1, le=MAX_TRACES, description="traces at most")] = 16
    warmup: Annotated[int, Field(ge=1, le=MAX_TRACES, description=(
        "online: traces that set the bar (when `threshold` is unset)"))] = 4
    keep: Annotated[float, Field(gt=0, le=1, description=(
        "η: the fraction of traces kept (0.1: DeepConf-low, 0.9: DeepConf-high)"))] = 0.9
    window: Annotated[int, Field(ge=1, le=MAX_WINDOW, description=(
        "tokens per group of the sliding-window confidence (and of the `tail` score)"))] = 64
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K, description=(
        "tokens in each token's confidence"))] = 20
    score: Score = Field(Score.LOWEST_GROUP, description=(
        "offline: how a trace is scored (online scores are lowest group confidences)"))
    threshold: float | None = Field(None, allow_inf_nan=False, description=(
        "online: a fixed bar instead of the warm-up's (every trace then runs online)"))
    consensus: Annotated[float, Field(gt=0, le=1)] | None = Field(0.95, description=(
        "online: start no more traces once the leading answer holds this share of the vote "
        "(null: run the whole budget)"))
    parallel: Annotated[int, Field(ge=1, le=MAX_TRACES, description=(
        "online: traces in the engine at once after the warm-up"))] = 8
    weighted: bool = Field(True, description=(
        "weight each vote by its trace's score (false: plain majority voting)"))
    answer: Annotated[str, Field(min_length=1, max_length=200, description=(
        "how an answer is read from a trace: 'boxed', 'last_number' or a regular expression "
        "(its first group, else the match; the last match counts)"))] = "last_number"

    @field_validator("answer")
    @classmethod
    def _compiles(cls, value: str) -> str:
        if value not in ("boxed", "last_number"):
            try:
                regex.compile(value)
            except regex.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.mode == Mode.OFFLINE and self.threshold is not None:
            raise ValueError("threshold is an online setting (offline filters by `keep`)")
        if self.mode == Mode.ONLINE and self.threshold is None and self.warmup > self.budget:
            raise ValueError(f"warmup={self.warmup} is more than budget={self.budget}")
        return self


class TraceSummary(ReportModel):
    index: int
    phase: Literal["warmup", "final"]
    answer: str | None
    score: float = Field(description="its confidence (the request's `score`; online its "
                         "lowest group confidence)")
    tokens: int
    stopped: bool = Field(description="cut in the engine: its group confidence fell below "
                          "the threshold")
    stopped_at: int | None = Field(description="the token it was cut at")
    cancelled: bool = Field(description="aborted once the vote reached consensus")
    voted: bool


class DeepConfEvent(ReportModel):
    """A streamed progress event: a trace started, stopped early, finished (its answer and
    score) or was cancelled; the threshold was set; the vote reached consensus."""

    event: Literal["started", "stopped", "finished", "cancelled", "threshold", "consensus"]
    trace: int | None = None
    phase: str | None = None
    tokens: int | None = None
    at: int | None = None
    answer: str | None = None
    score: float | None = None
    threshold: float | None = None
    share: float | None = None


class DeepConfReport(ReportModel):
    """The run (`run.DeepConfResult.report`) and the trace this choice is (`chosen`); a
    streamed run's progress chunks carry only `progress`."""

    mode: Mode | None = None
    budget: int | None = None
    keep: float | None = None
    window: int | None = None
    top_k: int | None = None
    score: Score | None = None
    threshold: float | None = Field(None, description="the bar (offline: the filter's)")
    traces: list[TraceSummary] | None = None
    votes: dict[str, float] | None = Field(None, description="each answer's total weight")
    answer: str | None = Field(None, description="the vote's winner")
    chosen: int | None = Field(None, description="the trace this choice is")
    consensus_reached: bool | None = None
    generated_tokens: int | None = None
    estimated_full_tokens: int | None = Field(None, description=(
        "the budget's traces uncut and all started, estimated with the mean length of those "
        "that ran to their end"))
    saved_tokens: int | None = None
    progress: DeepConfEvent | None = None


@dataclass(frozen=True)
class DeepConfMeters:
    traces: object
    saved: object


class DeepConf(Method):
    name = NAME
    report_model = DeepConfReport
    processor = DeepConfProcessor
    orchestrates = True
    in_orchestration = False

    def fields(self):
        return {NAME: (DeepConfOptions | None, None)}

    def add_arguments(self, parser) -> None:
        parser.add_argument("--deepconf-max-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                            help="largest budget × max_tokens one steering.deepconf request "
                            "may ask for")

    def configure(self, args) -> int:
        return args.deepconf_max_tokens

    def read(self, request) -> DeepConfOptions | None:
        return request.steering.deepconf if request.steering else None

    def check(self, options: DeepConfOptions, request, plan) -> None:
        """What DeepConf cannot honour, as 400s naming the field, before any work."""
        if options.mode == Mode.ONLINE and request.ignore_eos:
            raise InvalidRequest(f"{self.param} online ends a trace with the end-of-sequence "
                                 "token: drop ignore_eos", "ignore_eos")
        self.check_orchestration(request, plan)

    def sequences(self, options: DeepConfOptions, requested: int) -> int:
        return options.budget if options.mode == Mode.OFFLINE else max(
            options.parallel, options.warmup)

    def encode(self, settings: TraceSettings, params, slots, steering) -> None:
        params.extra_args[self.key] = [settings.top_k, settings.window, settings.threshold]

    def streams(self, settings, params) -> tuple[str, ...]:
        return (NAME,)

    def metrics(self, registry) -> DeepConfMeters:
        from prometheus_client import Counter

        return DeepConfMeters(
            traces=Counter("steer_deepconf_traces", "DeepConf traces by what became of them "
                           "(started; stopped early by confidence; cancelled at consensus; "
                           "voted)", ("model", "method", "outcome"), registry=registry),
            saved=Counter("steer_deepconf_saved_tokens", "Tokens DeepConf did not generate: "
                          "the budget's traces uncut (estimated) minus those generated",
                          ("model", "method"), registry=registry))

    def answer(self, options: DeepConfOptions, job):
        """One progress event per trace event, then the chosen traces."""
        run = DeepConfRun(job.engine, job.meters, job.state or DEFAULT_MAX_TOTAL_TOKENS,
                          options, job.prompt_ids, job.sampling, job.steering, job.label,
                          job.choices)
        return self._events(run, options, job)

    async def _events(self, run: DeepConfRun, options: DeepConfOptions, job):
        progress: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(run.run(on_event=progress.put))
        task.add_done_callback(lambda _: progress.put_nowait(None))
        try:
            while (event := await progress.get()) is not None:
                yield Progress(event)
            result = await task
        finally:
            task.cancel()
        report = result.report(options)
        self._observe(job, result, report)
        for trace in result.chosen:
            yield Answer(text=trace.text, token_ids=trace.token_ids, entropy=trace.entropy,
                         varentropy=trace.varentropy, finish_reason=trace.finish_reason,
                         section={**report, "chosen": trace.index},
                         generated_tokens=result.generated_tokens, values=trace.values)

    @staticmethod
    def _observe(job, result: DeepConfResult, report: dict) -> None:
        traces = result.traces
        for outcome, count in (("started", len(traces)),
                               ("stopped", sum(t.stopped_at is not None for t in traces)),
                               ("cancelled", sum(t.cancelled for t in traces)),
                               ("voted", sum(t.voted for t in traces))):
            job.meters.traces.labels(*job.label, outcome).inc(count)
        job.meters.saved.labels(*job.label).inc(report["saved_tokens"])

    def report(self, options, outcome) -> dict | None:
        return outcome.collected.get(self.name)  # the answer's section (`Answer.section`)
