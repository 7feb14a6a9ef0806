"""The bandwidth budget and the POSIX store against what their callers and neighbours do: GETs
asked with room to spare, and a store directory someone else can write to."""

from __future__ import annotations

import asyncio
import time

from datamover.storage.bandwidth import ThrottledStore
from datamover.storage.memory import MemoryStore

MiB = 1 << 20


class _SlowStore(MemoryStore):
    """A MemoryStore whose GETs take a store's round trip."""

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await asyncio.sleep(0.005)
        return await super().get(key, offset, length)


class _ClockedStore(MemoryStore):
    """A MemoryStore noting when each GET's bytes left it."""

    def __init__(self) -> None:
        super().__init__()
        self.served: list[float] = []

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await super().get(key, offset, length)
        self.served.append(time.monotonic())
        return data


# -- the bandwidth budget -----------------------------------------------------------------


async def test_throttled_small_gets_asked_with_room_do_not_wait_for_the_room() -> None:
    # Before: each GET booked the whole length it asked for (a version document is read with
    # room for 1 MiB + 1) before it was sent, and the calls waiting kept their turns when the
    # unused part was given back: 32 concurrent reads of 300 bytes at 1 MiB/s took 31 s.
    inner = _SlowStore()
    await inner.put("doc", bytes(300))
    store = ThrottledStore(inner, download=MiB)
    started = time.monotonic()
    reads = asyncio.gather(*(store.get("doc", 0, MiB + 1) for _ in range(32)))
    assert await asyncio.wait_for(reads, 10) == [bytes(300)] * 32
    assert time.monotonic() - started < 2


async def test_throttled_large_gets_keep_the_rate_on_average() -> None:
    # GETs past what is booked up front pay for the rest after: of 2 MiB at 1 MiB/s, the
    # first GET's 512 KiB go at once, and the last bytes cannot come before 1.5 s.
    inner = _ClockedStore()
    await inner.put("pack", bytes(MiB // 2))
    store = ThrottledStore(inner, download=MiB)
    started = time.monotonic()
    reads = asyncio.gather(*(store.get("pack", 0, MiB // 2) for _ in range(4)))
    assert await reads == [bytes(MiB // 2)] * 4
    assert 1.45 <= max(inner.served) - started < 3
