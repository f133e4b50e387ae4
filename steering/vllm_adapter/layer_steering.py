"""Residual-stream steering that survives vLLM's compiled mode.

vLLM compiles the decoder stack (torch.compile; CUDA graphs on GPU) during start-up, so forward
hooks added afterwards never run. Instead, when the model is loaded (before compilation) every
decoder layer is wrapped in `SteerableLayer`, which adds `coefficients[layer, :tokens] @ vectors`
to the layer's hidden-state output. Both are persistent buffers of one `SteeringTable`: the
compiled graph reads whatever they hold, and a forward pre-hook on the (uncompiled) outer model
refills the coefficients for each step (`steering.vllm_adapter.worker`). With no steered request
the coefficients are zero and the cost is one (tokens × slots) @ (slots × hidden) product per
layer.

Adding to a vLLM layer's `hidden_states` output adds to the residual stream: the next layer's
fused add-norm (or the final norm) sums it with `residual`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("entropy_steer.layer_steering")

DEFAULT_SLOTS = 8


class SteeringTable(nn.Module):
    """Resident steering vectors (slots × hidden) and one step's per-token coefficients
    (layers × max tokens × slots)."""

    def __init__(self, num_layers: int, max_tokens: int, hidden_size: int, slots: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(slots, hidden_size, dtype=dtype,
                                                    device=device), persistent=False)
        self.register_buffer("coefficients", torch.zeros(num_layers, max_tokens, slots,
                                                         dtype=dtype, device=device),
                             persistent=False)

    @property
    def num_layers(self) -> int:
        return self.coefficients.shape[0]

    @property
    def max_tokens(self) -> int:
        return self.coefficients.shape[1]

    @property
    def slots(self) -> int:
        return self.vectors.shape[0]


class SteerableLayer(nn.Module):
    """A decoder layer whose hidden-state output gets this step's steering added."""

    def __init__(self, inner: nn.Module, index: int, table: SteeringTable) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.table = table  # the same module under every layer: its buffers are shared

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        table = self.table
        delta = table.coefficients[self.index, : hidden.shape[0]] @ table.vectors
        hidden = hidden + delta.to(hidden.dtype)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder stack: the largest ModuleList whose name ends in 'layers'."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no decoder layer list ('...layers') found")
    return max(candidates, key=lambda item: len(item[1]))


def install_steerable_layers(model: nn.Module, vllm_config, slots: int = DEFAULT_SLOTS) -> None:
    """Wrap every decoder layer of a freshly loaded model; attach the table as
    `model.steering_table`."""
    name, layers = decoder_layers(model)
    scheduler = vllm_config.scheduler_config
    compilation = vllm_config.compilation_config
    max_tokens = max(scheduler.max_num_batched_tokens,
                     getattr(compilation, "max_cudagraph_capture_size", None) or 0)
    reference = next(model.parameters())
    table = SteeringTable(len(layers), max_tokens, vllm_config.model_config.get_hidden_size(),
                          slots, vllm_config.model_config.dtype, reference.device)
    wrapped = 0
    for index, layer in enumerate(layers):
        if sum(1 for _ in layer.parameters()) == 0:  # pipeline-parallel placeholder
            continue
        layers[index] = SteerableLayer(layer, index, table)
        wrapped += 1
    model.steering_table = table
    logger.info("steering: wrapped %d decoder layers of %s (%d slots, %d tokens)",
                wrapped, name, slots, max_tokens)
