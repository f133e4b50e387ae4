"""Two servers on one artifacts folder, as replicas on a ReadWriteMany volume would be: what one
is sent is served by the other within 2 seconds, with no restart. (`make test-scale`: two
engines on this machine take several minutes to start, too long for `make test`.)"""

from __future__ import annotations

import time

import pytest
import torch

from clients.bench.local_server import steer_server
from tests.replicas import SHARED_WITHIN_S, served_within, steered_tokens
from tests.scale.conftest import ADMIN_KEY, client

pytestmark = pytest.mark.scale


@pytest.fixture(scope="module")
def replicas(folder, single):
    """The reference server and a second one on its artifacts folder (folder / "artifacts")."""
    second = steer_server(folder / "second.log", admin_key=ADMIN_KEY)
    with client(second) as http:
        yield single, http
    second.stop()


def test_vectors_uploaded_reuploaded_and_deleted_on_one_replica(replicas):
    one, two = replicas
    explore = one.get("/v1/steering/vectors/explore", params={"include_values": True}).json()
    values = torch.tensor(explore["values"])

    def upload(client, sign):
        r = client.post("/v1/steering/vectors", json={
            "name": "shared", "values": (sign * values).tolist(), "layer": explore["layer"]})
        assert r.status_code == 201, r.text

    upload(one, 1)
    served_within(two, "/v1/steering/vectors/shared", 200)
    first = steered_tokens(two, "shared")
    assert first == steered_tokens(one, "shared") == steered_tokens(one, "explore")

    upload(two, -1)  # both engines now hold the old values in a slot
    start = time.monotonic()
    while one.get("/v1/steering/vectors/shared",
                  params={"include_values": True}).json()["values"][0] != -values[0].item():
        assert time.monotonic() - start < SHARED_WITHIN_S
        time.sleep(0.05)
    flipped = steered_tokens(one, "shared")
    assert flipped == steered_tokens(two, "shared") != first

    assert one.delete("/v1/steering/vectors/shared").status_code in (200, 204)
    served_within(two, "/v1/steering/vectors/shared", 404)


def test_probes_uploaded_on_one_replica_are_served_by_the_other(replicas):
    one, two = replicas
    probe = one.get("/v1/steering/probes/default", params={"include_weights": True})
    assert probe.status_code == 200, probe.text
    body = probe.json()
    r = two.post("/v1/steering/probes", json={
        "name": "copied", "weights": body["weights"], "thresholds": body["thresholds"]})
    assert r.status_code == 201, r.text
    served_within(one, "/v1/steering/probes/copied", 200)
    assert one.delete("/v1/steering/probes/copied").status_code in (200, 204)
    served_within(two, "/v1/steering/probes/copied", 404)
