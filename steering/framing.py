"""How a question is put to the model, and how a cut-off answer goes on: prompt shapes the
engine and the HTTP layer apply without knowing which method asked for them."""

from __future__ import annotations

from dataclasses import dataclass, replace

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Framing:
    """How a question is put to the model: `prompt` wraps it ('{question}' marks where),
    `prefill` starts the assistant's turn (the model continues it), `system` is the system
    message for a conversation that has none ('' adds nothing)."""

    prompt: str = "{question}"
    prefill: str = ""
    system: str = ""

    def wrap(self, question: str) -> str:
        return self.prompt.replace("{question}", question)

    def for_model(self, thinks: bool):
        """As written for a model with `<think>` tokens, else with the tags removed (and the
        blank lines that followed the opening one)."""
        if thinks:
            return self
        prefill = self.prefill.replace(THINK_CLOSE, "").replace(THINK_OPEN, "").lstrip("\n")
        return replace(self, prefill=prefill)


@dataclass(frozen=True)
class Continuation:
    """How an answer cut off by its token budget goes on: the answer so far, then `prefix`,
    sampled on at `temperature` / `top_p` for at most `max_tokens` until `stop`."""

    prefix: str
    temperature: float
    top_p: float
    max_tokens: int
    stop: str
