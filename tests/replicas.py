"""What the replica tests (tests/e2e/test_shared_artifacts.py, tests/scale/test_replicas.py)
ask of a server: an artifact's route answering within the sharing bound, and the tokens an EAST
vector steers."""

from __future__ import annotations

import time

import httpx

SHARED_WITHIN_S = 2.0
PROMPT = "My plan for the weekend:"


def served_within(http: httpx.Client, path: str, status: int) -> httpx.Response:
    """`path`'s answer once it has `status`, which must be within SHARED_WITHIN_S."""
    start = time.monotonic()
    while (response := http.get(path)).status_code != status:
        assert time.monotonic() - start < SHARED_WITHIN_S, (path, response.status_code,
                                                             response.text)
        time.sleep(0.05)
    return response


def steered_tokens(http: httpx.Client, vector: str, scale: float = 4.0) -> list[int]:
    """Greedy tokens of PROMPT with `vector` at `scale`."""
    r = http.post("/v1/completions", json={
        "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
        "steering": {"east": {"vector": vector, "scale": scale}}})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]
