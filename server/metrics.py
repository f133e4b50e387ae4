"""The project's `steer_*` Prometheus metrics (base units; `_total` counters; histograms).

Entropy values are measured in the engine process and reach this (API) process through the
telemetry channel; they are observed here, once per generated token, after each choice ends.
`/metrics` serves these together with vLLM's own `vllm:*` metrics from the same registry.
"""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

ENTROPY_BUCKETS = (
    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 11.0)
VARENTROPY_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

LABELS = ("model", "method")


class SteerMetrics:
    """All steer_* metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
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
        self.gate_fired_tokens = Counter(
            "steer_gate_fired_tokens", "Generated tokens at which an entropy gate fired, by "
            "the action it switches on (a gate with two actions counts for both)",
            ("model", "action"), registry=registry,
        )
        self.difficulty = Counter(
            "steer_difficulty_class", "Questions by the difficulty class a DiffAdapt probe gave "
            "them", ("model", "difficulty"), registry=registry,
        )
        self.particle_ess = Histogram(
            "steer_particle_ess_ratio", "Effective sample size / particles, per particle-"
            "filter iteration (before resampling)", LABELS,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=registry,
        )
        self.particle_temperature = Histogram(
            "steer_particle_temperature", "Resampling temperature per particle-filter iteration "
            "(1 = no annealing)", LABELS, buckets=(1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0),
            registry=registry,
        )
        self.particle_steps = Histogram(
            "steer_particle_steps", "Particle-filter iterations per request", LABELS,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry,
        )
        self.particle_resamples = Counter(
            "steer_particle_resamples", "Particle-filter resampling events", LABELS,
            registry=registry,
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
        self.engine_up.labels(engine.model_name).set_function(lambda: float(engine.healthy))

    def watch_admission(self, model: str, admission) -> None:
        self.held_sequences.labels(model).set_function(lambda: float(admission.held))
        self.sequence_limit.labels(model).set(admission.limit)

    def count_error(self, model: str, method: str, exc: BaseException) -> None:
        """A request that ended in `exc`: its HTTP status (499: the client went away)."""
        default = 499 if isinstance(exc, asyncio.CancelledError) else 500
        self.request_errors.labels(model, method, str(getattr(exc, "status", default))).inc()

    def observe_gates(self, model: str, gates, steps) -> None:
        """A finished choice's gate firings (`GateSpec`s, its per-token `GateStep`s)."""
        for g, spec in enumerate(gates):
            fired = sum(1 for s in steps if s and s.fired >> g & 1)
            if fired:
                for action, _ in spec.gate.then:
                    self.gate_fired_tokens.labels(model, action.name.lower()).inc(fired)

    def observe_tokens(self, model: str, method: str, entropy, varentropy) -> None:
        h = self.token_entropy.labels(model, method)
        for value in entropy:
            if value is not None:
                h.observe(value)
        v = self.token_varentropy.labels(model, method)
        for value in varentropy:
            if value is not None:
                v.observe(value)
        self.generated_tokens.labels(model, method).inc(len(entropy))
