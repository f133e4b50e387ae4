"""Named steering artifacts on disk (steering vectors, difficulty probes): one safetensors file
each, metadata in its header.

One file per artifact makes every write a single atomic step (write a temporary file, fsync,
rename, fsync the folder): a reader or a restart sees the old artifact or the new one, never a
mixture. Files that fail to load are reported and skipped; temporary files left by a write that
was killed are removed at start.

Several servers may share one folder (replicas on a `ReadWriteMany` volume): every read checks
the file's identity (inode, modification time, size; one `stat`) against the copy in memory and
reloads it when another process has replaced it, forgets it when it was deleted, and a listing
scans the folder. So an upload, re-upload or delete on one replica is what the others serve from
their next request on, with no restart and no polling.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save

from steering.methods.diffadapt.core import CLASSES, DifficultyProbe, Recipe

logger = logging.getLogger("entropy_steer.artifacts")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"
TEMP_GLOB = f".*{SUFFIX}.*.tmp"  # atomic_save's temporary files


class ArtifactError(ValueError):
    """A rejected artifact; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ArtifactNotFound(KeyError):
    pass


@dataclass(frozen=True)
class VectorMeta:
    name: str
    model: str
    layer: int
    hidden_size: int
    method: str
    source: str
    description: str
    created: float
    norm: float


@dataclass(frozen=True)
class ProbeMeta:
    name: str
    model: str
    hidden_size: int
    width: int  # 0: a linear head
    classes: list[str]
    thresholds: dict  # the labelling thresholds {alpha, beta, gamma} it was trained on
    metrics: dict  # held-out accuracy and baselines, sizes
    source: str
    description: str
    created: float
    recipe: str = Recipe.VARIANT.value  # files written before recipes existed are the variant's


