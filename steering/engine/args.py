"""vLLM engine arguments with this project's defaults (for `steer serve` and for `steer bench`'s
plain-vLLM baseline, which must run the same engine settings)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_VECTOR_SLOTS = 8  # stored vectors resident in the steerable layers at once
CAPTURE_ROWS = 8  # choices capturing hidden states at once (the engine keeps to it)
# On the CPU backend vLLM sizes the KV cache from --gpu-memory-utilization of a NUMA node's
# memory, which fails on small or shared hosts; a fixed size is the predictable default.
CPU_DEFAULT_KV_CACHE_BYTES = 2 << 30
# vLLM-CPU's default KV block is 128 tokens, longer than most prompts, so the prefix cache rarely
# hits; 32 (the CPU kernels' granularity) lets particle steps and DiffAdapt reuse their prefixes
# and measured no slower for plain sampling (docs/benchmarks.md).
CPU_DEFAULT_BLOCK_SIZE = 32


def check_model(model: str) -> None:
    """Raise ValueError unless `model` is a local folder or reads as a Hugging Face Hub id
    (org/name), which vLLM fetches itself, as `vllm serve` does."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).is_dir():
        return
    try:  # refuses what reads as a path: '/...', './...', '~/...', 'a/b/c'
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(f"--model {model}: neither a local folder nor a Hugging Face Hub id "
                         "(org/name)") from None


def build_engine_args(args: argparse.Namespace):
    """vLLM engine arguments from the command line (`args.model` a local folder or a Hugging
    Face Hub id), with this project's defaults filled in; raises ValueError on what cannot be
    served."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    check_model(args.model)
    if args.dtype is None:
        # CPUs without native bf16 decode float32 about 4x faster; the bundled model is float32.
        args.dtype = "float32" if current_platform.is_cpu() else "auto"
    if (current_platform.is_cpu() and args.kv_cache_memory_bytes is None
            and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    if current_platform.is_cpu() and args.block_size is None:
        args.block_size = CPU_DEFAULT_BLOCK_SIZE
    workers = (args.data_parallel_size or 1) * (args.tensor_parallel_size or 1) * (
        args.pipeline_parallel_size or 1)
    if current_platform.is_cpu() and workers > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(workers)
    return AsyncEngineArgs.from_cli_args(args)


def cpu_thread_binding(workers: int) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for `workers` CPU workers on this host (data x tensor x
    pipeline parallel): the cores this process may use, split evenly ("0-3|4-7"). vLLM's
    default binds one worker per NUMA node, which refuses tensor parallelism on a one-node host
    and pins every data-parallel engine to the same cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise ValueError(f"{workers} CPU workers need at least {workers} cores; this process "
                         f"may use {len(cores)} (set VLLM_CPU_OMP_THREADS_BIND to override)")
    share = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(workers))
