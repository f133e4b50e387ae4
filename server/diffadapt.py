"""DiffAdapt per request: probe the question's hidden state, pick the class's strategy.

The probe pass is a one-token, unsteered engine request that returns the last layer's hidden
state after the final norm at the question's last token; the generation that follows uses the
strategy's prompt (the question wrapped in its instruction), temperature and share of the
token budget. Strategy prompts put the question first, so the generation reuses the probe
pass's KV blocks through vLLM's prefix cache up to the last full block of the question.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from server.engine import Engine
from server.errors import InvalidRequest, NotFound
from server.metrics import SteerMetrics
from server.protocol import DiffAdaptOptions
from steering.artifacts import ArtifactNotFound
from steering.diffadapt import CLASSES, DEFAULT_STRATEGIES, Strategy

DEFAULT_MAX_TOKENS = 1024  # the paper's "Max" when a request sets no max_tokens


@dataclass(frozen=True)
class Decision:
    """What the probe said about one question, and the strategy it selected."""

    probe: str
    difficulty: str
    probabilities: dict[str, float]
    strategy: Strategy
    max_tokens: int

    def report(self) -> dict:
        return {"probe": self.probe, "difficulty": self.difficulty,
                "probabilities": self.probabilities,
                "strategy": {"prompt": self.strategy.prompt,
                             "temperature": self.strategy.temperature,
                             "budget": self.strategy.budget, "max_tokens": self.max_tokens}}

    def wrap(self, question: str) -> str:
        return self.strategy.prompt.replace("{question}", question)


def load_strategies(path: Path | None) -> dict[str, Strategy]:
    """The paper's strategies, with a server-side JSON file's changes
    ({"easy": {"prompt": ..., "temperature": ..., "budget": ...}, ...}) applied."""
    from server.protocol import StrategyOverride

    strategies = dict(DEFAULT_STRATEGIES)
    if path is None:
        return strategies
    try:
        changes = json.loads(Path(path).read_text())
        if not isinstance(changes, dict) or not set(changes) <= set(CLASSES):
            raise ValueError(f"expected an object with keys among {list(CLASSES)}")
        for name, change in changes.items():
            strategies[name] = _apply(strategies[name], StrategyOverride(**change))
    except (OSError, ValueError, TypeError) as exc:
        raise SystemExit(f"--diffadapt-strategies {path}: {exc}") from None
    return strategies


def _apply(strategy: Strategy, change) -> Strategy:
    return replace(strategy, **{k: v for k, v in change.model_dump().items() if v is not None})


class DifficultyRouter:
    """Stored probe + strategy table → a Decision per question."""

    def __init__(self, engine: Engine, metrics: SteerMetrics, strategies: dict[str, Strategy],
                 default_max_tokens: int) -> None:
        self.engine, self.metrics = engine, metrics
        self.strategies = strategies
        self.default_max_tokens = default_max_tokens

    def probe(self, options: DiffAdaptOptions):
        """The stored probe the request names (404 when there is none)."""
        try:
            return self.engine.probes.get(options.probe)[0]
        except ArtifactNotFound:
            raise NotFound(f"no probe named '{options.probe}'", "steering.diffadapt.probe",
                           "probe_not_found") from None

    async def decide(self, options: DiffAdaptOptions, question_ids: list[int],
                     max_tokens: int | None) -> Decision:
        """Probe the question (as the client sent it) and pick its class's strategy; the
        budget is the class's share of `max_tokens` (the server default when None)."""
        probe = self.probe(options)  # again: it may have been deleted since `route` began
        features = await self.engine.prompt_features(question_ids)
        probabilities = probe.probabilities(features[None])[0]
        difficulty = CLASSES[int(probabilities.argmax())]
        strategy = self.strategies[difficulty]
        change = (options.strategies or {}).get(difficulty)
        if change is not None:
            strategy = _apply(strategy, change)
        limit = max_tokens or self.default_max_tokens
        self.metrics.difficulty.labels(self.engine.model_name, difficulty).inc()
        return Decision(probe=options.probe, difficulty=difficulty,
                        probabilities={c: float(p) for c, p in zip(CLASSES, probabilities)},
                        strategy=strategy, max_tokens=max(1, round(strategy.budget * limit)))


    async def route(self, options: DiffAdaptOptions, questions: list[str],
                    render: Callable[[str], Awaitable[list[int]]],
                    max_tokens: int | None) -> list[Decision]:
        """A decision per question, its budget clamped to the context its strategy's prompt
        leaves (`render` turns a question into the token ids the route would generate from)."""
        self.probe(options)  # fail before any work when it does not exist

        async def one(question: str) -> Decision:
            decision = await self.decide(options, await render(question), max_tokens)
            room = self.engine.max_model_len - len(await render(decision.wrap(question)))
            return replace(decision, max_tokens=max(1, min(decision.max_tokens, room)))

        return list(await asyncio.gather(*(one(q) for q in questions)))


def reject_conflicts(body) -> None:
    """DiffAdapt picks the temperature itself; a request that also sets one is ambiguous."""
    if "temperature" in body.model_fields_set:
        raise InvalidRequest("steering.diffadapt picks the temperature per difficulty class; "
                             "drop 'temperature' or set it in steering.diffadapt.strategies",
                             "temperature")
