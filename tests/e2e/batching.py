"""Requests run alone, then all together in shared engine steps: what batching claims are
checked with. Together they must really share a step, and each outcome must equal its solo run."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import API_KEY
from tests.prometheus import metric

FLOAT_TOLERANCE = 2e-3  # batched float32 GEMMs against one-row ones, in nats and state units
ENGINE_STEPS = "vllm:iteration_tokens_total_count"  # one observation per engine step with output


async def completion(client: httpx.AsyncClient, body: dict) -> dict:
    """A choice's tokens, text and whole report."""
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {k: choice[k] for k in ("token_ids", "text", "steering")}


async def engine_steps(client: httpx.AsyncClient) -> float:
    return metric((await client.get("/metrics")).text, ENGINE_STEPS)


def solo_and_together(server, bodies: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each body's outcome alone, then all at once, asserting that all of them were in one
    engine step together.

    The proof counts steps, a counter the requests cannot take back (sampling a running gauge
    can miss a short batch). A request of L tokens is in the batch for L consecutive steps, one
    token each; if the together run took S steps and S < L1 + L2 for the two shortest, every
    two requests' spans overlap, and spans on a line that overlap pairwise share a step."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            solo = [await completion(client, body) for body in bodies]
            before = await engine_steps(client)
            together = await asyncio.gather(*(completion(client, body) for body in bodies))
            return solo, together, await engine_steps(client) - before

    solo, together, steps = asyncio.run(scenario())
    shortest = sorted(len(outcome["token_ids"]) for outcome in together)[:2]
    assert steps < sum(shortest), (f"{len(bodies)} requests of at least {shortest[0]} tokens "
                                   f"took {steps:.0f} engine steps: not all in one batch")
    return solo, together


def same(a, b, path: str = "") -> list[str]:
    """Where two outcomes differ: integers and strings exactly, floats within tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, abs=FLOAT_TOLERANCE, rel=1e-3) else \
            [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
