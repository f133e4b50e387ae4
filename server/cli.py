"""`steer serve`: the server's command line (its options, every method's, and every vLLM
engine argument)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.models import CATALOG, fetched_folder
from steering.engine.args import DEFAULT_VECTOR_SLOTS, check_model

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
        "`--model MODEL` (or a positional MODEL, or env STEER_MODEL) serves a local HF-format "
        "folder, a model fetched with `steer models fetch NAME` (by NAME) or, as `vllm "
        "serve` does, a Hugging Face Hub id (org/name: vLLM fetches it into the HF cache, and "
        "it is served under that name; HF_HUB_OFFLINE=1 limits it to the cache). Every vLLM "
        "engine argument (--dtype, --max-model-len, --tensor-parallel-size, "
        "--gpu-memory-utilization, --enforce-eager, ...) is accepted and passed to the engine.",
    )
    parser.add_argument("model_path", nargs="?", metavar="MODEL",
                        help="a local HF-format model folder or a Hugging Face Hub id "
                        "(org/name); same as --model")
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
    for action in parser._actions:
        if "--model" in action.option_strings:
            action.help = ("a local HF-format model folder, a model fetched with `steer models "
                           "fetch NAME` (by NAME) or a Hugging Face Hub id (org/name, "
                           "fetched as `vllm serve` does; HF_HUB_OFFLINE=1 limits it to the "
                           "local HF cache). Default: the bundled SmolLM2-135M-Instruct (env "
                           "STEER_MODEL)")
    return parser


def resolve_model(args: argparse.Namespace) -> str | None:
    """Settle `args.model` before the engine starts; returns the model's name when the project
    knows it (the bundled model, or a model `steer models fetch` brought), else None.

    The bundled model (no model given), a fetched model (by its catalog name, served under it)
    and an existing local path need no network, so the Hub stays
    off for them (HF_HUB_OFFLINE=1 unless the environment says otherwise). Any other
    name is a Hugging Face Hub id, left for vLLM to download as `vllm serve` does (the user's
    own HF_HUB_OFFLINE=1 limits it to the cache) and served under that id, once a cheap check
    says it can be had. Raises ValueError, naming the model and the reason, when it cannot."""
    if getattr(args, "model_path", None):
        args.model = args.model_path
    if args.model is None:
        from server.default_model import DEFAULT_MODEL_NAME, ensure_default_model

        stay_offline()
        args.model = str(ensure_default_model())
        args.served_model_name = args.served_model_name or [DEFAULT_MODEL_NAME]
        return DEFAULT_MODEL_NAME
    if args.model in CATALOG:  # a model `steer models fetch` brings
        stay_offline()
        name = args.model
        args.served_model_name = args.served_model_name or [name]
        args.model = str(fetched_folder(name))
        return name
    if Path(args.model).exists():
        stay_offline()
        return None
    check_model(args.model)
    revision = getattr(args, "revision", None)
    try:
        check_hub_model(args.model, revision)
    except Exception as exc:  # every way the Hub can fail: one message
        raise ValueError(f"model {args.model!r} is not a local folder and could not be fetched "
                         f"from the Hugging Face Hub: {_hub_failure(exc, args.model, revision)}"
                         ) from exc
    args.served_model_name = args.served_model_name or [args.model]
    return None


def stay_offline() -> None:
    """Keep vLLM, transformers and huggingface_hub off the network (this process, which has
    already imported them, and the engine processes it starts), unless HF_HUB_OFFLINE is set."""
    import huggingface_hub.constants as hub

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub.HF_HUB_OFFLINE = (hub.HF_HUB_OFFLINE
                          or os.environ["HF_HUB_OFFLINE"].upper() in hub.ENV_VARS_TRUE_VALUES)


def check_hub_model(repo_id: str, revision: str | None) -> None:
    """Raise unless Hub model `repo_id` can be had: its config.json is in the HF cache, or the
    Hub lets us read it (one HEAD request, not retried: hf_hub_download would retry an
    unreachable Hub for ~20 s; offline, huggingface_hub refuses it). vLLM then downloads what
    it needs itself."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision))
    except RemoteEntryNotFoundError:
        pass  # readable, without config.json (a Mistral-format model): vLLM reads what it has


