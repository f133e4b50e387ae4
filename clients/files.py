"""Results written whole or not at all: every file the clients write (results tables, plots,
JSON lines) goes through a temporary file beside it, renamed over it once written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write, renamed over `path` once written: readers see
    the whole file or the old one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_text_atomic(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text)


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure saved whole or not at all, in the format its name's suffix says."""
    with _replacing(path) as tmp:
        figure.savefig(tmp, dpi=120, format=Path(path).suffix[1:])


def write_jsonl(records, path: Path) -> None:
    write_text_atomic(path, "".join(
        json.dumps(r if isinstance(r, dict) else asdict(r)) + "\n" for r in records))
