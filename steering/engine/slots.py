"""The engine's steering-vector slots: which stored vector is resident in which row of the
steerable layers' vector table."""

from __future__ import annotations

import asyncio
import time

import torch

from steering.errors import EngineBusy


class VectorSlots:
    """Which stored vector sits in which slot of the engine's steering table.

    A slot in use by a running request is never reassigned; otherwise the least recently used
    slot is refilled (one `collective_rpc` to every worker) when a request needs a vector that
    is not resident. Keys include the vector's creation time, so a re-uploaded vector of the
    same name gets fresh values.
    """

    def __init__(self, llm, count: int) -> None:
        self._llm = llm
        self._count = count
        self._key_of: dict[int, tuple[str, float]] = {}
        self._slot_of: dict[tuple[str, float], int] = {}
        self._users = [0] * count
        self._last_used = [0.0] * count
        self._lock = asyncio.Lock()

    async def acquire(self, vectors: list[tuple[str, float, torch.Tensor]]) -> list[int]:
        async with self._lock:
            slots = []
            try:
                for name, created, values in vectors:
                    key = (name, created)
                    slot = self._slot_of.get(key)
                    if slot is None:
                        free = [i for i in range(self._count)
                                if self._users[i] == 0 and i not in slots]
                        if not free:
                            raise EngineBusy(f"all {self._count} steering-vector slots are in "
                                             "use by running requests; retry shortly")
                        slot = min(free, key=lambda i: self._last_used[i])
                        old = self._key_of.pop(slot, None)
                        if old is not None:
                            del self._slot_of[old]
                        await self._llm.collective_rpc("steer_set_vector",
                                                       args=(slot, values.tolist()))
                        self._key_of[slot], self._slot_of[key] = key, slot
                    self._users[slot] += 1
                    self._last_used[slot] = time.monotonic()
                    slots.append(slot)
            except BaseException:  # busy, or the request was cancelled mid-load
                self.release(slots)
                raise
            return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self._users[slot] -= 1
