"""A writer killed at random moments while it replaces an artifact leaves the old or the new
complete artifact, never a broken one; its temporary files are not loaded and are removed at
the next start."""

import multiprocessing
import random
import time

from steering.artifacts import TEMP_GLOB, VectorStore

HIDDEN, KILLS = 4096, 30


def store(root) -> VectorStore:
    return VectorStore(root, model="m", hidden_size=HIDDEN, num_layers=2)


def write_forever(root, first: int, started) -> None:
    """Version k of vector 'v': every value k, description k; then k + 1, ..."""
    s, version = store(root), first
    while True:
        s.put("v", [float(version)] * HIDDEN, version % 2, description=str(version))
        started.set()
        version += 1


def test_kill_during_writes_leaves_old_or_new_artifact(tmp_path):
    # forkserver: a fresh child per kill costs a fork, not a torch import
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["steering.artifacts", __name__])
    rng, last, killed_mid_write = random.Random(0), -1, 0
    for _ in range(KILLS):
        started = context.Event()
        writer = context.Process(target=write_forever, args=(tmp_path, last + 1, started))
        writer.start()
        assert started.wait(60), "the writer never finished a write"
        time.sleep(rng.uniform(0, 0.05))
        writer.kill()
        writer.join()
        killed_mid_write += bool(list(tmp_path.glob(TEMP_GLOB)))
        values, meta = store(tmp_path).get("v")  # loads, and removes the temporary files
        version = int(meta.description)
        assert version > last  # at least the write that set `started` is there
        assert values.tolist() == [float(version)] * HIDDEN and meta.layer == version % 2
        assert list(tmp_path.glob(TEMP_GLOB)) == []
        assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]
        last = version
    assert killed_mid_write > 0, "no kill landed inside a write; the test proved nothing"
