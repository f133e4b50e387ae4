"""Named steering artifacts on disk: one safetensors file each, metadata in its header.

One file per artifact makes every write a single atomic step (write a temporary file, fsync,
rename, fsync the folder): a reader or a restart sees the old artifact or the new one, never a
mixture. Files that fail to load at start are reported and skipped.
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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("entropy_steer.artifacts")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIX = ".safetensors"


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


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ArtifactError(
            "names are 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit",
            "name")
    return name


def atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class VectorStore:
    """Steering vectors for one model (name, hidden size and layer count fixed at creation)."""

    def __init__(self, root: Path, model: str, hidden_size: int, num_layers: int) -> None:
        self.root = Path(root)
        self.model, self.hidden_size, self.num_layers = model, hidden_size, num_layers
        self.root.mkdir(parents=True, exist_ok=True)
        self._vectors: dict[str, tuple[torch.Tensor, VectorMeta]] = {}
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            try:
                vector, meta = self._read(path)
                self._check(meta.name, vector, meta.layer, meta.model)
            except Exception as exc:  # corrupt or foreign files must not stop the server
                logger.warning("skipping steering vector %s: %s", path.name, exc)
                continue
            self._vectors[meta.name] = (vector, meta)

    def list(self) -> list[VectorMeta]:
        return [meta for _, meta in sorted(self._vectors.values(), key=lambda v: v[1].name)]

    def get(self, name: str) -> tuple[torch.Tensor, VectorMeta]:
        try:
            return self._vectors[name]
        except KeyError:
            raise ArtifactNotFound(name) from None

    def put(self, name: str, values, layer: int, *, method: str = "uploaded", source: str = "",
            description: str = "", model: str | None = None) -> VectorMeta:
        vector = torch.as_tensor(values, dtype=torch.float32).detach().clone()
        self._check(name, vector, layer, model if model is not None else self.model)
        meta = VectorMeta(name=name, model=self.model, layer=int(layer),
                          hidden_size=self.hidden_size, method=method, source=source,
                          description=description, created=time.time(),
                          norm=float(vector.norm()))
        atomic_save({"vector": vector.contiguous()}, {"meta": json.dumps(asdict(meta))},
                    self.root / f"{name}{SUFFIX}")
        self._vectors[name] = (vector, meta)
        return meta

    def delete(self, name: str) -> None:
        self.get(name)
        (self.root / f"{name}{SUFFIX}").unlink()
        del self._vectors[name]

    def _check(self, name: str, vector: torch.Tensor, layer, model: str) -> None:
        check_name(name)
        if model != self.model:
            raise ArtifactError(f"the vector is for model '{model}', this server serves "
                                f"'{self.model}'", "model")
        if vector.dim() != 1 or vector.numel() != self.hidden_size:
            raise ArtifactError(f"the vector must have {self.hidden_size} values (the model's "
                                f"hidden size), got shape {list(vector.shape)}", "values")
        if not bool(torch.isfinite(vector).all()):
            raise ArtifactError("the vector has NaN or infinite values", "values")
        if isinstance(layer, bool) or not isinstance(layer, int) or not (
                0 <= layer < self.num_layers):
            raise ArtifactError(f"layer must be an integer in [0, {self.num_layers})", "layer")

    @staticmethod
    def _read(path: Path) -> tuple[torch.Tensor, VectorMeta]:
        with safe_open(path, framework="pt") as f:
            meta = VectorMeta(**json.loads((f.metadata() or {})["meta"]))
            vector = f.get_tensor("vector").float()
        if path.name != f"{meta.name}{SUFFIX}":
            raise ArtifactError(f"file name does not match the vector's name '{meta.name}'")
        if not math.isfinite(meta.norm):
            raise ArtifactError("bad metadata")
        return vector, meta
