"""DiffAdapt's request models: `steering.diffadapt` and a strategy's per-request changes (the
server's `--diffadapt-strategies` file uses the same model)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from steering.methods.base import StrictModel

Difficulty = Literal["easy", "normal", "hard"]


class StrategyOverride(StrictModel):
    """Changes to one difficulty class's strategy (unset fields keep the server's)."""

    prompt: Annotated[str, Field(min_length=1, max_length=4096, description=(
        "wraps the question: '{question}' marks where it goes"))] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    budget: Annotated[float, Field(gt=0, le=1, description=(
        "fraction of the request's max tokens"))] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    prefill: Annotated[str, Field(max_length=4096, description=(
        "the start of the assistant's answer, which the model continues"))] | None = None

    @model_validator(mode="after")
    def _one_placeholder(self):
        if self.prompt is not None and self.prompt.count("{question}") != 1:
            raise ValueError("a strategy prompt must contain '{question}' exactly once")
        return self


class DiffAdaptOptions(StrictModel):
    """DiffAdapt (arXiv 2510.19669): a probe on the prompt's last hidden state picks the
    easy / normal / hard strategy (prompt, temperature, share of max tokens)."""

    probe: Annotated[str, Field(min_length=1, max_length=64, description="stored probe name")]
    strategies: dict[Difficulty, StrategyOverride] | None = None
    difficulty: Difficulty | None = Field(default=None, description=(
        "serve this class's strategy without the probe pass (a fixed-strategy baseline); the "
        "probe still names the recipe"))
    continuation: bool | None = Field(default=None, description=(
        "continue an answer its budget cut off after the authors' forced final-answer prefix "
        "(default: the paper recipe does, the variant does not)"))
