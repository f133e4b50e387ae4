"""`steer` command line: serve, models, bench, vectors, probe, chat, complete."""

from __future__ import annotations

import argparse
import os
import sys

COMMANDS = {
    "serve": "serve the OpenAI-compatible API (default model: the bundled SmolLM2-135M-Instruct; "
    "--model takes a local folder or a Hugging Face Hub id)",
    "models": "list, or fetch and convert, the models beyond the bundled one (the "
    "experiments' second model)",
    "bench": "plain vLLM vs entropy-steer: throughput and TTFT ratios in one run",
    "vectors": "list, show, upload, delete or compute steering vectors on a running server",
    "probe": "label questions, train DiffAdapt difficulty probes, manage them on a server",
    "chat": "send one chat message to a running server (streams the answer)",
    "complete": "send one completion prompt to a running server (streams the answer)",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        # Only `serve` may need the Hugging Face Hub (for a Hub id; it keeps the bundled model
        # and local folders offline itself, in `server.cli.resolve_model`). `bench` runs local
        # folders, `models` fetches with pip and the rest talk to a running server: none of
        # them should reach the Hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(
        prog="steer", description="entropy-steer: an OpenAI-compatible vLLM server with "
        "entropy steering. `steer COMMAND --help` for each command.")
    parser.add_argument("command", choices=COMMANDS, help="; ".join(
        f"{name}: {text}" for name, text in COMMANDS.items()))
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv[:1])  # prints usage / help and exits
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from server.cli import main as serve_main

        return serve_main(rest)
    if command == "models":
        from clients.cli.models import main as models_main

        return models_main(rest)
    if command == "bench":
        from clients.bench.serve import main as bench_main

        return bench_main(rest)
    if command in ("chat", "complete"):
        from clients.cli.generate import main as generate_main

        return generate_main(command, rest)
    if command == "probe":
        from clients.cli.probes import main as probe_main

        return probe_main(rest)
    from clients.cli.vectors import main as vectors_main

    return vectors_main(rest)
