"""`steer` command line: serve, bench, vectors, probe, chat, complete."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from steering.vllm_adapter.layer_steering import DEFAULT_SLOTS

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
# On the CPU backend vLLM sizes the KV cache from --gpu-memory-utilization of a NUMA node's
# memory, which fails on small or shared hosts; a fixed size is the predictable default.
CPU_DEFAULT_KV_CACHE_BYTES = 2 << 30
# vLLM-CPU's default KV block is 128 tokens, longer than most prompts, so the prefix cache rarely
# hits; 32 (the CPU kernels' granularity) lets particle steps and DiffAdapt reuse their prefixes
# and measured no slower for plain sampling (docs/benchmarks.md).
CPU_DEFAULT_BLOCK_SIZE = 32


def bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value
    return parse


def serve_parser():
    """`steer serve`: our options plus every vLLM engine argument."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.diffadapt import DEFAULT_MAX_TOKENS
    from server.engine import DEFAULT_VREASON_MAX_STEPS
    from server.particles import DEFAULT_MAX_TOTAL_TOKENS
    from server.protocol import MAX_VREASON_STEPS

    parser = FlexibleArgumentParser(
        prog="steer serve",
        description="Serve the OpenAI-compatible API with entropy steering. Without a model, "
        "serves the bundled SmolLM2-135M-Instruct (converted once into the cache). "
        "`--model PATH` (or a positional PATH, or env STEER_MODEL) serves a local HF-format "
        "folder. Every vLLM "
        "engine argument (--dtype, --max-model-len, --tensor-parallel-size, "
        "--gpu-memory-utilization, --enforce-eager, ...) is accepted and passed to the engine.",
    )
    parser.add_argument("model_path", nargs="?", help="local HF-format model folder")
    parser.add_argument("--host", default=os.environ.get("STEER_HOST", DEFAULT_HOST))
    parser.add_argument("--port", type=int, default=int(os.environ.get("STEER_PORT", DEFAULT_PORT)))
    parser.add_argument("--api-key", default=os.environ.get("STEER_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (env STEER_API_KEY)")
    parser.add_argument("--admin-key", default=os.environ.get("STEER_ADMIN_KEY") or None,
                        help="required to upload or delete steering artifacts (env "
                        "STEER_ADMIN_KEY); also accepted as an API key")
    parser.add_argument("--artifacts-dir", type=Path,
                        default=os.environ.get("STEER_ARTIFACTS_DIR"),
                        help="where steering vectors are stored (default: "
                        "<cache>/artifacts/<served model name>)")
    parser.add_argument("--vector-slots", type=int, default=DEFAULT_SLOTS,
                        help="steering vectors resident in the engine at once")
    parser.add_argument("--diffadapt-strategies", type=Path,
                        default=os.environ.get("STEER_DIFFADAPT_STRATEGIES"),
                        help="JSON file changing DiffAdapt's strategies, e.g. {\"easy\": "
                        "{\"prompt\": \"{question} Be brief.\", \"temperature\": 0.3, "
                        "\"budget\": 0.3}} (default: the paper's temperatures and budgets)")
    parser.add_argument("--diffadapt-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="DiffAdapt's full token budget when a request sets no max_tokens "
                        "(each class gets its share)")
    parser.add_argument("--prm", type=Path, default=os.environ.get("STEER_PRM"),
                        help="a process reward model folder (a '...ForSequenceClassification' "
                        "checkpoint) served on a second engine for steering.particles reward "
                        "'prm'")
    parser.add_argument("--reward-url", default=os.environ.get("STEER_REWARD_URL"),
                        help="an HTTP reward scorer for steering.particles reward 'http' "
                        "(contract in docs/particles.md)")
    parser.add_argument("--reward-timeout", type=float, default=10.0,
                        help="seconds per reward-scorer call")
    parser.add_argument("--reward-retries", type=int, default=1,
                        help="retries after a failed reward-scorer call")
    parser.add_argument("--particles-max-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                        help="largest n × max_tokens (× 2 with look-ahead) one particle-"
                        "filter request may ask for")
    parser.add_argument("--vreason-max-steps", default=DEFAULT_VREASON_MAX_STEPS,
                        type=bounded_int(1, MAX_VREASON_STEPS),
                        help="most optimiser steps per V-Reason update a request may ask for "
                        f"(at most {MAX_VREASON_STEPS})")
    parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="no per-request access log lines")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="engine sequences that may wait beyond the running batch; past "
                        "them a generation request is a 429 with Retry-After (default: "
                        "--max-num-seqs, one more batch)")
    parser.add_argument("--no-ui", action="store_true",
                        help="do not serve the playground web page at /")
    parser.add_argument("--strict-fields", action="store_true",
                        help="answer unknown top-level request fields with a 400 (default: "
                        "ignore them, as vllm serve does, and name them in the "
                        "X-Steer-Ignored-Fields response header)")
    openai = parser.add_argument_group("OpenAI layer (as in vllm serve)")
    openai.add_argument("--chat-template", default=None,
                        help="a Jinja chat template (file or inline) instead of the model's "
                        "(the bundled model's default adds tools in the Hermes format)")
    openai.add_argument("--chat-template-content-format", default="auto",
                        choices=["auto", "string", "openai"])
    openai.add_argument("--default-chat-template-kwargs", type=json.loads, default=None,
                        help='JSON, e.g. \'{"enable_thinking": false}\'')
    openai.add_argument("--response-role", default="assistant")
    openai.add_argument("--enable-auto-tool-choice", action="store_true", default=None,
                        help="let the model decide to call tools (tool_choice 'auto'); needs "
                        "--tool-call-parser (on for the bundled model, with 'hermes')")
    openai.add_argument("--tool-call-parser", default=None,
                        help="vLLM's tool-call parser for the model's format (hermes, "
                        "llama3_json, mistral, ...)")
    openai.add_argument("--tool-strict-level", choices=["auto", "function", "parameter"],
                        default=None, help="how strictly a grammar holds tool calls: 'auto' "
                        "(vLLM's default) enforces argument schemas only for tools marked "
                        "strict; 'parameter' for every tool (the bundled model's default)")
    openai.add_argument("--return-tokens-as-token-ids", action="store_true")
    openai.add_argument("--enable-prompt-tokens-details", action="store_true")
    AsyncEngineArgs.add_cli_args(parser)
    parser.set_defaults(model=os.environ.get("STEER_MODEL"), dtype=None)
    return parser


