"""Replicas on one artifacts folder: what another replica writes there (with the same atomic
store a server uses) is what the session's server serves, within 2 seconds and with no restart,
resident engine slots included. The two-server version of this runs in `make test-scale`."""

import pytest
import torch

from steering.artifacts import ProbeStore, VectorStore
from tests.replicas import PROMPT, served_within, steered_tokens

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def replica(server, http):
    """The folder's other writer: a store like the one another replica's server holds."""
    card = http.get("/v1/models").json()["data"][0]
    folder = server.log_path.parent / "artifacts"
    return (VectorStore(folder / "vectors", MODEL, card["hidden_size"], card["num_layers"]),
            ProbeStore(folder / "probes", MODEL, card["hidden_size"]))


def test_vector_upload_reupload_and_delete_by_another_replica(http, replica):
    vectors, _ = replica
    explore = http.get("/v1/steering/vectors/explore", params={"include_values": True}).json()
    values = torch.tensor(explore["values"])
    vectors.put("from-replica", values, explore["layer"], method="east")
    listed = served_within(http, "/v1/steering/vectors/from-replica", 200).json()
    assert listed["norm"] == pytest.approx(explore["norm"])
    assert steered_tokens(http, "from-replica", 4.0) == steered_tokens(http, "explore", 4.0)

    # Re-uploaded with the opposite sign: the engine's resident slot must not keep the old one.
    vectors.put("from-replica", -values, explore["layer"], method="east")
    served_within(http, "/v1/steering/vectors/from-replica", 200)
    flipped = steered_tokens(http, "from-replica", 4.0)
    assert flipped == steered_tokens(http, "explore", -4.0)
    assert flipped != steered_tokens(http, "explore", 4.0)

    vectors.delete("from-replica")
    served_within(http, "/v1/steering/vectors/from-replica", 404)
    assert "from-replica" not in {v["id"] for v in http.get("/v1/steering/vectors").json()["data"]}
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "steering": {
        "east": {"vector": "from-replica"}}})
    assert r.status_code == 404, r.text


def test_uploads_over_http_reach_the_other_replicas_store(admin_http, replica):
    vectors, _ = replica
    r = admin_http.post("/v1/steering/vectors", json={
        "name": "from-http", "values": [0.5] * vectors.hidden_size, "layer": 3})
    assert r.status_code == 201, r.text
    values, meta = vectors.get("from-http")
    assert values.tolist() == [0.5] * vectors.hidden_size and meta.layer == 3
    assert admin_http.delete("/v1/steering/vectors/from-http").status_code in (200, 204)
    assert "from-http" not in {m.name for m in vectors.list()}


def test_a_probe_another_replica_writes_is_served(http, replica):
    _, probes = replica
    source, meta = probes.get("default")
    probes.put("replica-probe", source.tensors(), thresholds=meta.thresholds,
               metrics=meta.metrics, source="copied by the test")
    served = served_within(http, "/v1/steering/probes/replica-probe", 200).json()
    assert served["thresholds"] == meta.thresholds
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8,
        "steering": {"diffadapt": {"probe": "replica-probe"}}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["steering"]["diffadapt"]["probe"] == "replica-probe"
    probes.delete("replica-probe")
    served_within(http, "/v1/steering/probes/replica-probe", 404)
