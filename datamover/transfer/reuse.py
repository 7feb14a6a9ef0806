"""Check that what a push reuses from its parent version is still in the store.

A push takes the chunk references of unchanged files, and segments equal to the parent's,
from the parent version without reading or uploading them again. If the store has lost one
of those objects (deleted by hand, a bucket restored from an older copy, a broken replica),
the new version would point at it too, and every later version after it. `ReuseCheck`
HEADs each pack that reused references name, once, in the background while the walk goes
on, and each parent segment; the push then heals what is missing (see `push`): files whose
chunks were in a lost pack are read again, and a lost segment is uploaded again from the
local cache, where it was verified against its digest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from datamover.chunking.pack import pack_key
from datamover.domain.manifest import ChunkRef
from datamover.repo.layout import manifest_key
from datamover.repo.manifest import SegmentRef
from datamover.repo.repository import Repository

_BATCH = 256  # objects HEADed by one background task (the repository bounds concurrency)
_WINDOW = 1 << 16  # packs remembered as checked; an older one seen again is checked again


class ReuseCheck:
    """HEADs reused packs and segments in the background; `missing` waits for the answers.

    Memory is bounded: packs are remembered in a window of the last `_WINDOW` (references
    in a manifest follow the path order the packs were filled in, so a pack seen again
    after that many others is rare, and checking it twice costs one more HEAD).
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._recent: dict[bytes, None] = {}
        self._batch: list[bytes] = []
        self._packs: list[asyncio.Task[set[bytes]]] = []
        self._segments: list[asyncio.Task[set[bytes]]] = []

    def segments(self, refs: Sequence[SegmentRef]) -> None:
        """Check the segments `refs` (the parent's: a push that reproduces one does not
        upload it again)."""
        if refs:
            digests = [r.digest for r in refs]
            self._segments.append(asyncio.create_task(self._missing(digests, manifest_key)))

    def chunks(self, chunks: Sequence[ChunkRef]) -> None:
        """Check the packs of `chunks` (an unchanged file's reused references)."""
        for c in chunks:
            pack = c.pack
            if pack in self._recent:
                continue
            self._recent[pack] = None
            if len(self._recent) > _WINDOW:
                del self._recent[next(iter(self._recent))]
            self._batch.append(pack)
            if len(self._batch) >= _BATCH:
                self._flush()

    async def missing(self) -> tuple[set[bytes], set[bytes]]:
        """`(packs, segments)` the store lacks, of all those passed so far. Store errors
        other than a missing object are raised."""
        self._flush()
        packs = await asyncio.gather(*self._packs)
        segments = await asyncio.gather(*self._segments)
        self._packs, self._segments = [], []
        return set().union(*packs), set().union(*segments)

    async def cancel(self) -> None:
        """Stop the checks still running (the push failed)."""
        tasks = [*self._packs, *self._segments]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._packs, self._segments = [], []

    def _flush(self) -> None:
        if self._batch:
            batch, self._batch = self._batch, []
            self._packs.append(asyncio.create_task(self._missing(batch, pack_key)))

    async def _missing(self, digests: list[bytes], key: Callable[[bytes], str]) -> set[bytes]:
        missing: set[bytes] = set()
        for i in range(0, len(digests), _BATCH):
            part = digests[i : i + _BATCH]
            found = await asyncio.gather(*(self.repo.stored(key(d)) for d in part))
            missing.update(d for d, ok in zip(part, found, strict=True) if not ok)
        return missing
