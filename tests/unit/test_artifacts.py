"""The vector store: validation, atomic writes, restart, corrupt files."""

import json
import math
import time

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
    from server.default_model import BUNDLED, seed_artifacts, shipped_artifacts
    from steering.artifacts import ProbeStore

    model = "SmolLM2-135M-Instruct"
    vectors = VectorStore(tmp_path / "v", model=model, hidden_size=576, num_layers=30)
    probes = ProbeStore(tmp_path / "p", model=model, hidden_size=576)
    shipped = shipped_artifacts(BUNDLED)
    seed_artifacts(vectors, probes, BUNDLED)
    assert {m.name for m in vectors.list()} == set(shipped["vectors"]) == {"explore"}
    assert {m.name for m in probes.list()} == set(shipped["probes"]) == {"default", "paper"}
    vectors.delete("explore")
    for name in shipped["probes"]:
        probes.delete(name)
    seed_artifacts(vectors, probes, BUNDLED)  # the user's deletions stand
    assert vectors.list() == [] and probes.list() == []


def test_a_store_seeded_by_an_earlier_release_gets_only_the_new_names(tmp_path):
    """An empty marker (as earlier releases wrote it) stands for the first release's names;
    a name shipped later is installed once, and the marker then lists every name."""
    from server.default_model import BUNDLED, FIRST_BUNDLED, seed_artifacts, shipped_artifacts
    from steering.artifacts import ProbeStore

    model = "SmolLM2-135M-Instruct"
    vectors = VectorStore(tmp_path / "v", model=model, hidden_size=576, num_layers=30)
    probes = ProbeStore(tmp_path / "p", model=model, hidden_size=576)
    for root in (vectors.root, probes.root):
        (root / ".bundled").touch()
    shipped = shipped_artifacts(BUNDLED)
    later = {name: {**spec, "file": str(BUNDLED / spec["file"])}
             for name, spec in {**shipped["probes"], "later": shipped["probes"]["default"]}.items()}
    release = tmp_path / "release"
    release.mkdir()
    (release / "artifacts.json").write_text(json.dumps({"probes": later}))
    seed_artifacts(vectors, probes, release)
    added = sorted(set(later) - FIRST_BUNDLED)
    assert "later" in added and "default" not in added
    assert vectors.list() == [] and [m.name for m in probes.list()] == added
    assert (probes.root / ".bundled").read_text().split() == sorted(later)
    for name in added:
        probes.delete(name)
    seed_artifacts(vectors, probes, release)
    assert probes.list() == []
    assert not list(probes.root.glob(".bundled.tmp"))


def test_replicas_on_one_folder_see_each_others_writes(tmp_path):
    """Two servers' stores on one folder: an upload, a re-upload and a delete on one are what
    the other serves at its next read, with no restart."""
    a, b = store(tmp_path), store(tmp_path)
    assert b.list() == []
    first = a.put("shared", [1.0, 0.0, 0.0, 0.0], 0)
    values, meta = b.get("shared")
    assert values.tolist() == [1.0, 0.0, 0.0, 0.0] and meta == first
    second = a.put("shared", [0.0, 2.0, 0.0, 0.0], 2)
    values, meta = b.get("shared")
    assert values.tolist() == [0.0, 2.0, 0.0, 0.0] and meta == second
    assert meta.created > first.created  # what the engine's vector slots key on
    assert [m.name for m in b.list()] == ["shared"]
    a.delete("shared")
    with pytest.raises(ArtifactNotFound):
        b.get("shared")
    assert b.list() == []
    b.put("back", [0.0] * 4, 1)
    assert [m.name for m in a.list()] == ["back"]
    a.delete("back")
    with pytest.raises(ArtifactNotFound):  # deleted by the other replica meanwhile
        b.delete("back")


def test_a_reader_never_sees_a_half_written_vector(tmp_path):
    """While one replica re-uploads a vector over and over, another reads it: every read is
    one whole version."""
    import threading

    writer, reader = store(tmp_path), store(tmp_path)
    writer.put("v", [1.0] * 4, 0)
    stop = threading.Event()

    def rewrite():
        version = 0
        while not stop.is_set():
            version += 1
            writer.put("v", [float(version)] * 4, version % 3)

    thread = threading.Thread(target=rewrite)
    thread.start()
    try:
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 20:  # until the reads have overlapped many rewrites
            assert time.monotonic() < deadline, f"only versions {seen} were read"
            values, meta = reader.get("v")
            assert len(set(values.tolist())) == 1  # one version's values, whole
            assert meta.layer == int(values[0]) % 3 or values[0] == 1.0  # and its own metadata
            seen.add(float(values[0]))
    finally:
        stop.set()
        thread.join()


def test_a_name_outside_the_folder_is_not_found(tmp_path):
    (tmp_path.parent / "outside.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactNotFound):
        store(tmp_path).get("../outside")
