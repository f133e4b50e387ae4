"""What the experiments share: the model they serve (`--model`, any model `steer serve` takes),
the server they start for it, bounded concurrency for their requests, the order of paired
rounds, the command line their results record, and their plotting library."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from clients.bench.local_server import LocalServer, steer_server


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=os.environ.get("STEER_MODEL"),
                        help="what `steer serve --model` takes: a folder, a model `steer models "
                        "fetch` brought, a Hub id (default: the bundled model; env STEER_MODEL)")


def pyplot():
    """matplotlib's pyplot, drawing off-screen. An experiment also calls it before it starts, so
    that a missing `docs` extra stops it at once rather than at the plot after an hour's run."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the experiments draw their plots with matplotlib, which the `docs` "
                         "extra installs: pip install -e '.[docs]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_recorded(parser: argparse.ArgumentParser,
                   argv: list[str] | None = None) -> argparse.Namespace:
    """`parser`'s arguments, with `command_line`: the command that ran the experiment, quoted
    so that it can be pasted (the parser's prog is `python -m <module>`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = f"{parser.prog} {shlex.join(argv)}"
    return args


def paired_order(items: Sequence, round_: int) -> list:
    """`items` in the order paired round `round_` runs them: as given in even rounds, reversed
    in odd ones, so that no side always runs first on a shared, noisy machine."""
    return list(items) if round_ % 2 == 0 else list(items)[::-1]


def experiment_server(args: argparse.Namespace, *extra: str,
                      log: Path | None = None) -> LocalServer:
    """`steer serve` on the experiment's model (compiled mode, artifacts beside the log)."""
    log = log or Path(tempfile.mkdtemp(prefix="steer-experiment-")) / "server.log"
    model = ("--model", args.model) if getattr(args, "model", None) else ()
    return steer_server(log, *model, *extra)


async def gather_bounded(work: list, limit: int) -> list:
    """The results of the coroutines `work`, at most `limit` running at once."""
    gate = asyncio.Semaphore(limit)

    async def bounded(coroutine):
        async with gate:
            return await coroutine

    return await asyncio.gather(*(bounded(w) for w in work))


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (the API process and the engine's)."""
    import psutil

    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (root, *root.children(recursive=True))) / 2**20
