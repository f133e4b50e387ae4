"""DiffAdapt per request: probe the question's hidden state, pick the class's strategy.

The probe pass is a one-token, unsteered engine request that returns the last layer's hidden
state after the final norm at the last token of the question as the probe's recipe frames it:
the question itself (variant), or the question with the paper's instruction and an assistant
prefill that asks the model for the difficulty (paper). The generation that follows uses the
strategy's framing (instruction, system prompt, assistant prefill), temperature, top-p and share
of the token budget; with a continuation (the paper recipe's default), an answer the budget
cut off goes on after a forced final-answer prefix (the engine client's continuation). A
variant strategy puts the question first, so the generation reuses the probe pass's KV blocks
through vLLM's prefix cache up to the last full block they share; a paper strategy's system
prompt comes before the question (as in the authors' code), so it shares little.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from steering.artifacts import ArtifactNotFound
from steering.errors import EngineUnavailable, NotFound
from steering.framing import THINK_CLOSE, THINK_OPEN, Continuation, Framing
from steering.methods.base import Sampling
from steering.methods.diffadapt.core import (
    AUTHORS_CONTINUATION,
    CLASSES,
    RECIPES,
    Recipe,
    RecipeSpec,
    Strategy,
    has_think_tags,
)
from steering.methods.hidden_states.descriptor import HiddenStates

if TYPE_CHECKING:
    from steering.methods.diffadapt.options import DiffAdaptOptions

DEFAULT_MAX_TOKENS = 1024  # the paper's "Max" when a request sets no max_tokens

Render = Callable[[str, Framing], Awaitable[list[int]]]
"""A question framed so → the token ids the route would send the engine."""


@dataclass(frozen=True)
class Decision:
    """What the probe said about one question, and the strategy it selected."""

    probe: str
    recipe: Recipe
    probe_framing: Framing | None  # how the probe read the question (None: the class was set)
    difficulty: str
    probabilities: dict[str, float] | None
    strategy: Strategy
    max_tokens: int
    continuation: Continuation | None  # for an answer the budget cuts off

    def report(self) -> dict:
        s = self.strategy
        return {"probe": self.probe, "recipe": self.recipe.value, "difficulty": self.difficulty,
                "probabilities": self.probabilities,
                "probe_position": None if self.probe_framing is None else
                {"prompt": self.probe_framing.prompt, "prefill": self.probe_framing.prefill},
                "strategy": {"prompt": s.prompt, "prefill": s.prefill, "system": s.system,
                             "temperature": s.temperature, "top_p": s.top_p,
                             "budget": s.budget, "max_tokens": self.max_tokens},
                "continuation": None if self.continuation is None else
                asdict(self.continuation)}


def load_strategies(path: Path | None) -> dict[str, Strategy]:
    """The variant recipe's strategies, with a server-side JSON file's changes
    ({"easy": {"prompt": ..., "temperature": ..., "budget": ...}, ...}) applied; raises
    ValueError naming the file when it cannot be read or is not such an object."""
    from steering.methods.diffadapt.options import StrategyOverride

    strategies = dict(RECIPES[Recipe.VARIANT].strategies)
    if path is None:
        return strategies
    try:
        changes = json.loads(Path(path).read_text())
        if not isinstance(changes, dict) or not set(changes) <= set(CLASSES):
            raise ValueError(f"expected an object with keys among {list(CLASSES)}")
        for name, change in changes.items():
            strategies[name] = _apply(strategies[name], StrategyOverride(**change))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"--diffadapt-strategies {path}: {exc}") from None
    return strategies


def _apply(strategy: Strategy, change) -> Strategy:
    return replace(strategy, **{k: v for k, v in change.model_dump().items() if v is not None})


class StrategySelector:
    """Stored probe + its recipe's strategy table → a Decision per question."""

    def __init__(self, engine, classes, strategies: dict[str, Strategy],
                 default_max_tokens: int) -> None:
        """`strategies`: the variant recipe's table (the server's `--diffadapt-strategies`);
        the paper's is the authors'. `classes`: the counter of difficulty classes."""
        self.engine, self.classes = engine, classes
        self.recipes = {**RECIPES, Recipe.VARIANT: replace(RECIPES[Recipe.VARIANT],
                                                           strategies=strategies)}
        self.default_max_tokens = default_max_tokens

    @cached_property
    def thinks(self) -> bool:
        """Whether the served model has `<think>` tags (else the paper's texts drop them)."""
        count = [len(self.engine.tokenizer.encode(t, add_special_tokens=False))
                 for t in (THINK_OPEN, THINK_CLOSE)]
        return has_think_tags(*count)

    def recipe(self, options: DiffAdaptOptions) -> RecipeSpec:
        """The recipe of the stored probe the request names (404 when there is none)."""
        return self.recipes[Recipe(self._probe(options)[1].recipe)]

    def _probe(self, options: DiffAdaptOptions):
        try:
            return self.engine.probes.get(options.probe)
        except ArtifactNotFound:
            raise NotFound(f"no probe named '{options.probe}'", "steering.diffadapt.probe",
                           "probe_not_found") from None

    async def decide(self, options: DiffAdaptOptions, question: str, render: Render,
                     max_tokens: int | None) -> Decision:
        """Probe the question as its recipe frames it (unless the request set the class) and
        pick its class's strategy; the budget is the class's share of `max_tokens` (the server
        default when None), clamped to the context the strategy's prompt leaves."""
        probe, meta = self._probe(options)  # again: it may have been replaced since
        recipe = self.recipes[Recipe(meta.recipe)]
        framing = probabilities = None
        difficulty = options.difficulty
        if difficulty is None:
            framing = recipe.probe_framing.for_model(self.thinks)
            features = await self.features(await render(question, framing))
            read = probe.probabilities(features[None])[0]
            difficulty = CLASSES[int(read.argmax())]
            probabilities = {c: float(p) for c, p in zip(CLASSES, read)}
        strategy = recipe.strategies[difficulty].for_model(self.thinks)
        change = (options.strategies or {}).get(difficulty)
        if change is not None:
            strategy = _apply(strategy, change)
        limit = max_tokens or self.default_max_tokens
        room = self.engine.max_model_len - len(await render(question, strategy))
        self.classes.labels(self.engine.model_name, difficulty).inc()
        continues = options.continuation
        if continues is None:
            continues = recipe.continuation is not None
        return Decision(probe=options.probe, recipe=Recipe(meta.recipe), probe_framing=framing,
                        difficulty=difficulty, probabilities=probabilities, strategy=strategy,
                        max_tokens=max(1, min(round(strategy.budget * limit), room)),
                        continuation=(recipe.continuation or AUTHORS_CONTINUATION)
                        if continues else None)

    async def decide_all(self, options: DiffAdaptOptions, questions: list[str],
                         render: Render, max_tokens: int | None) -> list[Decision]:
        return list(await asyncio.gather(
            *(self.decide(options, q, render, max_tokens) for q in questions)))

    async def features(self, prompt_token_ids: list[int]):
        """The last layer's hidden state after the final norm at the prompt's last token (what
        a probe reads), from a one-token, unsteered pass; the prompt's KV blocks stay in the
        prefix cache for the generation that follows."""
        import torch

        capture = HiddenStates()
        steering = {capture.name: capture.settings(((), True))}
        async for delta in self.engine.generate(prompt_token_ids,
                                                Sampling(max_tokens=1, temperature=0.0),
                                                steering):
            hidden_states = delta.collected.get(capture.name)
            if hidden_states is not None:
                return torch.tensor(hidden_states["final"])
        raise EngineUnavailable("the engine did not capture the hidden states")