def build_engine_args(args: argparse.Namespace):
    """vLLM engine arguments from the command line, with this project's defaults filled in."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

    if getattr(args, "model_path", None):
        args.model = args.model_path
    bundled = args.model is None
    if bundled:
        args.model = str(ensure_default_model())
        args.served_model_name = args.served_model_name or [DEFAULT_MODEL_NAME]
    elif not Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: not a local folder (no model hub is used)")
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
        raise SystemExit(f"{workers} CPU workers need at least {workers} cores; this process "
                         f"may use {len(cores)} (set VLLM_CPU_OMP_THREADS_BIND to override)")
    share = len(cores) // workers
    return "|".join(",".join(map(str, cores[i * share:(i + 1) * share])) for i in range(workers))


def reward_engine_args(path: Path, generator):
    """The reward model's engine: its own folder, the generator's dtype and context, a small KV
    cache on CPU, no stats of its own (they would clash with the generator's metrics)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    if not Path(path).is_dir():
        raise SystemExit(f"--prm {path}: not a local folder")
    args = AsyncEngineArgs(model=str(path), dtype=generator.dtype,
                           max_model_len=generator.max_model_len, disable_log_stats=True,
                           gpu_memory_utilization=0.1 if not current_platform.is_cpu()
                           else generator.gpu_memory_utilization)
    if current_platform.is_cpu():
        args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES // 4
    return args


def frontend_options(args: argparse.Namespace, bundled: bool):
    """The OpenAI layer's options; the bundled model gets a chat template with tools and the
    parser that reads its tool calls, unless the command line says otherwise."""
    from server.default_model import BUNDLED_CHAT_TEMPLATE
    from server.openai_serving import FrontendOptions

    auto_tools = args.enable_auto_tool_choice
    parser = args.tool_call_parser
    template = args.chat_template
    strict = args.tool_strict_level
    if bundled:  # a 135M model needs the grammar to keep its tool arguments to the schema
        template = template or str(BUNDLED_CHAT_TEMPLATE)
        strict = strict or "parameter"
        if auto_tools is None and parser is None:
            auto_tools, parser = True, "hermes"
    if auto_tools and not parser:
        raise SystemExit("--enable-auto-tool-choice needs --tool-call-parser")
    return FrontendOptions(
        chat_template=template,
        chat_template_content_format=args.chat_template_content_format,
        response_role=args.response_role, enable_auto_tool_choice=bool(auto_tools),
        tool_call_parser=parser, tool_strict_level=strict or "auto",
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        default_chat_template_kwargs=args.default_chat_template_kwargs)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.app import create_app
    from server.default_model import cache_dir
    from server.diffadapt import load_strategies
    from server.engine import Engine, RewardModel
    from server.particles import HttpScorer, ParticleConfig

    bundled = args.model is None and not getattr(args, "model_path", None)
    engine_args = build_engine_args(args)
    names = engine_args.served_model_name
    model_name = (names[0] if isinstance(names, list) else names) or Path(args.model).name
    artifacts = args.artifacts_dir or cache_dir() / "artifacts" / model_name.replace("/", "--")
    frontend = frontend_options(args, bundled)
    engine = Engine(engine_args, model_name, Path(artifacts), vector_slots=args.vector_slots,
                    bundled_model=bundled, vreason_max_steps=args.vreason_max_steps)
    app = create_app(engine, api_key=args.api_key, admin_key=args.admin_key,
                     strategies=load_strategies(args.diffadapt_strategies),
                     diffadapt_max_tokens=args.diffadapt_max_tokens,
                     particles=ParticleConfig(
                         prm=RewardModel(reward_engine_args(args.prm, engine_args))
                         if args.prm else None,
                         scorer=HttpScorer(args.reward_url, args.reward_timeout,
                                           args.reward_retries) if args.reward_url else None,
                         max_total_tokens=args.particles_max_tokens),
                     frontend=frontend, strict_fields=args.strict_fields,
                     max_queued_requests=args.max_queued_requests,
                     playground=not args.no_ui)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=30)


