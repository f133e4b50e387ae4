"""Residual-stream steering that survives vLLM's compiled mode.

vLLM compiles the decoder stack (torch.compile; CUDA graphs on GPU) during start-up, so forward
hooks added afterwards never run. Instead, when the model is loaded (before compilation) every
decoder layer is wrapped in `SteerableLayer`, which adds `coefficients[layer, :tokens] @ vectors`
to the layer's hidden-state output and copies the residual stream at `capture_rows` into
`captured`. All four are persistent buffers of one `SteeringTable`: the compiled graph reads and
writes whatever storage they have, and hooks on the (uncompiled) outer model refill them before
each step and read the captures after it (`steering.engine.worker`). Both directions are
tested in compiled mode against HF transformers. There are no data-dependent Python branches,
so CUDA graphs can capture the same code. With no steered request the coefficients are zero and
the cost is one (tokens × slots) @ (slots × hidden) product and a few-row copy per layer.

Adding to a vLLM layer's `hidden_states` output adds to the residual stream: the next layer's
fused add-norm (or the final norm) sums it with `residual`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger("entropy_steer.layer_steering")



class SteeringTable(nn.Module):
    """Resident steering vectors (slots × hidden) and one step's per-token coefficients
    (layers × max tokens × slots); for capture, the step's token rows to keep
    (capture_rows) and what each layer's residual stream held there (layers × rows × hidden)
    and, for V-Reason, the last layer's attention query there (`captured_query`)."""

    def __init__(self, num_layers: int, max_tokens: int, hidden_size: int, slots: int,
                 dtype: torch.dtype, device: torch.device, capture_rows: int) -> None:
        super().__init__()
        self.query_source: nn.Module | None = None  # the last layer's attention (V-Reason)

        def buffer(name, *shape, dtype=dtype):
            self.register_buffer(name, torch.zeros(*shape, dtype=dtype, device=device),
                                 persistent=False)

        buffer("vectors", slots, hidden_size)
        buffer("coefficients", num_layers, max_tokens, slots)
        buffer("capture_rows", capture_rows, dtype=torch.long)
        buffer("captured", num_layers, capture_rows, hidden_size)

    def capture_queries_of(self, attention: nn.Module, query_size: int) -> None:
        """Make `attention` (a vLLM attention layer) copy its query at the capture rows into a
        new buffer `captured_query` (rows × query_size), by swapping in a subclass whose forward
        does that first: attribute access and isinstance checks on the layer are unchanged."""
        self.register_buffer("captured_query", torch.zeros(
            self.capture_rows.numel(), query_size, dtype=self.captured.dtype,
            device=self.captured.device), persistent=False)
        table = self

        class QueryCapture(type(attention)):
            def forward(self, query, *args, **kwargs):
                rows = table.capture_rows.clamp(max=query.shape[0] - 1)
                kept = query.index_select(0, rows)
                table.captured_query.copy_(kept.reshape(table.captured_query.shape))
                return super().forward(query, *args, **kwargs)

        attention.__class__ = QueryCapture
        object.__setattr__(self, "query_source", attention)  # not a submodule of the table

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
    """A decoder layer whose hidden-state output gets this step's steering added and whose
    residual stream is kept at the capture rows."""

    def __init__(self, inner: nn.Module, index: int, table: SteeringTable) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.table = table  # the same module under every layer: its buffers are shared

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        pair = isinstance(out, tuple)
        hidden = out[0] if pair else out
        table = self.table
        delta = table.coefficients[self.index, : hidden.shape[0]] @ table.vectors
        hidden = hidden + delta.to(hidden.dtype)
        # The residual stream after this layer is hidden + residual (vLLM defers the add).
        rows = table.capture_rows.clamp(max=hidden.shape[0] - 1)  # idle rows are 0
        kept = hidden.index_select(0, rows)
        if pair and isinstance(out[1], torch.Tensor):
            kept = kept + out[1].index_select(0, rows)
        table.captured[self.index].copy_(kept)
        return (hidden, *out[1:]) if pair else hidden


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder stack: the largest ModuleList whose name ends in 'layers'."""
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers"]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no decoder layer list ('...layers') found")
    return max(candidates, key=lambda item: len(item[1]))


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the decoder stack (what turns the last layer's residual stream
    into HF's last hidden state)."""
    name, _ = decoder_layers(model)
    parent = model.get_submodule(name.rpartition(".")[0])
    for attribute in ("norm", "final_layernorm", "ln_f"):
        module = getattr(parent, attribute, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(model).__name__}: no final norm found next to {name}")


def install_steerable_layers(model: nn.Module, vllm_config, slots: int,
                             capture_rows: int) -> None:
    """Wrap every decoder layer of a freshly loaded model; attach the table as
    `model.steering_table`."""
    name, layers = decoder_layers(model)
    scheduler = vllm_config.scheduler_config
    compilation = vllm_config.compilation_config
    max_tokens = max(scheduler.max_num_batched_tokens,
                     getattr(compilation, "max_cudagraph_capture_size", None) or 0)
    reference = next(model.parameters())
    table = SteeringTable(len(layers), max_tokens, vllm_config.model_config.get_hidden_size(),
                          slots, vllm_config.model_config.dtype, reference.device, capture_rows)
    wrapped = 0
    for index, layer in enumerate(layers):
        if sum(1 for _ in layer.parameters()) == 0:  # pipeline-parallel placeholder
            continue
        layers[index] = SteerableLayer(layer, index, table)
        wrapped += 1
    last = getattr(layers[-1], "inner", layers[-1])
    attention = getattr(getattr(last, "self_attn", None), "attn", None)
    if attention is not None and hasattr(attention, "num_heads"):
        table.capture_queries_of(attention, attention.num_heads * attention.head_size)
    model.steering_table = table
    logger.info("steering: wrapped %d decoder layers of %s (%d slots, %d tokens)",
                wrapped, name, slots, max_tokens)
