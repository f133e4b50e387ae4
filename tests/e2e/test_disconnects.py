"""Clients that vanish mid-request, for the kinds of request test_metrics and test_particles do
not cover: the engine stops their work, and the engine resources they held (steering-vector
slots, hidden-state capture rows) are free again."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.prometheus import metric

LONG = {"max_tokens": 1500, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]
SLOTS = CAPTURE_ROWS = 8  # the server's defaults (--vector-slots; capture rows)


def engine_idle(http) -> bool:
    text = http.get("/metrics").text
    return (metric(text, "vllm:num_requests_running") == 0
            and metric(text, "vllm:num_requests_waiting") == 0)


def leave(server, http, path: str, body: dict) -> None:
    """Start the request, wait until the engine runs it, and go away: a stream after its
    first chunks, a plain request by closing the connection."""
    url = f"{server.base_url}{path}"
    if body.get("stream"):
        with httpx.stream("POST", url, json=body, headers=http.headers, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for i, _ in enumerate(r.iter_lines()):
                if i > 4:
                    break
        return
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=http.headers, timeout=4)


def wait_idle(http, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not engine_idle(http) and time.monotonic() < deadline:
        time.sleep(0.5)
    return engine_idle(http)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "typical_p": 0.9, **LONG,
                              "steering": {"east": {"vector": "explore", "scale": 2.0},
                                           "return_entropy": True}}),
    ("/v1/chat/completions", {"messages": CHAT, **LONG,
                              "steering": {"particles": {"n": 4, "step_delimiter": "@@@@"}}}),
    ("/v1/chat/completions", {"messages": CHAT, **LONG,
                              "steering": {"diffadapt": {"probe": "default"}}}),
    ("/v1/completions", {"prompt": "Once upon a time", "stream": True, **LONG,
                         "steering": {"return_hidden_states": [3, "final"]}}),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, **LONG,
                              "steering": {"vreason": {"every": 1, "steps": 2}}}),
], ids=["stream-east-typical", "particles", "diffadapt", "stream-hidden-states",
        "stream-vreason"])
def test_leaving_client_stops_engine_work(server, http, path, body):
    leave(server, http, path, body)
    assert wait_idle(http)


def _vectors(admin_http, prefix: str, count: int) -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    for i, name in enumerate(names):
        r = admin_http.post("/v1/steering/vectors", json={
            "name": name, "values": [float(i + 1)] + [0.0] * 575, "layer": 5})
        assert r.status_code == 201, r.text
    return names


def hold_together(server, http, bodies: list[dict]) -> list[dict]:
    """One stream per body, all at once: each waits for its first event, then for everyone
    else's, so every request holds its engine resources at the same moment; then all leave.
    A request that cannot get its resources never sends an event (its client times out) or
    sends an error event."""
    barrier = threading.Barrier(len(bodies), timeout=60)

    def one(body: dict) -> dict:
        with httpx.stream("POST", f"{server.base_url}/v1/completions", headers=http.headers,
                          json={**body, "stream": True, **LONG}, timeout=60) as r:
            lines = r.iter_lines()  # kept until the barrier: a dropped one closes the stream
            line = next(line for line in lines if line.startswith("data: "))
            barrier.wait()
            return json.loads(line[6:])

    with ThreadPoolExecutor(len(bodies)) as pool:
        firsts = list(pool.map(one, bodies))
    assert wait_idle(http)
    return firsts


def test_left_requests_give_back_their_vector_slots(server, http, admin_http):
    """Requests that together need every slot at once all start only if the abandoned
    requests' slots were released."""
    east = [{"vector": name, "scale": 0.5} for name in _vectors(admin_http, "gone", 4)]
    leave(server, http, "/v1/completions", {"prompt": "Hi", "stream": True, **LONG,
                                             "steering": {"east": east}})
    leave(server, http, "/v1/completions", {"prompt": "Hi", **LONG, "steering": {"east": east}})
    assert wait_idle(http)
    fresh = _vectors(admin_http, "fresh", SLOTS)
    firsts = hold_together(server, http, [
        {"prompt": "Hi", "steering": {"east": [{"vector": n, "scale": 0.5} for n in names]}}
        for names in (fresh[:4], fresh[4:])])
    assert all("error" not in first and first["choices"] for first in firsts), firsts


def test_left_requests_give_back_their_capture_rows(server, http):
    """As many hidden-state requests as the engine has capture rows, all at once."""
    body = {"prompt": "Hi", "steering": {"return_hidden_states": [1]}}
    leave(server, http, "/v1/completions", {**body, "stream": True, **LONG})
    leave(server, http, "/v1/completions", {**body, **LONG})
    assert wait_idle(http)
    firsts = hold_together(server, http, [body] * CAPTURE_ROWS)
    assert all("error" not in first and first["choices"] for first in firsts), firsts