COMMANDS = {
    "serve": "serve the OpenAI-compatible API (default model: the bundled SmolLM2-135M-Instruct)",
    "bench": "plain vLLM vs entropy-steer: throughput and TTFT ratios in one run",
    "vectors": "list, show, upload, delete or compute steering vectors on a running server",
    "probe": "label questions, train DiffAdapt difficulty probes, manage them on a server",
    "chat": "send one chat message to a running server (streams the answer)",
    "complete": "send one completion prompt to a running server (streams the answer)",
}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="steer", description="entropy-steer: an OpenAI-compatible vLLM server with "
        "entropy steering. `steer COMMAND --help` for each command.")
    parser.add_argument("command", choices=COMMANDS, help="; ".join(
        f"{name}: {text}" for name, text in COMMANDS.items()))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage / help and exits
        return
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from clients.bench import main as bench_main

        return bench_main(rest)
    if command in ("chat", "complete"):
        from clients.generate_cli import main as generate_main

        return generate_main(command, rest)
    if command == "probe":
        from clients.probes import main as probe_main

        return probe_main(rest)
    if command == "vectors":
        from clients.vectors import main as vectors_main

        return vectors_main(rest)
    args = serve_parser().parse_args(rest)
    logging.basicConfig(level=logging.INFO)
    serve(args)


if __name__ == "__main__":
    sys.exit(main())
