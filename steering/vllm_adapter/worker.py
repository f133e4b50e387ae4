"""vLLM worker extension (`worker_extension_cls`): the in-worker side of layer steering.

Methods are called from the API process with `collective_rpc`, so they run on every
tensor-parallel rank. `steer_install` registers a forward pre-hook on the outer model (which vLLM
does not compile); before every step it fills the steering table's coefficients from the
requests in the batch, tracked by `SteeringRowsProcessor`.
"""

from __future__ import annotations

import numpy as np
import torch

from steering.east import fill_coefficients
from steering.vllm_adapter.logits_processors import SteeringRowsProcessor


class _CoefficientFiller:
    """Per-step writer of the steering table's coefficients (see `layer_steering`)."""

    def __init__(self, runner, table) -> None:
        self.runner = runner
        self.table = table
        self.rows_processor = next(
            p for p in runner.input_batch.logitsprocs.all if isinstance(p, SteeringRowsProcessor))
        on_host = table.coefficients.device.type == "cpu"
        self.host = (table.coefficients if on_host else torch.zeros_like(
            table.coefficients, device="cpu", pin_memory=True))
        self.host_np = self.host.numpy() if self.host.dtype != torch.bfloat16 else None
        self.scratch = np.zeros(tuple(self.host.shape), dtype=np.float32)
        self.copy_to_device = not on_host
        self.used = 0  # token rows written last step (to zero them again)

    def __call__(self, module, args, kwargs) -> None:
        rows = self.rows_processor.rows
        if not rows and not self.used:
            return
        ib = self.runner.input_batch
        qsl = self.runner.query_start_loc.np
        computed = ib.num_computed_tokens_cpu
        steered = [(steering, int(qsl[i]), int(qsl[i + 1]), int(computed[i]))
                   for i, steering in rows.items() if i < ib.num_reqs]
        end = max((e for _, _, e, _ in steered), default=0)
        span = max(end, self.used)
        if span:
            block = self.scratch[:, :span]
            block.fill(0)
            fill_coefficients(self.scratch, steered)
            self.host[:, :span] = torch.from_numpy(block).to(self.host.dtype)
            if self.copy_to_device:
                self.table.coefficients[:, :span].copy_(self.host[:, :span], non_blocking=True)
        self.used = end


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; every public name here becomes an RPC method."""

    def steer_install(self) -> dict:
        """Start filling steering coefficients each step; returns the table's shape."""
        model = self.model_runner.model
        table = getattr(model, "steering_table", None)
        if table is None:
            raise RuntimeError("the model was loaded without steerable layers")
        if getattr(self, "_steer_hook", None) is None:
            filler = _CoefficientFiller(self.model_runner, table)
            self._steer_hook = model.register_forward_pre_hook(filler, with_kwargs=True)
        return {"layers": table.num_layers, "slots": table.slots,
                "hidden_size": table.vectors.shape[1], "max_tokens": table.max_tokens}

    def steer_set_vector(self, slot: int, values: list[float]) -> None:
        """Make `values` the vector of table slot `slot`."""
        table = self.model_runner.model.steering_table
        table.vectors[slot].copy_(torch.tensor(values, dtype=table.vectors.dtype))
