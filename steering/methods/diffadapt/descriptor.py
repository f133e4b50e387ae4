"""DiffAdapt's descriptor: `steering.diffadapt`, its server options, and the pass before
generation that frames the request and sets each prompt's sampling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from steering.errors import InvalidRequest
from steering.methods.base import Method, ReportModel
from steering.methods.diffadapt.options import DiffAdaptOptions
from steering.methods.diffadapt.selector import (
    DEFAULT_MAX_TOKENS,
    StrategySelector,
    load_strategies,
)


class StrategyReport(ReportModel):
    prompt: str
    prefill: str
    system: str
    temperature: float
    top_p: float | None
    budget: float
    max_tokens: int


class ProbePosition(ReportModel):
    """The probe read the last token of the question wrapped in `prompt`, then `prefill`."""

    prompt: str
    prefill: str


class ContinuationReport(ReportModel):
    """How an answer the budget cut off goes on (`steering.framing.Continuation`)."""

    prefix: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: str


class ContinuedReport(ReportModel):
    """This choice was cut off and continued: the prefix's tokens, then `tokens` sampled."""

    prefix_tokens: int
    tokens: int
    finish_reason: str | None


class DiffAdaptReport(ReportModel):
    """The probe's decision (no probabilities or position when the request set the class),
    the strategy served and the continuation."""

    probe: str
    recipe: Literal["paper", "variant"]
    difficulty: str
    probabilities: dict[str, float] | None
    probe_position: ProbePosition | None
    strategy: StrategyReport
    continuation: ContinuationReport | None
    continued: ContinuedReport | None


class DiffAdapt(Method):
    name = "diffadapt"
    report_model = DiffAdaptReport
    prepares = True

    def fields(self):
        return {"diffadapt": (DiffAdaptOptions | None, None)}

    def add_arguments(self, parser) -> None:
        parser.add_argument("--diffadapt-strategies", type=Path,
                            default=os.environ.get("STEER_DIFFADAPT_STRATEGIES"),
                            help="JSON file changing DiffAdapt's strategies, e.g. {\"easy\": "
                            "{\"prompt\": \"{question} Be brief.\", \"temperature\": 0.3, "
                            "\"budget\": 0.3}} (default: the paper's temperatures and budgets)")
        parser.add_argument("--diffadapt-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                            help="DiffAdapt's full token budget when a request sets no "
                            "max_tokens (each class gets its share)")

    def configure(self, args):
        return load_strategies(args.diffadapt_strategies), args.diffadapt_max_tokens

    async def start(self, config, services) -> StrategySelector:
        strategies, max_tokens = config or (load_strategies(None), DEFAULT_MAX_TOKENS)
        return StrategySelector(services.engine, services.meters(self.name), strategies,
                                max_tokens)

    def read(self, request) -> DiffAdaptOptions | None:
        return request.steering.diffadapt if request.steering else None

    def check(self, options: DiffAdaptOptions, request, plan) -> None:
        """In an orchestration its strategy frames the prompt and sets the sampling of every
        engine request; a continuation would need each of them continued: refused."""
        orchestrator = plan.orchestrator
        if orchestrator is not None and options.continuation is not False:
            raise InvalidRequest(f"with {orchestrator.param}, set {self.param}.continuation "
                                 "to false (an orchestration's engine requests are not "
                                 "continued after their budget)", f"{self.param}.continuation")

    def metrics(self, registry):
        from prometheus_client import Counter

        return Counter("steer_difficulty_class", "Questions by the difficulty class a DiffAdapt "
                       "probe gave them", ("model", "difficulty"), registry=registry)

    async def prepare(self, options: DiffAdaptOptions, conversation, session,
                      selector: StrategySelector):
        """Probe each question, then the request as the strategies frame it, with each
        prompt's temperature, top-p and budget (and continuation) set in the session."""
        recipe = selector.recipe(options)  # a 404 before any work
        self._refuse_picked_fields(recipe, conversation.fields_set)
        questions = conversation.questions()
        if conversation.chat:
            if questions is None:
                raise InvalidRequest(f"{self.param} needs a user message with text content "
                                     "(the question)", "messages")
            prefills = [s.prefill for s in recipe.strategies.values()] + [
                c.prefill for c in (options.strategies or {}).values()]
            if (recipe.chat_only or any(prefills)) and not conversation.question_is_last():
                raise InvalidRequest("a DiffAdapt prefill continues the conversation with the "
                                     "assistant's turn: the last message must be the user's "
                                     "question, without continue_final_message", "messages")
        else:
            if recipe.chat_only:
                raise InvalidRequest("a paper-recipe probe reads the question through the chat "
                                     "template: send it to /v1/chat/completions",
                                     f"{self.param}.probe")
            if questions is None:
                raise InvalidRequest(f"{self.param} wraps the question in a strategy prompt: "
                                     "send the prompt as text", "prompt")
        decisions = await selector.decide_all(options, questions, conversation.render,
                                              conversation.max_tokens)
        for ordinal, decision in enumerate(decisions):
            s = decision.strategy
            session.override(ordinal, temperature=s.temperature, top_p=s.top_p,
                             max_tokens=decision.max_tokens, continuation=decision.continuation)
            session.prompt_outcomes[ordinal][self.name] = decision
        return conversation.framed(questions, [d.strategy for d in decisions])

    def _refuse_picked_fields(self, recipe, fields_set) -> None:
        """DiffAdapt picks the temperature itself (and the paper's recipe top-p); a request
        that also sets one is ambiguous."""
        picked = ["temperature"] + (
            ["top_p"] if any(s.top_p is not None for s in recipe.strategies.values()) else [])
        for name in picked:
            if name in fields_set:
                raise InvalidRequest(f"{self.param} picks '{name}' per difficulty class; drop "
                                     f"'{name}' or set it in {self.param}.strategies", name)

    def report(self, options, outcome) -> dict | None:
        decision = outcome.prompt.get(self.name)
        if decision is None:
            return None
        return {**decision.report(), "continued": outcome.continued}
