"""Steering-vector slots when the request that is acquiring them goes away (a client
disconnect cancels it while it loads a vector into the engine)."""

import asyncio

import pytest
import torch

from steering.engine.slots import VectorSlots


class SlowEngine:
    """`collective_rpc` that waits until the test lets it finish."""

    def __init__(self) -> None:
        self.calls, self.go = 0, asyncio.Event()

    async def collective_rpc(self, method: str, args=()):
        self.calls += 1
        if self.calls > 1:
            await self.go.wait()


def test_cancelled_acquire_gives_back_every_slot():
    async def scenario() -> list[int]:
        engine = SlowEngine()
        slots = VectorSlots(engine, count=4)
        values = torch.zeros(2)
        task = asyncio.create_task(slots.acquire([("a", 1.0, values), ("b", 1.0, values)]))
        while engine.calls < 2:  # 'a' is loaded, 'b' is being loaded
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return slots._users

    assert asyncio.run(scenario()) == [0, 0, 0, 0]
