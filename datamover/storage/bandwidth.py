"""`ThrottledStore`: a bandwidth budget per direction, as a Store wrapping a Store.

Each direction (puts, gets) has its own pacer. A transfer of `n` bytes reserves `n / rate`
seconds on the pacer's timeline and waits until its slot starts, so over any stretch longer
than one request the bytes moved stay within `rate` per second, however many requests run
concurrently. Listings, heads and deletes carry no payload and are not paced.

A reservation that moves no bytes is given back: a call cancelled while it waits for its turn
(a transfer cancelled or drained with many GETs queued here), the part of a range past the
object's end, a GET that failed. Otherwise the pacer's timeline would hold turns nobody
takes, and every later call, of any transfer sharing the store, would wait them out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from datamover.errors import InvalidInput
from datamover.storage.base import ObjectInfo, Store


class Pacer:
    """Spaces out byte counts so their sum grows at most `rate` bytes per second."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise InvalidInput(f"bandwidth limit must be positive, not {rate}")
        self.rate = rate
        self._next = 0.0

    async def take(self, nbytes: int) -> None:
        """Wait for the turn of a transfer of `nbytes`; cancelled, it gives its turn back."""
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            try:
                await asyncio.sleep(start - now)
            except asyncio.CancelledError:
                self.refund(nbytes)
                raise

    def refund(self, nbytes: int) -> None:
        """Give back the time of `nbytes` that were reserved but not moved. Calls already
        waiting keep their turns; later ones start that much earlier (the average stays
        within the rate: the unused turn passed idle)."""
        if nbytes > 0:
            self._next = max(time.monotonic(), self._next - nbytes / self.rate)


class ThrottledStore:
    """Paces `put` and `get` of `inner` to `upload`/`download` bytes per second (0: no limit)."""

    def __init__(self, inner: Store, upload: float = 0, download: float = 0) -> None:
        self.inner = inner
        self._up = Pacer(upload) if upload > 0 else None
        self._down = Pacer(download) if download > 0 else None

    @property
    def description(self) -> str:
        """The wrapped store's description."""
        return self.inner.description

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """`inner.put`, after waiting for upload budget."""
        if self._up is not None:
            await self._up.take(len(data))
        await self.inner.put(key, data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """`inner.get`, after waiting for download budget (paid after, if length is unknown).
        What did not arrive (a range cut at the object's end, a failed GET) is refunded."""
        down = self._down
        if down is None:
            return await self.inner.get(key, offset, length)
        if length is None:
            data = await self.inner.get(key, offset, length)
            await down.take(len(data))
            return data
        await down.take(length)
        try:
            data = await self.inner.get(key, offset, length)
        except Exception:
            down.refund(length)
            raise
        down.refund(length - len(data))
        return data

    async def head(self, key: str) -> ObjectInfo:
        """`inner.head`."""
        return await self.inner.head(key)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """`inner.list`."""
        async for info in self.inner.list(prefix, start_after):
            yield info

    async def delete(self, key: str) -> None:
        """`inner.delete`."""
        await self.inner.delete(key)

    async def check(self) -> None:
        """`inner.check`."""
        await self.inner.check()

    async def close(self) -> None:
        """`inner.close`."""
        await self.inner.close()
