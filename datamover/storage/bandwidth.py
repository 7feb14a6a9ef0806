"""`ThrottledStore`: a bandwidth budget per direction, as a Store wrapping a Store.

Each direction (puts, gets) has its own pacer, whose timeline holds the calls that went: a
transfer of `n` bytes books `n / rate` seconds on it when its turn comes, and its turn comes
when the time booked before it has passed. Calls wait in line, first come first served,
booking nothing until they go. Listings, heads and deletes carry no payload and are not
paced.

A put's size is known: it books all of it before it is sent. A GET's length is often only a
bound (a version document of a few hundred bytes is read with room for 1 MiB + 1, to see an
oversized one), so a GET books at most `UPFRONT_GET` of it before it is sent and pays for
what arrived beyond that once it is answered. So over time the bytes moved average at most
`rate` per second, however many requests run concurrently, but a GET may run ahead of the
budget by its size past `UPFRONT_GET` (so may each GET running with it): the calls after it
wait for those bytes.

Time booked and not used is given back, and the calls in line go that much earlier: the part
of a GET's booking that did not arrive (a small document, a range cut at the object's end, a
GET that failed or was cancelled while it ran). A call cancelled while it waits for its
turn (a transfer cancelled or drained with many GETs queued here) leaves the line having
booked nothing. Otherwise the timeline would hold turns nobody takes, and every later call,
of any transfer sharing the store, would wait them out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator

from datamover.errors import InvalidInput
from datamover.storage.base import HOLD, ByteSink, Counted, ObjectInfo, Store, get_into

# What a GET books before it is sent, at most. A GET's length may be a bound far above the
# object (a version document: 1 MiB + 1 asked, a few hundred bytes there); booked whole,
# each such read would hold the line for 1 MiB / rate. Booking nothing would let concurrent
# GETs of packs all go at once. At 256 KiB a document holds the line for at most 0.25 s at
# 1 MiB/s, and only until its answer gives the rest back; a larger GET runs ahead of the
# budget by the difference, which the calls after it wait out.
UPFRONT_GET = 256 * 1024


class Pacer:
    """Spaces out byte counts so their sum grows at most `rate` bytes per second."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise InvalidInput(f"bandwidth limit must be positive, not {rate}")
        self.rate = rate
        self._next = 0.0  # the time booked by the calls that went ends here
        self._line: deque[asyncio.Event] = deque()  # the calls waiting, the next one first

    async def take(self, nbytes: int) -> None:
        """Wait for the turn of a transfer of `nbytes`, then book its time. Cancelled while
        it waits, it leaves the line having booked nothing."""
        arrived = time.monotonic()
        if self._line or self._next > arrived:
            turn = asyncio.Event()
            self._line.append(turn)
            try:
                await self._wait_for_turn(turn)
            except BaseException:
                self._line.remove(turn)
                self._wake()
                raise
            self._line.popleft()
        self._next = max(self._next, arrived) + nbytes / self.rate
        self._wake()

    async def _wait_for_turn(self, turn: asyncio.Event) -> None:
        # Woken when the call ahead goes or leaves and when time is given back: the wait is
        # then measured again.
        while True:
            turn.clear()
            if self._line[0] is not turn:
                await turn.wait()
                continue
            delay = self._next - time.monotonic()
            if delay <= 0:
                return
            # Not `wait_for`: on Python 3.11 it returns normally when the wait ends in the
            # step the task is cancelled in, and the cancel is lost.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await turn.wait()

    async def pay(self, nbytes: int) -> None:
        """Book `nbytes` already moved, ahead of the calls in line (those bytes came), and
        wait until their time starts. Cancelled meanwhile, the booking stays."""
        now = time.monotonic()
        start = max(now, self._next)
        self._next = start + nbytes / self.rate
        if start > now:
            await asyncio.sleep(start - now)

    def book(self, nbytes: int) -> None:
        """Book `nbytes` already moved, ahead of the calls in line, without waiting (a call
        that failed or was cancelled pays what came on its way out)."""
        if nbytes > 0:
            self._next = max(time.monotonic(), self._next) + nbytes / self.rate

    def refund(self, nbytes: int) -> None:
        """Give back the time of `nbytes` that were booked but not moved: the calls in line
        go that much earlier (the average stays within the rate: the unused time passed
        idle)."""
        if nbytes > 0:
            self._next = max(time.monotonic(), self._next - nbytes / self.rate)
            self._wake()

    def _wake(self) -> None:
        if self._line:
            self._line[0].set()


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
        """`inner.get`, after waiting for download budget for up to `UPFRONT_GET` bytes of
        `length`; the bytes that arrived beyond that are paid after (all of them if `length`
        is None), what was booked and did not arrive (a range cut at the object's end, a
        failed or cancelled GET) is given back."""
        down = self._down
        if down is None:
            return await self.inner.get(key, offset, length)
        booked = 0 if length is None else min(length, UPFRONT_GET)
        await down.take(booked)
        try:
            data = await self.inner.get(key, offset, length)
        except BaseException:  # failed or cancelled: nothing to pay for
            down.refund(booked)
            raise
        if len(data) > booked:
            await down.pay(len(data) - booked)
        else:
            down.refund(booked - len(data))
        return data

    async def get_into(
        self, key: str, offset: int, length: int, sink: ByteSink, hold: int = HOLD
    ) -> int:
        """`base.get_into` of `inner`, in pieces of at most `hold` bytes each paced as a
        `get` of it (a stream runs ahead of the budget by at most what a GET held whole
        does). Of a piece that fails, the bytes the sink took are paid (a retry resumes
        after them and never fetches them again) and the rest of its booking given back."""
        down = self._down
        if down is None:
            return await get_into(self.inner, key, offset, length, sink, hold)
        counted = Counted(sink)
        got = 0
        while got < length:
            want = min(hold, length - got)
            booked = min(want, UPFRONT_GET)
            await down.take(booked)
            before = counted.n
            try:
                came = await get_into(self.inner, key, offset + got, want, counted, hold)
            except BaseException:
                taken = counted.n - before
                if taken > booked:
                    down.book(taken - booked)
                else:
                    down.refund(booked - taken)
                raise
            if came > booked:
                await down.pay(came - booked)
            else:
                down.refund(booked - came)
            got += came
            if came < want:  # the object ends
                break
        return got

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