def is_valid_name(name: object) -> bool:
    """A name that is a file in the folder, never a path outside it."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None and ".." not in name


def check_name(name: str) -> str:
    if not is_valid_name(name):
        raise ArtifactError(
            "names are 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit",
            "name")
    return name


def _fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` survive a power cut."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


FileIdentity = tuple[int, int, int]  # inode, modification time (ns), size


def _identity(path: Path) -> FileIdentity | None:
    """What changes when a file is replaced (an atomic rename gives it a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Serialised in memory and written through our own temporary file (safetensors'
    `save_file` would add a temporary file of its own, which a kill would leave behind)."""
    data = save(tensors, metadata=metadata)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def write_artifact(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """An artifact file: the tensors, and `meta` as JSON under the header key "meta"."""
    atomic_save({k: v.contiguous() for k, v in tensors.items()}, {"meta": json.dumps(meta)},
                Path(path))


def read_artifact(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the metadata of an artifact file."""
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, json.loads(
            (f.metadata() or {})["meta"])


Payload = TypeVar("Payload")
Meta = TypeVar("Meta")


class _Store(Generic[Payload, Meta]):
    """Artifacts of one kind for one model: the folder, loading (skipping bad files), listing,
    atomic replacement and deletion. Subclasses say how a payload is checked and stored."""

    kind = "artifact"
    meta_class: type

    def __init__(self, root: Path, model: str, hidden_size: int) -> None:
        self.root = Path(root)
        self.model, self.hidden_size = model, hidden_size
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TEMP_GLOB):
            logger.warning("removing %s, left by an interrupted write", stale.name)
            stale.unlink(missing_ok=True)
        # name -> (payload, meta, the file's identity when it was read)
        self._items: dict[str, tuple[Payload, Meta, FileIdentity]] = {}
        self._skipped: dict[str, FileIdentity] = {}  # files that failed to load, until changed
        self.list()

    def list(self) -> list[Meta]:
        """Every artifact in the folder now (files another process added, replaced or removed
        included)."""
        names = {p.name[:-len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}")}
        for name in set(self._items) - names:
            del self._items[name]
        found = (self._current(name) for name in sorted(names))
        return sorted((item[1] for item in found if item is not None), key=lambda m: m.name)

    def get(self, name: str) -> tuple[Payload, Meta]:
        item = self._current(name)
        if item is None:
            raise ArtifactNotFound(name)
        return item[0], item[1]

    def delete(self, name: str) -> None:
        self.get(name)
        try:
            self._path(name).unlink()
        except FileNotFoundError:  # another replica deleted it first: gone either way
            pass
        _fsync_dir(self.root)
        self._items.pop(name, None)

    def _path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def _current(self, name: str) -> tuple[Payload, Meta, FileIdentity] | None:
        """The artifact as its file is now: the copy in memory if the file is unchanged, else
        read again; None when there is no such file (or it does not load)."""
        if not is_valid_name(name):
            return None
        path = self._path(name)
        identity = _identity(path)
        cached = self._items.get(name)
        if identity is None:
            self._items.pop(name, None)
            return None
        if cached is not None and cached[2] == identity:
            return cached
        if self._skipped.get(name) == identity:
            return None
        try:
            payload, meta = self._read(path)
            self._check(payload, meta)
        except FileNotFoundError:  # deleted between the stat and the read
            self._items.pop(name, None)
            return None
        except Exception as exc:  # corrupt or foreign files must not stop the server
            logger.warning("skipping %s %s: %s", self.kind, path.name, exc)
            self._items.pop(name, None)
            self._skipped[name] = identity
            return None
        self._skipped.pop(name, None)
        self._items[name] = item = (payload, meta, identity)
        return item

    def _store(self, payload: Payload, meta: Meta, tensors: dict[str, torch.Tensor]) -> Meta:
        self._check(payload, meta)
        path = self._path(meta.name)
        write_artifact(path, tensors, asdict(meta))
        self._items[meta.name] = (payload, meta, _identity(path))
        return meta

    def _check(self, payload: Payload, meta: Meta) -> None:
        check_name(meta.name)
        if meta.model != self.model:
            raise ArtifactError(f"the {self.kind} is for model '{meta.model}', this server "
                                f"serves '{self.model}'", "model")

    def _read(self, path: Path) -> tuple[Payload, Meta]:
        tensors, raw = read_artifact(path)
        meta = self.meta_class(**raw)
        if path.name != f"{meta.name}{SUFFIX}":
            raise ArtifactError(f"file name does not match the {self.kind}'s name '{meta.name}'")
        return self._payload(tensors, meta), meta

    def _payload(self, tensors: dict[str, torch.Tensor], meta: Meta) -> Payload:
        raise NotImplementedError


class VectorStore(_Store[torch.Tensor, VectorMeta]):
    """Steering vectors (one residual-stream direction each, tied to a layer)."""

    kind = "steering vector"
    meta_class = VectorMeta

    def __init__(self, root: Path, model: str, hidden_size: int, num_layers: int) -> None:
        self.num_layers = num_layers
        super().__init__(root, model, hidden_size)

    def put(self, name: str, values, layer: int, *, method: str = "uploaded", source: str = "",
            description: str = "", model: str | None = None) -> VectorMeta:
        vector = torch.as_tensor(values, dtype=torch.float32).detach().clone()
        meta = VectorMeta(name=check_name(name), model=self.model if model is None else model,
                          layer=layer, hidden_size=self.hidden_size, method=method,
                          source=source, description=description, created=time.time(),
                          norm=float(vector.norm()))
        return self._store(vector, meta, {"vector": vector})

    def _check(self, vector: torch.Tensor, meta: VectorMeta) -> None:
        super()._check(vector, meta)
        if vector.dim() != 1 or vector.numel() != self.hidden_size:
            raise ArtifactError(f"the vector must have {self.hidden_size} values (the model's "
                                f"hidden size), got shape {list(vector.shape)}", "values")
        if not bool(torch.isfinite(vector).all()) or not math.isfinite(meta.norm):
            raise ArtifactError("the vector has NaN or infinite values", "values")
        layer = meta.layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not (
                0 <= layer < self.num_layers):
            raise ArtifactError(f"layer must be an integer in [0, {self.num_layers})", "layer")

    def _payload(self, tensors, meta):
        return tensors["vector"].float()


class ProbeStore(_Store[DifficultyProbe, ProbeMeta]):
    """DiffAdapt difficulty probes (weights plus the thresholds and metrics they came with)."""

    kind = "probe"
    meta_class = ProbeMeta

    def put(self, name: str, tensors: dict[str, torch.Tensor], *, thresholds: dict,
            metrics: dict | None = None, source: str = "", description: str = "",
            model: str | None = None, recipe: str = Recipe.VARIANT.value) -> ProbeMeta:
        try:
            probe = DifficultyProbe.from_tensors(tensors)
        except ValueError as exc:
            raise ArtifactError(str(exc), "weights") from None
        meta = ProbeMeta(name=check_name(name), model=self.model if model is None else model,
                         hidden_size=probe.hidden_size, width=probe.width, classes=list(CLASSES),
                         thresholds=dict(thresholds), metrics=dict(metrics or {}),
                         source=source, description=description, created=time.time(),
                         recipe=recipe)
        return self._store(probe, meta, probe.tensors())

    def _check(self, probe: DifficultyProbe, meta: ProbeMeta) -> None:
        super()._check(probe, meta)
        if probe.hidden_size != self.hidden_size:
            raise ArtifactError(f"the probe reads {probe.hidden_size}-dimensional hidden states; "
                                f"this model's hidden size is {self.hidden_size}", "weights")
        if tuple(meta.classes) != CLASSES:
            raise ArtifactError(f"a probe's classes are {list(CLASSES)}", "classes")
        values = meta.thresholds
        if set(values) != {"alpha", "beta", "gamma"} or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()):
            raise ArtifactError("thresholds must be finite numbers alpha, beta and gamma",
                                "thresholds")
        if meta.recipe not in {r.value for r in Recipe}:
            raise ArtifactError(f"a probe's recipe is one of {[r.value for r in Recipe]}",
                                "recipe")

    def _payload(self, tensors, meta):
        return DifficultyProbe.from_tensors(tensors)
