"""vLLM worker extension (`worker_extension_cls`): the in-worker side of layer steering.

Methods are called from the API process with `collective_rpc`, so they run on every
tensor-parallel rank. `steer_install` registers forward hooks on the outer model (which vLLM does
not compile): before every step they fill the steering table's coefficients and capture rows
from the requests in the batch (tracked by `SteeringRowsProcessor`) and run V-Reason's due
value-cache updates; after it they keep the captured hidden states of requests whose last prompt
token was computed, and V-Reason's captures.
"""

from __future__ import annotations

import numpy as np
import torch

from steering.east import fill_coefficients
from steering.vllm_adapter.layer_steering import final_norm
from steering.vllm_adapter.logits_processors import GateProcessor, SteeringRowsProcessor
from steering.vllm_adapter.vreason import ValueCacheTuner


class _StepFiller:
    """Writes one step's steering coefficients and capture rows; collects the captures."""

    def __init__(self, runner, table) -> None:
        self.runner = runner
        self.table = table
        processors = list(runner.input_batch.logitsprocs.all)  # an iterator
        self.rows_processor = next(p for p in processors if isinstance(p, SteeringRowsProcessor))
        self.gate_processor = next(p for p in processors if isinstance(p, GateProcessor))
        on_host = table.coefficients.device.type == "cpu"
        self.host = table.coefficients if on_host else torch.zeros_like(
            table.coefficients, device="cpu", pin_memory=True)
        self.scratch = np.zeros(tuple(self.host.shape), dtype=np.float32)
        self.copy_to_device = not on_host
        self.used = 0  # token rows written last step (to zero them again)
        self.capturing: list[tuple[str, int]] = []  # (request key, capture slot) this step
        self.captures: dict[str, torch.Tensor] = {}  # request key -> (layers, hidden), on CPU
        self.vreason = ValueCacheTuner(runner, table)
        self.capturing_any = False

    def before_forward(self, module, args, kwargs) -> None:
        rows = self.rows_processor.rows
        vreason_rows = self.vreason.processor.rows
        if not rows and not self.used and not vreason_rows:
            return
        ib = self.runner.input_batch
        qsl = self.runner.query_start_loc.np
        computed = ib.num_computed_tokens_cpu
        east_gate = self.gate_processor.east_gate
        steered = [(steering, int(qsl[i]), int(qsl[i + 1]), int(computed[i]),
                    int(east_gate[i]) if steering.gated else -1)
                   for i, steering in rows.items() if i < ib.num_reqs]
        end = max((e for _, _, e, _, _ in steered), default=0)
        span = max(end, self.used)
        if span:
            block = self.scratch[:, :span]
            block.fill(0)
            fill_coefficients(self.scratch, steered)
            self.host[:, :span] = torch.from_numpy(block).to(self.host.dtype)
            if self.copy_to_device:
                self.table.coefficients[:, :span].copy_(self.host[:, :span], non_blocking=True)
        self.used = end
        self.capturing = []
        capture_rows = []
        for steering, start, stop, done, _ in steered:
            row = steering.capture_row(start, stop, done)
            if row is not None and len(capture_rows) < self.table.capture_rows.numel():
                self.capturing.append((steering.key, len(capture_rows)))
                capture_rows.append(row)
        if vreason_rows:
            self.vreason.before_forward(qsl, computed, ib.num_reqs, capture_rows)
        if capture_rows:
            self.table.capture_rows[: len(capture_rows)].copy_(torch.tensor(capture_rows))
        self.capturing_any = bool(capture_rows)

    def after_forward(self, module, args, kwargs, output) -> None:
        if not self.capturing_any:
            return
        for key, slot in self.capturing:
            self.captures[key] = self.table.captured[:, slot].to("cpu", torch.float32, copy=True)
        self.vreason.after_forward()
        self.capturing = []
        self.capturing_any = False
        self.table.capture_rows.zero_()
        # Captures of aborted requests are never taken: keep only the newest few.
        while len(self.captures) > 4 * self.table.capture_rows.numel():
            self.captures.pop(next(iter(self.captures)))


class SteeringWorkerExtension:
    """Mixed into vLLM's worker class; every public name here becomes an RPC method."""

    def steer_install(self) -> dict:
        """Start the per-step hooks; returns the steering table's shape."""
        model = self.model_runner.model
        table = getattr(model, "steering_table", None)
        if table is None:
            raise RuntimeError("the model was loaded without steerable layers")
        if getattr(self, "_steer_filler", None) is None:
            filler = self._steer_filler = _StepFiller(self.model_runner, table)
            model.register_forward_pre_hook(filler.before_forward, with_kwargs=True)
            model.register_forward_hook(filler.after_forward, with_kwargs=True)
        return {"layers": table.num_layers, "slots": table.slots,
                "hidden_size": table.vectors.shape[1], "max_tokens": table.max_tokens,
                "capture_rows": table.capture_rows.numel(),
                "vreason_unsupported": self._steer_filler.vreason.unsupported}

    def steer_set_vector(self, slot: int, values: list[float]) -> None:
        """Make `values` the vector of table slot `slot`."""
        table = self.model_runner.model.steering_table
        table.vectors[slot].copy_(torch.tensor(values, dtype=table.vectors.dtype))

    def steer_take_capture(self, key: str, layers: list[int],
                           final: bool) -> dict[str, list] | None:
        """At the request's last prompt token: the residual stream after each of `layers` and,
        with `final`, the last layer's after the model's final norm (None if nothing was
        captured); forgets it."""
        captured = self._steer_filler.captures.pop(key, None)
        if captured is None:
            return None
        taken = {"layers": captured[layers].tolist()}
        if final:
            norm = final_norm(self.model_runner.model)
            weight = next(norm.parameters())
            with torch.inference_mode():
                normed = norm(captured[-1:].to(weight.device, weight.dtype))
            taken["final"] = normed[0].float().tolist()
        return taken

    def steer_take_vreason(self, key: str) -> dict | None:
        """The V-Reason report of request `key` (its updates and entropy peak); forgets it."""
        return self._steer_filler.vreason.take_report(key)
