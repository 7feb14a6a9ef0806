"""Check that what a push reuses from its parent version is still in the store.

A push takes the chunk references of unchanged files, and segments equal to the parent's,
from the parent version without reading or uploading them again. If the store has lost one
of those objects (deleted by hand, a bucket restored from an older copy, a broken replica),
the new version would point at it too, and every later version after it. `ReuseCheck`
HEADs each pack that reused references name, once, in the background while the walk goes
on, and each of the parent's manifest objects (its segments and its list); a pack shorter
than the references need (`pack.least_sizes`: a copy cut short) counts as lost. The push
then heals what is missing (see `push`): files whose chunks were in a lost pack are read again,
and a lost manifest object is uploaded again from the local cache, where it was verified
against its digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from datamover.aio import gather_or_cancel
from datamover.chunking.pack import pack_key, whole_size
from datamover.domain.manifest import ChunkRef, Entry
from datamover.repo.layout import manifest_key
from datamover.repo.repository import Repository

_BATCH = 256  # objects HEADed by one background task (the repository bounds concurrency)
_IN_FLIGHT = 4  # batches of packs checked at once; the walk waits (`flush`) for a free one
_WINDOW = 1 << 16  # packs remembered as checked; an older one seen again is checked again


def pack_ends(entries: Iterable[Entry]) -> dict[bytes, int]:
    """The furthest end of a chunk of `entries` in each pack they use."""
    ends: dict[bytes, int] = {}
    for entry in entries:
        for c in entry.chunks:
            end = c.offset + c.stored_length
            if ends.get(c.pack, -1) < end:
                ends[c.pack] = end
    return ends


class ReuseCheck:
    """HEADs reused packs and manifest objects in the background; `missing` waits for the
    answers.

    Memory is bounded: the sizes of checked packs are remembered in a window of the last
    `_WINDOW` (references in a manifest follow the path order the packs were filled in, so
    a pack seen again after that many others is rare, and checking it twice costs one more
    HEAD), and at most `_IN_FLIGHT` batches are being checked: the walk of a no-op push
    outruns the HEADs, and a task per pack of the whole dataset waiting for its turn cost
    ~1.7 KB a pack. The first store error is raised by the next `flush` or by `missing`.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._sizes: dict[bytes, int] = {}  # the window of checked packs; -1: none stored
        self._need: dict[bytes, int] = {}  # packs batched or being checked: least size
        self._batch: list[bytes] = []
        self._slots = asyncio.Semaphore(_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost_packs: set[bytes] = set()
        self._lost_manifests: set[bytes] = set()
        self._error: BaseException | None = None

    def manifests(self, digests: Sequence[bytes]) -> None:
        """Check the manifest objects `digests` (the parent's list and segments: a push that
        reproduces one does not upload it again)."""
        if digests:
            self._start(self._check(list(digests), manifest_key))

    def chunks(self, chunks: Sequence[ChunkRef]) -> None:
        """Check the packs of `chunks` (an unchanged file's reused references); `flush` when
        `full`."""
        self._packs((c.pack, c.offset + c.stored_length) for c in chunks)

    def entries(self, entries: Iterable[Entry]) -> None:
        """`chunks` of every entry of `entries` (a segment's, taken whole), each pack once."""
        self._packs(pack_ends(entries).items())

    def ends(self, ends: Iterable[tuple[bytes, int]]) -> None:
        """Check each pack of `ends` holds at least the chunk ending furthest in it (a
        segment's, taken whole without its entries: `scan.Unchanged.ends`)."""
        self._packs(ends)

    def _packs(self, ends: Iterable[tuple[bytes, int]]) -> None:
        """Check each pack of `ends` holds at least what ends there (a chunk's end; a pack
        may come more than once)."""
        for pack, end in ends:
            least = whole_size(end)
            size = self._sizes.get(pack)
            if size is not None:
                if size < least:
                    self._lost_packs.add(pack)
                continue
            need = self._need.get(pack)
            if need is None:
                self._batch.append(pack)
            if need is None or least > need:
                self._need[pack] = least

    def full(self) -> bool:
        """True when a batch of packs is ready for `flush`."""
        return len(self._batch) >= _BATCH

    async def flush(self) -> None:
        """Start checking the packs passed so far, once a batch slot is free; raise the
        first error a check met."""
        self._raise()
        if self._batch:
            batch, self._batch = self._batch, []
            await self._slots.acquire()
            self._start(self._check_packs(batch))

    async def missing(self) -> tuple[set[bytes], set[bytes]]:
        """`(packs, manifest objects)` the store lacks, of all those passed so far. Store
        errors other than a missing object are raised."""
        await self.flush()
        while self._tasks and self._error is None:
            await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_EXCEPTION)
        self._raise()
        return set(self._lost_packs), set(self._lost_manifests)

    async def cancel(self) -> None:
        """Stop the checks still running (the push failed, or is done with them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._error is None:
            self._error = task.exception()

    async def _check(self, digests: list[bytes], key: Callable[[bytes], str]) -> None:
        for i in range(0, len(digests), _BATCH):
            part = digests[i : i + _BATCH]
            found = await gather_or_cancel([self.repo.stored(key(d)) for d in part])
            self._lost_manifests.update(d for d, ok in zip(part, found, strict=True) if not ok)

    async def _check_packs(self, packs: list[bytes]) -> None:
        try:
            for i in range(0, len(packs), _BATCH):  # one file's chunks may span many packs
                part = packs[i : i + _BATCH]
                sizes = await gather_or_cancel([self.repo.stored_size(pack_key(p)) for p in part])
                for pack, size in zip(part, sizes, strict=True):
                    if size is None or size < self._need.pop(pack):
                        self._lost_packs.add(pack)
                    self._sizes[pack] = -1 if size is None else size
                    if len(self._sizes) > _WINDOW:
                        del self._sizes[next(iter(self._sizes))]
        finally:
            self._slots.release()
