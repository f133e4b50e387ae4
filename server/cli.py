"""`steer serve`: the server's command line (its options, every method's, and every vLLM
engine argument)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from steering.engine.args import DEFAULT_VECTOR_SLOTS

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def serve_parser():
    """`steer serve`: our options plus every vLLM engine argument."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from steering.methods.registry import METHODS

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
    parser.add_argument("--vector-slots", type=int, default=DEFAULT_VECTOR_SLOTS,
                        help="steering vectors resident in the engine at once")
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
    for method in METHODS:
        method.add_arguments(parser.add_argument_group(f"steering.{method.name}"))
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


def frontend_options(args: argparse.Namespace, bundled: bool):
    """The OpenAI layer's options; the bundled model gets a chat template with tools and the
    parser that reads its tool calls, unless the command line says otherwise."""
    from server.default_model import BUNDLED_CHAT_TEMPLATE
    from server.serving import FrontendOptions

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
    from server.default_model import DEFAULT_MODEL_NAME, cache_dir, ensure_default_model
    from steering.engine.args import build_engine_args
    from steering.engine.engine import Engine
    from steering.methods.registry import METHODS

    if getattr(args, "model_path", None):
        args.model = args.model_path
    bundled = args.model is None
    if bundled:
        args.model = str(ensure_default_model())
        args.served_model_name = args.served_model_name or [DEFAULT_MODEL_NAME]
    engine_args = build_engine_args(args)
    names = engine_args.served_model_name
    model_name = (names[0] if isinstance(names, list) else names) or Path(args.model).name
    artifacts = args.artifacts_dir or cache_dir() / "artifacts" / model_name.replace("/", "--")
    engine = Engine(engine_args, model_name, Path(artifacts), vector_slots=args.vector_slots)
    app = create_app(engine, api_key=args.api_key, admin_key=args.admin_key,
                     method_configs={m.name: m.configure(args) for m in METHODS},
                     frontend=frontend_options(args, bundled), strict_fields=args.strict_fields,
                     max_queued_requests=args.max_queued_requests, playground=not args.no_ui,
                     bundled_model=bundled)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=30)


def main(argv: list[str] | None = None) -> None:
    """`steer serve ARGS`: a configuration the server cannot run with exits with its reason."""
    args = serve_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO)
    try:
        serve(args)
    except ValueError as exc:
        raise SystemExit(f"steer serve: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
