"""`ThrottledStore`: a bandwidth budget per direction, as a Store wrapping a Store.

Each direction (puts, gets) has its own pacer. A transfer of `n` bytes reserves `n / rate`
seconds on the pacer's timeline and waits until its slot starts, so over any stretch longer
than one request the bytes moved stay within `rate` per second, however many requests run
concurrently. Listings, heads and deletes carry no payload and are not paced.
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
        """Wait for the turn of a transfer of `nbytes`."""
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)


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
        """`inner.get`, after waiting for download budget (paid after, if length is unknown)."""
        if self._down is not None and length is not None:
            await self._down.take(length)
        data = await self.inner.get(key, offset, length)
        if self._down is not None and length is None:
            await self._down.take(len(data))
        return data

    async def head(self, key: str) -> ObjectInfo:
        """`inner.head`."""
        return await self.inner.head(key)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """`inner.list`."""
        async for info in self.inner.list(prefix):
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
