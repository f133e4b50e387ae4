"""V-Reason inside vLLM's worker: the request rows, their entropy phase, and the value-cache tuner.

Per engine step, in this order (vLLM runs them in one worker process):
1. `ValueCacheTuner.before_forward` (outer model's pre-hook) runs the updates that fell due in
   the previous step, on that request's cache slots only, then asks for the step's captures:
   the last layer's input and query at a row whose sampled token completes a multiple of
   `every`.
2. The compiled model runs; `SteerableLayer` / `QueryCapture` copy those rows into the table.
3. `ValueCacheTuner.after_forward` keeps each capture on its row, and `after_logits` the row's
   logits as the model computed them (the update's first step starts from them instead of
   recomputing them: one pass over the LM head less).
4. `VReasonProcessor.apply` measures the entropy of the V-Reason rows' logits in one batched op
   and feeds each row's EMA.

The cache layout is vLLM's CPU attention backend's (ISA "vec": per block and KV head, K stored
transposed as (head_dim, block_size), then V as (block_size, head_dim)); other backends are
refused at start with the reason (`ValueCacheTuner.unsupported`). The layer after the attention
is recomputed from the checkpoint's weights, because vLLM's CPU linear layers keep only packed
copies.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams

from steering.entropy import entropy_varentropy
from steering.methods.vreason.core import (
    EntropyPhase,
    LastLayerTail,
    Positions,
    VReasonConfig,
    tune_values,
)
from steering.runtime.layers import decoder_layers, final_norm
from steering.runtime.rows import RowStateProcessor, settings_of, steer_id
from steering.runtime.step import LayerStep, WorkerPart, processor_of

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("entropy_steer.vreason")

NAME = "vreason"

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")
_KEPT_REPORTS = 256  # reports of finished requests not yet taken by the API process


class VReasonRow:
    """One V-Reason request in the worker: its settings, entropy phase, pending capture and
    the report of its updates."""

    __slots__ = ("config", "prompt_len", "phase", "updates", "sampling", "hidden", "query",
                 "logits", "error")

    def __init__(self, config: VReasonConfig, prompt_len: int) -> None:
        self.config = config
        self.prompt_len = prompt_len
        self.phase = EntropyPhase(config.ema)
        self.updates: list[dict] = []
        self.sampling = False  # this step's logits give a kept token (not a partial prefill)
        self.hidden: torch.Tensor | None = None  # last layer's input at the newest position
        self.query: torch.Tensor | None = None  # its attention query there (after RoPE)
        self.logits: torch.Tensor | None = None  # the model's logits there
        self.error: str | None = None  # why tuning stopped for this request, if it failed


def encode_config(config: VReasonConfig) -> list:
    """`SamplingParams.extra_args` form of a config (msgpack-friendly)."""
    return [config.every, config.steps, config.lr, config.ema, str(config.positions)]


def _decode_config(value) -> VReasonConfig:
    every, steps, lr, ema, positions = value
    if not (isinstance(every, int) and every >= 1 and isinstance(steps, int) and steps >= 1
            and 0 < float(lr) and 0 <= float(ema) < 1 and positions in list(Positions)):
        raise ValueError(f"invalid V-Reason settings {value!r}")
    return VReasonConfig(every, steps, float(lr), float(ema), Positions(positions))


class VReasonProcessor(RowStateProcessor[VReasonRow]):
    """Tracks the V-Reason rows and feeds each kept token's entropy (T = 1, full vocabulary, as
    the telemetry measures it) to the row's EMA. Never changes the logits; not argmax-invariant
    so that vLLM calls it for greedy batches too."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        super().__init__(vllm_config, device, is_pin_memory)
        self.reports: OrderedDict[str, VReasonRow] = OrderedDict()

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        value = settings_of(sampling_params, NAME)
        if value is not None:
            _decode_config(value)

    def is_argmax_invariant(self) -> bool:
        return False

    def row_state(self, params: SamplingParams, prompt_token_ids: list[int] | None,
                  output_token_ids: list[int]) -> VReasonRow | None:
        value = settings_of(params, NAME)
        if value is None:
            return None
        row = VReasonRow(_decode_config(value), len(prompt_token_ids or ()))
        self.reports[steer_id(params)] = row
        while len(self.reports) > _KEPT_REPORTS:
            self.reports.popitem(last=False)
        return row

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        measured = [(index, row) for index, row in self.rows.items() if row.sampling]
        if not measured:
            return logits
        index = torch.tensor([i for i, _ in measured], device=logits.device)
        entropy, _ = entropy_varentropy(logits.index_select(0, index))
        for (_, row), value in zip(measured, entropy.tolist()):
            row.phase.observe(value)
            row.sampling = False
        return logits