def _hub_failure(exc: BaseException, repo_id: str, revision: str | None) -> str:
    """Why Hub model `repo_id` could not be had, in one sentence."""
    import huggingface_hub.constants as hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    login = "log in with `hf auth login` or set HF_TOKEN"
    cache = f"the local Hugging Face cache ({hub.HF_HUB_CACHE}) does not have it"
    if isinstance(exc, GatedRepoError):
        return (f"it is a gated repository: accept its conditions at {hub.ENDPOINT}/{repo_id} "
                f"and {login}")
    if isinstance(exc, RevisionNotFoundError):
        return f"the repository has no revision {revision!r}"
    if isinstance(exc, RepositoryNotFoundError):
        return f"no such repository on {hub.ENDPOINT} (if it is private, {login})"
    if isinstance(exc, OfflineModeIsEnabled):
        flag = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"
        return (f"{flag}={os.environ.get(flag, '1')} is set and {cache}; unset {flag} to "
                "download it, or pass a local model folder")
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub at {hub.ENDPOINT} answered {detail}"
    if isinstance(exc, (ConnectionError, TimeoutError)) or any(
            word in type(exc).__name__ for word in ("Connect", "Timeout", "Network", "Proxy")):
        return f"the Hub at {hub.ENDPOINT} cannot be reached ({detail}) and {cache}"
    return detail


def frontend_options(args: argparse.Namespace, known: str | None):
    """The OpenAI layer's options. A model the project knows (`resolve_model`) gets the parser
    that reads its tool calls, and the bundled model also a chat template with tools, unless the
    command line says otherwise."""
    from server.default_model import BUNDLED_CHAT_TEMPLATE, DEFAULT_MODEL_NAME
    from server.serving import FrontendOptions

    auto_tools = args.enable_auto_tool_choice
    parser = args.tool_call_parser
    template = args.chat_template
    strict = args.tool_strict_level
    if known == DEFAULT_MODEL_NAME:  # a 135M model needs the grammar to keep its tool
        template = template or str(BUNDLED_CHAT_TEMPLATE)  # arguments to the schema
        strict = strict or "parameter"
    known_parser = "hermes" if known == DEFAULT_MODEL_NAME else (
        CATALOG[known].tool_call_parser if known in CATALOG else None)
    if auto_tools is None and parser is None and known_parser:
        auto_tools, parser = True, known_parser
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
    known = resolve_model(args)  # first: a model that cannot be had stops here, plainly

    import uvicorn

    from server.app import create_app
    from server.default_model import shipped_folder
    from steering.engine.args import build_engine_args
    from steering.engine.engine import Engine
    from steering.methods.registry import METHODS

    engine_args = build_engine_args(args)
    names = engine_args.served_model_name
    model_name = (names[0] if isinstance(names, list) else names) or Path(args.model).name
    engine = Engine(engine_args, model_name, artifacts_folder(args, model_name),
                    vector_slots=args.vector_slots)
    app = create_app(engine, api_key=args.api_key, admin_key=args.admin_key,
                     method_configs={m.name: m.configure(args) for m in METHODS},
                     frontend=frontend_options(args, known),
                     strict_fields=args.strict_fields,
                     max_queued_requests=args.max_queued_requests, playground=not args.no_ui,
                     seed_from=shipped_folder(known) if known else None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info",
                access_log=not args.disable_uvicorn_access_log, timeout_graceful_shutdown=30)


def artifacts_folder(args: argparse.Namespace, model_name: str) -> Path:
    """Where the steering artifacts live: --artifacts-dir, else a folder named after the served
    model name ('org/name', as a Hub id is served, becomes 'org--name')."""
    from server.models import cache_dir

    return Path(args.artifacts_dir or cache_dir() / "artifacts" / model_name.replace("/", "--"))


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
