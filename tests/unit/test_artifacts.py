"""The vector store: validation, atomic writes, restart, corrupt files."""

import math

import pytest
import torch

from steering.artifacts import ArtifactError, ArtifactNotFound, VectorStore


def store(tmp_path):
    return VectorStore(tmp_path, model="m", hidden_size=4, num_layers=3)


def test_put_get_list_delete_and_restart(tmp_path):
    s = store(tmp_path)
    meta = s.put("explore", [1.0, 2.0, 2.0, 0.0], 1, method="east", description="d")
    assert meta.norm == pytest.approx(3.0) and meta.model == "m" and meta.layer == 1
    again = store(tmp_path)  # a restart sees every vector
    values, meta2 = again.get("explore")
    assert values.tolist() == [1.0, 2.0, 2.0, 0.0] and meta2 == meta
    assert [m.name for m in again.list()] == ["explore"]
    again.delete("explore")
    with pytest.raises(ArtifactNotFound):
        again.get("explore")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "a..b", "sp ace"])
def test_names_with_path_characters_are_rejected(tmp_path, name):
    with pytest.raises(ArtifactError) as info:
        store(tmp_path).put(name, [0.0] * 4, 0)
    assert info.value.param == "name"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("values,layer,model,param", [
    ([0.0] * 3, 0, None, "values"),
    ([[0.0] * 4], 0, None, "values"),
    ([0.0, math.nan, 0.0, 0.0], 0, None, "values"),
    ([0.0, math.inf, 0.0, 0.0], 0, None, "values"),
    ([0.0] * 4, 3, None, "layer"),
    ([0.0] * 4, -1, None, "layer"),
    ([0.0] * 4, 0, "other-model", "model"),
])
def test_bad_vectors_are_rejected_and_nothing_is_written(tmp_path, values, layer, model, param):
    with pytest.raises(ArtifactError) as info:
        store(tmp_path).put("v", values, layer, model=model)
    assert info.value.param == param
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_foreign_files_are_skipped_at_start(tmp_path, caplog):
    s = store(tmp_path)
    s.put("good", [0.0, 1.0, 0.0, 0.0], 0)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00garbage")
    VectorStore(tmp_path, model="other", hidden_size=4, num_layers=3).put("foreign", [0.0] * 4, 0)
    reloaded = store(tmp_path)
    assert [m.name for m in reloaded.list()] == ["good"]
    assert "broken.safetensors" in caplog.text and "foreign" in caplog.text


def test_overwrite_is_atomic_replace(tmp_path):
    s = store(tmp_path)
    s.put("v", [1.0, 0.0, 0.0, 0.0], 0)
    s.put("v", [0.0, 0.0, 0.0, 1.0], 2)
    values, meta = store(tmp_path).get("v")
    assert values.tolist() == [0.0, 0.0, 0.0, 1.0] and meta.layer == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]
    assert torch.equal(values, s.get("v")[0])


def test_bundled_artifacts_are_seeded_once(tmp_path):
    from server.default_model import BUNDLED_PROBES, BUNDLED_VECTORS, seed_bundled_artifacts
    from steering.artifacts import ProbeStore

    model = "SmolLM2-135M-Instruct"
    vectors = VectorStore(tmp_path / "v", model=model, hidden_size=576, num_layers=30)
    probes = ProbeStore(tmp_path / "p", model=model, hidden_size=576)
    seed_bundled_artifacts(vectors, probes)
    assert {m.name for m in vectors.list()} == set(BUNDLED_VECTORS)
    assert {m.name for m in probes.list()} == set(BUNDLED_PROBES)
    vectors.delete("explore")
    probes.delete("default")
    seed_bundled_artifacts(vectors, probes)  # the user's deletions stand
    assert vectors.list() == [] and probes.list() == []