def _checkpoint_tensors(model_config, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors from the model's safetensors checkpoint."""
    from safetensors import safe_open

    root = Path(model_config.model)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model_config.model, revision=model_config.revision,
                                      allow_patterns=["*.safetensors", "*.json"]))
    index = root / "model.safetensors.index.json"
    files = (sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else sorted(root.glob("*.safetensors")))
    found = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            for name in names & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    missing = names - found.keys()
    if missing:
        raise ValueError(f"the checkpoint lacks {sorted(missing)}")
    return found


class ValueCacheTuner(WorkerPart):
    """Runs V-Reason's value-cache updates for the rows of `processor` (see the module doc)."""

    def __init__(self, runner, table) -> None:
        super().__init__(runner, table)
        self.processor = processor_of(runner, VReasonProcessor)
        self.unsupported = self._check(runner)
        self.tail: LastLayerTail | None = None
        self.capturing: list[tuple[VReasonRow, int, int]] = []  # row, capture slot, batch row
        if self.unsupported is None:
            with torch.inference_mode(False):  # weights that autograd may save for backward
                self.tail = self._load_tail(runner)
            self.tail.compile()
        else:
            logger.warning("V-Reason is not available on this engine (its requests get a 400): "
                           "%s", self.unsupported)

    def _check(self, runner) -> str | None:
        config = runner.vllm_config
        architectures = config.model_config.hf_config.architectures or []
        if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
            return (f"V-Reason recomputes Llama-family last layers "
                    f"({', '.join(SUPPORTED_ARCHITECTURES)}); this model is "
                    f"{', '.join(architectures) or 'unknown'}")
        if config.parallel_config.tensor_parallel_size > 1 or \
                config.parallel_config.pipeline_parallel_size > 1:
            return ("V-Reason needs the whole last layer in one worker (no tensor or pipeline "
                    "parallelism)")
        if getattr(self.table, "captured_query", None) is None:
            return "the last decoder layer has no attention module to capture the query from"
        attention = self.table.query_source
        if getattr(attention, "isa", None) != "vec":
            return ("V-Reason reads and writes the value cache in vLLM's CPU attention layout "
                    "(float32 'vec' kernels); this engine uses "
                    f"{type(attention.impl).__name__} ({getattr(attention, 'isa', 'no CPU ISA')})")
        if getattr(attention, "kv_cache_dtype", "auto") != "auto":
            return "V-Reason edits the value cache in the model's dtype, not a quantized one"
        impl = attention.impl
        windowed = getattr(impl, "sliding_window", None) not in (None, -1)
        if windowed or getattr(impl, "logits_soft_cap", None) \
                or getattr(impl, "sinks", None) is not None:
            return "V-Reason's recomputation has no sliding window, soft cap or attention sinks"
        if config.model_config.hf_config.hidden_act != "silu":
            return "V-Reason's recomputation assumes a SwiGLU MLP"
        return None

    def _load_tail(self, runner) -> LastLayerTail:
        model, config = runner.model, runner.vllm_config.model_config
        _, layers = decoder_layers(model)
        last = len(layers) - 1
        prefix = f"model.layers.{last}."
        names = {prefix + n for n in ("self_attn.o_proj.weight", "post_attention_layernorm.weight",
                                      "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                      "mlp.down_proj.weight")}
        weights = _checkpoint_tensors(config, names)
        reference = next(model.parameters())

        def place(name: str) -> torch.Tensor:
            return weights[prefix + name].to(reference.device, reference.dtype)

        return LastLayerTail(
            o_proj=place("self_attn.o_proj.weight"),
            post_attention_norm=place("post_attention_layernorm.weight"),
            gate_proj=place("mlp.gate_proj.weight"), up_proj=place("mlp.up_proj.weight"),
            down_proj=place("mlp.down_proj.weight"),
            final_norm=next(final_norm(model).parameters()).detach(),
            lm_head=model.lm_head.weight[: config.get_vocab_size()].detach(),
            eps=float(config.hf_config.rms_norm_eps))

    @property
    def active(self) -> bool:
        return bool(self.processor.rows)

    def before_forward(self, step: LayerStep) -> None:
        """Run due updates; ask for this step's captures and remember which V-Reason row each
        serves."""
        self.capturing = []
        for index, row in self.processor.rows.items():
            if not step.scheduled(index):
                continue
            start, end, computed = step.tokens(index)
            if row.hidden is not None:
                try:
                    self._update(index, row, computed)
                except Exception as exc:  # a failed update ends tuning, never the engine
                    logger.exception("V-Reason update failed; request continues untuned")
                    row.error = f"{type(exc).__name__}: {exc}"
                row.hidden = row.query = row.logits = None
            newest = computed + end - start - 1
            row.sampling = newest >= row.prompt_len - 1
            kept_tokens = newest - row.prompt_len + 2
            if row.sampling and row.error is None and kept_tokens % row.config.every == 0:
                slot = step.capture(end - 1)
                if slot is not None:
                    self.capturing.append((row, slot, index))

    def after_forward(self, step: LayerStep) -> None:
        table = self.table
        for row, slot, _ in self.capturing:
            row.hidden = table.captured[-2, slot].clone()
            row.query = table.captured_query[slot].clone()

    def after_logits(self, logits: torch.Tensor) -> None:
        """Keep each capture's logits row; the step's later calls (prompt logprobs) find no
        capture left."""
        if logits.shape[0] == self.runner.input_batch.num_reqs:  # one row per request
            vocab = self.tail.lm_head.shape[0]
            for row, _, index in self.capturing:
                row.logits = logits[index, :vocab].float().clone()
        self.capturing = []

    def _update(self, index: int, row: VReasonRow, length: int) -> None:
        """One controller update for the request in batch row `index`, whose cache holds
        positions [0, length)."""
        attention = self.table.query_source
        cache = attention.kv_cache
        blocks_count, kv_heads, block_size, doubled = cache.shape
        head_dim = doubled // 2
        halves = cache.view(blocks_count, kv_heads, 2, block_size * head_dim)
        keys_view = halves[:, :, 0].view(blocks_count, kv_heads, head_dim, block_size)
        values_view = halves[:, :, 1].view(blocks_count, kv_heads, block_size, head_dim)
        block_table = self.runner.input_batch.block_table[0]
        blocks = torch.from_numpy(
            block_table.block_table.np[index, : block_table.num_blocks_per_row[index]].copy()
        ).long()
        positions = torch.arange(length)
        block_of, offset = blocks[positions // block_size], positions % block_size
        keys = keys_view[block_of, :, :, offset]
        values = values_view[block_of, :, offset, :]
        tuned = torch.arange(row.prompt_len if row.config.positions is Positions.PROMPT
                             else length)
        alpha = row.phase.alpha
        update = tune_values(self.tail, row.query.view(-1, head_dim), row.hidden, keys, values,
                             tuned, attention.impl.scale, alpha, row.config.steps, row.config.lr,
                             row.logits)
        values_view[block_of[tuned], :, offset[tuned], :] = update.values.to(cache.dtype)
        row.updates.append({"token": length - row.prompt_len, "alpha": alpha,
                            "ema": row.phase.ema, "entropy_before": update.entropy_before,
                            "entropy_after": update.entropy_after,
                            "delta_norm": update.delta_norm})

    def take(self, key: str) -> dict | None:
        """The V-Reason report of request `key` (its updates and entropy peak); forgets it."""
        row = self.processor.reports.pop(key, None)
        if row is None:
            return None
        report = {"updates": row.updates, "peak_token": row.phase.peak_token,
                  "peak_ema": row.phase.peak if row.phase.ema is not None else None}
        if row.error is not None:
            report["error"] = row.error
        return report
