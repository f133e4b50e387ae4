"""What a steering method is, once: the descriptor every method folder defines.

A method is one folder under `steering/methods/`: an engine-free core, an in-engine adapter
where it acts inside vLLM, and one `Method` subclass, the descriptor, listed once in
`steering.methods.registry`. The descriptor owns everything the server and the engine need to
know about the method, so that neither names it:

- the request: the fields it adds to the `steering` object (and request-level aliases), and
  how a request's fields become its options (`read`);
- its conflicts with other request fields and methods (`check`);
- the engine: the settings every choice runs with (`settings`), their check against the engine
  (`resolve`), the engine resources they hold (`needs`), their encoding into
  `SamplingParams.extra_args` (`encode`, decoded by its adapter), the adapter classes the engine
  installs (`processor`, `worker_part`), the per-token values its processor sends (`streams`)
  and what it collects when a choice ends (`collect`);
- the report: its section of a choice's `steering` object and that section's schema;
- its Prometheus metrics and what a finished choice adds to them;
- for multi-pass methods, the orchestration: a pass before generation (`prepare`), or the
  whole answer (`answer`);
- its server options (command line) and the state it keeps while the server runs.

Every hook has a do-nothing default, so a descriptor states only what its method does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from steering.errors import InvalidRequest
from steering.runtime.keys import method_key

if TYPE_CHECKING:
    import argparse

    from steering.methods.gates.core import Stage
    from steering.runtime.telemetry import EntropyTrace


class StrictModel(BaseModel):
    """A request model: unknown fields are refused and JSON types are strict (`true` is not 1,
    `"5"` is not 5, `2.0` is not an integer; integers are fine for numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ReportModel(BaseModel):
    """A report section's schema: exactly these keys (the OpenAPI schema says so)."""

    model_config = ConfigDict(extra="forbid")


class Sharing(Enum):
    """Whether a choice's KV-cache blocks may be shared through vLLM's prefix cache."""

    SHARED = "shared"  # its cache is what any request with the same tokens computes
    PRIVATE = "private"  # its cache depends on its own run (e.g. its tokens' entropy)


@dataclass(frozen=True)
class Needs:
    """Engine resources a choice holds while it runs: stored vectors resident in the engine's
    slots (their slots reach `encode` in this order), one of the engine's per-step capture
    rows, and how its KV cache may be shared (`fingerprint`: only with choices whose
    fingerprint and vectors are the same)."""

    vectors: tuple[str, ...] = ()
    capture_row: bool = False
    sharing: Sharing = Sharing.SHARED
    fingerprint: tuple = ()


@dataclass
class Outcome:
    """What one finished choice ran with and measured, as a report or a metric reads it."""

    settings: Mapping[str, Any]  # each in-engine method's settings, as resolved
    tokens: int = 0  # generated tokens
    steered_tokens: int = 0  # of those, the ones its own steering ran on (not a continuation)
    entropy: list[float | None] = field(default_factory=list)
    varentropy: list[float | None] = field(default_factory=list)
    values: Mapping[str, list] = field(default_factory=dict)  # per-token values by method
    collected: Mapping[str, Any] = field(default_factory=dict)  # taken from the engine at the end
    prompt: Mapping[str, Any] = field(default_factory=dict)  # per-prompt outcomes by method
    continued: dict | None = None  # how a continuation went on, when one ran


@dataclass(frozen=True)
class Sampling:
    """How an orchestration's engine request samples (the engine's own `SamplingParams` are
    built from it); `max_tokens` None: the rest of the context."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False


@dataclass
class ChoiceDelta:
    """New output of one choice since the previous delta (`Engine.generate`)."""

    text: str
    token_ids: list[int]
    entropy: list[float | None]  # one per token in token_ids (None if never measured)
    varentropy: list[float | None]
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string (or token) that ended it, if any
    trace: EntropyTrace | None = field(default=None, repr=False)  # complete, on the last delta
    collected: dict[str, Any] = field(default_factory=dict)  # by method, on the last delta


@dataclass(frozen=True)
class Services:
    """What a method's `start` may use: the running engine and the server's metrics (each
    method's own under `meters`)."""

    engine: Any
    metrics: Any

    def meters(self, name: str) -> Any:
        return self.metrics.meters.get(name)


# The request fields an orchestration honours (the route reads them into `Job.sampling` and
# the answer's envelope), besides the aliases of the methods that run in its engine requests;
# any other field set is a 400, never dropped.
ORCHESTRATION_FIELDS = frozenset({
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stream",
    "stream_options", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "return_token_ids",
    "steering", "user", "metadata", "store", "service_tier", "request_id", "stop",
    "logprobs", "top_logprobs", "echo", "add_generation_prompt", "priority",
    "input", "instructions", "max_output_tokens", "previous_response_id",  # Responses'
})
# `tool_choice` saying "no tool" where there are none (the Responses API always sets one).
NO_TOOL = (None, "none", "auto")


@dataclass(frozen=True)
class Job:
    """What an orchestrating method's `answer` works with: the engine, its own meters and
    server state, the prompt, the request's sampling, the other methods' in-engine settings
    (for its engine requests), the metric labels and the choices the request asks for (`n`)."""

    engine: Any
    meters: Any
    state: Any
    prompt_ids: list[int]
    sampling: Sampling
    steering: Mapping[str, Any]
    label: tuple[str, str]
    choices: int = 1


@dataclass(frozen=True)
class Progress:
    """A multi-pass method's progress, streamed as `{"steering": {method: {"progress": ...}}}`."""

    data: dict


@dataclass(frozen=True)
class Answer:
    """A multi-pass method's answer: one choice and its usage."""

    text: str
    token_ids: list[int]
    entropy: list[float | None]
    varentropy: list[float | None]
    finish_reason: str
    section: dict  # the method's report section
    generated_tokens: int  # every token the run generated, for `usage` (the same on each choice)
    values: Mapping[str, list] = field(default_factory=dict)  # per-token values by method


class Method:
    """One steering method's descriptor (see the module docstring). Instances are stateless:
    server state lives in what `start` returns."""

    name: ClassVar[str]  # its key in `steering`, in reports and in `extra_args` (`key`)
    listed: ClassVar[bool] = True  # named in a report's `methods` and the metric label
    report_model: ClassVar[Any] = None  # its report section's type (None: it adds none)
    processor: ClassVar[type | None] = None  # its vLLM logits processor (V1 interface)
    worker_part: ClassVar[type | None] = None  # its per-step layer work in the worker
    stage: ClassVar[Stage | None] = None  # a truncation step gates can switch and chain
    takes_over_sampling: ClassVar[bool] = False  # its processor applies the row's own chain
    in_orchestration: ClassVar[bool] = True  # an orchestration may run it in its engine requests
    orchestrates: ClassVar[bool] = False  # it answers the request itself (`answer`)
    prepares: ClassVar[bool] = False  # it has a pass before generation (`prepare`)

    @property
    def key(self) -> str:
        """Where its settings travel in `SamplingParams.extra_args`."""
        return method_key(self.name)

    @property
    def param(self) -> str:
        """Its place in a request, for error messages."""
        return f"steering.{self.name}"

    # --- the request -----------------------------------------------------------------------

    def fields(self) -> dict[str, tuple[Any, Any]]:
        """Its fields in the `steering` object: name → (type, default or `Field`)."""
        return {}

    def request_fields(self) -> dict[str, tuple[Any, Any]]:
        """Its request-level aliases (e.g. `typical_p`): name → (type, default or `Field`)."""
        return {}

    def read(self, request) -> Any | None:
        """This method's options from a request (None: the request does not use it). It runs
        while the request is validated: a ValueError (or an `InvalidRequest` naming a field)
        for fields that contradict each other is the request's 400."""
        return None

    def check(self, options, request, plan) -> None:
        """Refuse (`InvalidRequest`, naming the field) what this method cannot combine with:
        other request fields, other methods of `plan`."""

    # --- server options and state ------------------------------------------------------------

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Its `steer serve` options."""

    def configure(self, args: argparse.Namespace) -> Any:
        """Its server configuration from the parsed options; raises ValueError on a bad one."""
        return None

    async def start(self, config, services) -> Any:
        """What it keeps while the server runs (e.g. a second engine), from its
        configuration; `services` gives the engine and the metrics."""
        return config

    def stop(self, state) -> None:
        """Release what `start` made."""

    # --- in the engine -----------------------------------------------------------------------

    def settings(self, options) -> Any | None:
        """What every choice of the request runs with inside the engine (None: nothing)."""
        return None

    def resolve(self, settings, engine, state) -> Any:
        """`settings` checked against the running engine and this method's server state
        (layers in range, stored artifacts, limits), with engine facts filled in."""
        return settings

    def needs(self, settings) -> Needs:
        """The engine resources a choice with these settings holds while it runs."""
        return Needs()

    def encode(self, settings, params, slots: list[int], steering: Mapping[str, Any]) -> None:
        """Write its settings into `params.extra_args[self.key]` (and adjust `params` if its
        adapter needs vLLM to sample differently). `slots`: the engine slots of the vectors
        it `needs`; `steering`: every method's settings for this choice."""

    def streams(self, settings, params) -> tuple[str, ...]:
        """The senders whose per-token values this choice gets (`StepTelemetry.method`); the
        engine waits for them as for the entropy."""
        return ()

    async def collect(self, settings, engine, key: str) -> Any:
        """What the engine kept for it when the choice ended (e.g. captured states)."""
        return None

    # --- reporting ---------------------------------------------------------------------------

    def report(self, options, outcome: Outcome) -> Any | None:
        """Its section of a choice's report (None: no section)."""
        return None

    def metrics(self, registry) -> Any:
        """Its own Prometheus metrics, registered in `registry` once per server."""
        return None

    def observe(self, meters, metrics, labels: tuple[str, str], options,
                outcome: Outcome) -> None:
        """A finished choice in the metrics: `meters` are its own, `metrics` the server's."""

    # --- multi-pass --------------------------------------------------------------------------

    def sequences(self, options, requested: int) -> int:
        """Engine sequences the request holds (admission), given the `requested` choices."""
        return requested

    async def prepare(self, options, conversation, session, state) -> Any:
        """A pass before generation: returns the request as it should be generated (and may
        set per-prompt overrides and outcomes in `session`)."""
        return conversation.body

    def answer(self, options, job: Job) -> AsyncIterator[Progress | Answer]:
        """The whole answer of a request this method orchestrates (`orchestrates`): progress
        events, then one answer per choice. Checks that can fail raise here, before any event
        (so that a stream's status is still theirs)."""
        raise NotImplementedError

    def check_orchestration(self, request, plan) -> None:
        """What an orchestrating method refuses, whatever it does: request fields its engine
        requests do not honour, and methods that cannot run in them."""
        allowed = ORCHESTRATION_FIELDS.union(*(m.request_fields() for m in plan.methods_used
                                               if m.in_orchestration))
        if not getattr(request, "tools", None) and getattr(request, "tool_choice", None) in NO_TOOL:
            allowed = allowed | {"tool_choice"}
        unsupported = sorted(set(request.model_fields_set) - allowed)
        if unsupported:
            raise InvalidRequest(f"{self.param} does not combine with {', '.join(unsupported)} "
                                 "(it runs its own engine requests)", unsupported[0])
        if request.logprobs not in (None, False) or getattr(request, "echo", False):
            field = "echo" if getattr(request, "echo", False) else "logprobs"
            raise InvalidRequest(f"{field} is not available with {self.param}", field)
        others = [m.param for m in plan.methods_used
                  if not m.in_orchestration and m is not self]
        if others:
            raise InvalidRequest(f"{self.param} does not combine with {', '.join(others)}",
                                 self.param)
