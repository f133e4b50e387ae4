"""vLLM worker extension (`worker_extension_cls`): the in-worker side of the engine.

Methods are called from the API process with `collective_rpc`, so they run on every
tensor-parallel rank. `steer_install` registers forward hooks on the outer model (which vLLM does
not compile): before every step they give each method's worker part (`Method.worker_part`, in
registry order) the step's layout, a zeroed coefficient block and the capture rows, then write
what the parts asked for into the steering table; after it, each part reads its captures, and
then the step's logits (a wrapper around the outer model's `compute_logits`, which vLLM calls
outside the compiled graph).
"""

from __future__ import annotations

import numpy as np
import torch

from steering.methods.registry import METHODS
from steering.runtime.step import LayerStep


class _StepFiller:
    """Runs the worker parts around each forward pass and fills the steering table."""

    def __init__(self, runner, table) -> None:
        self.runner = runner
        self.table = table
        self.parts = {m.name: m.worker_part(runner, table) for m in METHODS
                      if m.worker_part is not None}
        on_host = table.coefficients.device.type == "cpu"
        self.host = table.coefficients if on_host else torch.zeros_like(
            table.coefficients, device="cpu", pin_memory=True)
        self.scratch = np.zeros(tuple(self.host.shape), dtype=np.float32)
        self.copy_to_device = not on_host
        self.used = 0  # token rows written last step (to zero them again)
        self.step: LayerStep | None = None  # while a step that captures runs

    def before_forward(self, module, args, kwargs) -> None:
        active = [part for part in self.parts.values() if part.active]
        if not active and not self.used:
            return
        self.scratch[:, :self.used] = 0
        step = LayerStep(self.runner, self.scratch, self.table.capture_rows.numel())
        for part in active:
            part.before_forward(step)
        span = max(step.end, self.used)
        if span:
            self.host[:, :span] = torch.from_numpy(self.scratch[:, :span]).to(self.host.dtype)
            if self.copy_to_device:
                self.table.coefficients[:, :span].copy_(self.host[:, :span], non_blocking=True)
        self.used = step.end
        if step.capture_rows:
            self.table.capture_rows[: len(step.capture_rows)].copy_(
                torch.tensor(step.capture_rows))
            self.step = step

    def after_forward(self, module, args, kwargs, output) -> None:
        step, self.step = self.step, None
        if step is None:
            return
        for part in self.parts.values():
            part.after_forward(step)
        self.table.capture_rows.zero_()

    def after_logits(self, logits: torch.Tensor) -> None:
        for part in self.parts.values():
            if part.active:
                part.after_logits(logits)


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; every public name here becomes an RPC method."""

    def steer_install(self) -> dict:
        """Start the per-step hooks; returns the steering table's shape and, per method with
        a worker part, why it cannot run here (None: it can)."""
        model = self.model_runner.model
        table = getattr(model, "steering_table", None)
        if table is None:
            raise RuntimeError("the model was loaded without steerable layers")
        if getattr(self, "_steer_filler", None) is None:
            filler = self._steer_filler = _StepFiller(self.model_runner, table)
            model.register_forward_pre_hook(filler.before_forward, with_kwargs=True)
            model.register_forward_hook(filler.after_forward, with_kwargs=True)
            compute_logits = model.compute_logits

            def logits_seen_by_parts(hidden: torch.Tensor) -> torch.Tensor:
                logits = compute_logits(hidden)
                filler.after_logits(logits)
                return logits

            model.compute_logits = logits_seen_by_parts
        return {"layers": table.num_layers, "slots": table.slots,
                "hidden_size": table.vectors.shape[1], "max_tokens": table.max_tokens,
                "capture_rows": table.capture_rows.numel(),
                "unsupported": {name: part.unsupported
                                for name, part in self._steer_filler.parts.items()}}

    def steer_set_vector(self, slot: int, values: list[float]) -> None:
        """Make `values` the vector of table slot `slot`."""
        table = self.model_runner.model.steering_table
        table.vectors[slot].copy_(torch.tensor(values, dtype=table.vectors.dtype))

    def steer_take(self, method: str, key: str, *args):
        """What request `key` left with `method`'s worker part (None: nothing); forgets it."""
        return self._steer_filler.parts[method].take(key, *args)
