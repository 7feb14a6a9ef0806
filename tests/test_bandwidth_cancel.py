"""A throttled GET cancelled while its request runs (a transfer cancelled or drained with
GETs in flight) gives back the time it booked, as a GET that fails does: the calls after it
do not wait out bytes that never came.

Before: only a GET that raised an `Exception` gave its booking back; a cancelled one (a
`BaseException`) left it on the timeline, and every later GET through the store, of any
transfer sharing it, waited it out.
"""

from __future__ import annotations

import asyncio
import time

from datamover.storage.bandwidth import UPFRONT_GET, ThrottledStore
from datamover.storage.memory import MemoryStore


class _HeldStore(MemoryStore):
    """A MemoryStore whose GETs of `held` wait until `release` is set, noting `started`."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key == "held":
            self.started.set()
            await self.release.wait()
        return await super().get(key, offset, length)


async def test_a_get_cancelled_in_flight_gives_back_its_booking() -> None:
    inner = _HeldStore()
    await inner.put("held", bytes(UPFRONT_GET))
    await inner.put("doc", bytes(10))
    rate = UPFRONT_GET / 4  # the held GET books 4 s up front
    store = ThrottledStore(inner, download=rate)
    held = asyncio.create_task(store.get("held", 0, UPFRONT_GET))
    await asyncio.wait_for(inner.started.wait(), 5)
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    started = time.monotonic()
    assert await store.get("doc", 0, 10) == bytes(10)
    assert time.monotonic() - started < 1  # before: about 4 s
