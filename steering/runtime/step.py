"""One engine step as a method's layer work sees it, and the interface of that work.

Before each forward pass the engine's step filler (`steering.engine.worker`) gives every
method's `WorkerPart` the step's layout: which token rows each batch row occupies, how many of
its tokens were computed before, a zeroed coefficient block to add steering to (layers × token
rows × vector slots), and the capture rows to ask for (the residual stream, and the last
layer's attention query, at a token row). After the pass, each part reads its captures, then
the logits the model computed from it.
"""

from __future__ import annotations

import numpy as np
import torch


class LayerStep:
    """The layout of one step, the coefficient block its parts write and the capture rows
    they ask for."""

    def __init__(self, runner, coefficients: np.ndarray, capture_capacity: int) -> None:
        batch = runner.input_batch
        self.num_reqs = batch.num_reqs
        self.query_start = runner.query_start_loc.np  # row i's tokens: [qs[i], qs[i + 1])
        self.computed = batch.num_computed_tokens_cpu  # tokens of row i computed before
        self.coefficients = coefficients
        self.end = 0  # one past the last token row given coefficients
        self.capture_rows: list[int] = []
        self._capacity = capture_capacity

    def tokens(self, index: int) -> tuple[int, int, int]:
        """Batch row `index`'s first and end token row in this step, and its tokens computed
        before it."""
        return (int(self.query_start[index]), int(self.query_start[index + 1]),
                int(self.computed[index]))

    def scheduled(self, index: int) -> bool:
        """Whether batch row `index` has tokens in this step."""
        return index < self.num_reqs and self.query_start[index + 1] > self.query_start[index]

    def wrote(self, end: int) -> None:
        """A part wrote coefficients up to token row `end`."""
        self.end = max(self.end, end)

    def capture(self, token_row: int) -> int | None:
        """Ask for the residual stream (and query) at `token_row`; its capture slot, or None
        when the step's capture rows are all taken."""
        if len(self.capture_rows) >= self._capacity:
            return None
        self.capture_rows.append(token_row)
        return len(self.capture_rows) - 1


class WorkerPart:
    """A method's per-step layer work in the worker. `unsupported` says why the method cannot
    run on this engine (None: it can); the engine refuses its requests with that reason."""

    unsupported: str | None = None

    def __init__(self, runner, table) -> None:
        self.runner, self.table = runner, table

    @property
    def active(self) -> bool:
        """Whether this step may need it (it has rows)."""
        return False

    def before_forward(self, step: LayerStep) -> None:
        """Add coefficients, ask for captures, run work that fell due."""

    def after_forward(self, step: LayerStep) -> None:
        """Read this step's captures (`self.table.captured[:, slot]`)."""

    def after_logits(self, logits: torch.Tensor) -> None:
        """Read the step's logits as the model computed them: first its sampled rows' (one per
        batch row, before any sampling parameter or processor changes them), then, when a
        request asks for prompt logprobs, its prompt positions' (vLLM computes those later in
        the step)."""

    def take(self, key: str, *args):
        """What a finished request `key` left for the API process (None: nothing)."""
        return None


def processor_of(runner, cls):
    """The batch's instance of logits processor `cls` (vLLM builds one per worker)."""
    return next(p for p in runner.input_batch.logitsprocs.all if isinstance(p, cls))


def cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to("cpu", torch.float32, copy=True)
