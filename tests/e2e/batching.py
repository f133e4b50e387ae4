"""Requests run alone, then all together in shared engine steps: what batching claims are
checked with. Together they must really share steps (vLLM's running-request gauge is watched
while they run), and each outcome must equal its solo run."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from clients.bench.loadtest import engine_running
from tests.conftest import API_KEY

FLOAT_TOLERANCE = 2e-3  # batched float32 GEMMs against one-row ones, in nats and state units


async def completion(client: httpx.AsyncClient, body: dict) -> dict:
    """A choice's tokens, text and whole report."""
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return {k: choice[k] for k in ("token_ids", "text", "steering")}


def solo_and_together(server, bodies: list[dict]) -> tuple[list[dict], list[dict], float]:
    """Each body's outcome alone, then all at once; and how many ran at once at the peak."""

    async def scenario():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            solo = [await completion(client, body) for body in bodies]
            peak, done = 0.0, asyncio.Event()

            async def watch():
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, await engine_running(client))
                    await asyncio.sleep(0.05)

            watcher = asyncio.create_task(watch())
            together = await asyncio.gather(*(completion(client, body) for body in bodies))
            done.set()
            await watcher
            return solo, together, peak

    return asyncio.run(scenario())


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
