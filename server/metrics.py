"""The project's `steer_*` Prometheus metrics (base units; `_total` counters; histograms): the
server's own here, each method's from its descriptor (`Method.metrics`), in one registry.

Entropy values are measured in the engine process and reach this (API) process through the
telemetry channel; they are observed here, once per generated token, after each choice ends.
`/metrics` serves these together with vLLM's own `vllm:*` metrics from the same registry.
"""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from steering.methods.registry import METHODS

ENTROPY_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0)
VARENTROPY_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

LABELS = ("model", "method")


class SteerMetrics:
    """The steer_* metrics of one served model, registered once per registry; `meters` holds
    each method's own (by method name)."""

    def __init__(self, model: str, registry: CollectorRegistry = REGISTRY) -> None:
        self.model = model
        self.meters = {m.name: m.metrics(registry) for m in METHODS}
        self.engine_up = Gauge(
            "steer_engine_up", "1 while the inference engine runs (0: /health fails with 503)",
            ("model",), registry=registry,
        )
        self.token_entropy = Histogram(
            "steer_token_entropy_nats",
            "Entropy of each generated token's distribution "
            "(temperature-scaled, before truncation)",
            LABELS, buckets=ENTROPY_BUCKETS, registry=registry,
        )
        self.token_varentropy = Histogram(
            "steer_token_varentropy_nats2",
            "Varentropy of each generated token's distribution",
            LABELS, buckets=VARENTROPY_BUCKETS, registry=registry,
        )
        self.held_sequences = Gauge(
            "steer_held_sequences", "Engine sequences admitted and not yet answered (running "
            "and waiting)", ("model",), registry=registry,
        )
        self.sequence_limit = Gauge(
            "steer_sequence_limit", "Sequences admitted at most (--max-num-seqs + "
            "--max-queued-requests); past it a generation request is a 429", ("model",),
            registry=registry,
        )
        self.requests = Counter(
            "steer_requests", "Generation requests by steering method", LABELS, registry=registry
        )
        self.request_errors = Counter(
            "steer_request_errors", "Generation requests that ended in an error",
            (*LABELS, "status"), registry=registry,
        )
        self.generated_tokens = Counter(
            "steer_generated_tokens", "Generated tokens", LABELS, registry=registry
        )
        self.steered_tokens = Counter(
            "steer_steered_tokens", "Generated tokens whose residual stream was steered (EAST)",
            LABELS, registry=registry,
        )
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.e2e = Histogram(
            "steer_request_latency_seconds",
            "Time from request arrival to the last generated token",
            LABELS, buckets=LATENCY_BUCKETS, registry=registry,
        )

    def watch_engine(self, engine) -> None:
        """Report the engine's health at every scrape."""
        self.engine_up.labels(self.model).set_function(lambda: float(engine.healthy))

    def watch_admission(self, admission) -> None:
        self.held_sequences.labels(self.model).set_function(lambda: float(admission.held))
        self.sequence_limit.labels(self.model).set(admission.limit)

    def count_request(self, plan) -> None:
        self.requests.labels(self.model, plan.label).inc()

    def count_error(self, plan, exc: BaseException) -> None:
        """A request that ended in `exc`: its HTTP status (499: the client went away)."""
        default = 499 if isinstance(exc, asyncio.CancelledError) else 500
        status = str(getattr(exc, "status", default))
        self.request_errors.labels(self.model, plan.label, status).inc()

    def observe_choice(self, plan, outcome) -> None:
        """A finished choice: its tokens' entropy, and what each of its methods counts."""
        labels = (self.model, plan.label)
        h = self.token_entropy.labels(*labels)
        for value in outcome.entropy:
            if value is not None:
                h.observe(value)
        v = self.token_varentropy.labels(*labels)
        for value in outcome.varentropy:
            if value is not None:
                v.observe(value)
        self.generated_tokens.labels(*labels).inc(len(outcome.entropy))
        plan.observe(self.meters, self, outcome)

    def observe_latency(self, plan, arrival: float, first_token_at: float | None,
                        now: float) -> None:
        """A finished request's time to its first token (when it had one) and to its end."""
        labels = (self.model, plan.label)
        if first_token_at is not None:
            self.ttft.labels(*labels).observe(max(0.0, first_token_at - arrival))
        self.e2e.labels(*labels).observe(now - arrival)
