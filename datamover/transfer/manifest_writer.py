"""The push manifest writer: cut entries into segments, upload each after its packs.

Segments are cut where the path says so (`SegmentCuts`), not every N entries: equal trees
give equal segments, and an inserted or removed entry changes only the segment it falls in
instead of shifting every later boundary. A segment also ends by size, counted in chunk
references (`SEGMENT_CHUNKS`), so a run of large files cannot make one that no reader takes
or that the writer cannot hold. A segment whose digest the store already has (the
parent's, or one a killed run uploaded) is not uploaded again. A segment whose every entry
the scanner found equal to the previous manifest's, and whose first path, last path and
length are those of a previous segment, *is* that segment (the previous stream is sorted and
has no duplicates, so the same bounds and count over equal entries leave no room for a
difference, whatever rule cut either): its reference is reused without encoding it, which
is most of the CPU of a re-push that changed little. Each segment is recorded in the push
checkpoint, in order, as soon as it is safely stored, which is what lets a rerun skip the
files it covers.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import blake3

from datamover.domain.manifest import Entry
from datamover.repo.manifest import SegmentRef, encode_segment
from datamover.repo.repository import Repository
from datamover.transfer.packer import OpenPack, Packer, PendingChunk

OnSegment = Callable[[int, SegmentRef, bool], Awaitable[None]]  # (seq, ref, reused)

_IN_FLIGHT = 4


#: The most chunk references a segment holds, unless one entry alone has more (an entry is
#: never split). A reference is 73 to 89 bytes encoded (85 for a chunk of this writer's
#: packs) and about 300 bytes once decoded into Python objects, so a segment at the bound is
#: under 1.5 MB decoded (1/700 of `MAX_DECODED`) and ~5 MiB in memory, ~8 MiB at the peak
#: of decoding it: as much as a full segment of 8,192 one-chunk files (the default
#: `segment_entries`), which is why it is twice that. At the default chunker (1 MiB chunks
#: on average) it is ~16 GiB of files.
SEGMENT_CHUNKS = 16_384


class SegmentCuts:
    """Where a push ends a manifest segment: content-defined, like chunk boundaries.

    A segment ends after an entry whose path hashes to a cut point (BLAKE2b of the UTF-8
    path, low bits all ones: one path in about `max_entries / 4`), once the segment holds at
    least `max_entries / 4` entries or `max_chunks / 4` chunk references; it always ends
    once it holds `max_entries` entries or `max_chunks` chunk references, and it ends
    before an entry whose chunks would take it past `max_chunks`. So a segment holds at
    most `max_chunks` references unless it is one entry, which bounds the memory of a
    segment (about 5% of segments reach a bound; the mean is about half of it).

    An entry of `k` chunks weighs `w = k * max_entries / max_chunks` entries, and if `w` is
    more than 1 its path is a cut point with `w` times the probability (the low bits, read
    as a number, are less than `w` below all ones): a tree of large files is cut where its
    paths say too, about every `max_chunks / 4` references, not by the count alone, which
    would shift every later boundary when an entry is inserted. A tree whose entries have
    at most `max_chunks / max_entries` chunks each (2 at the defaults, so every tree of
    small files) reaches neither chunk bound first and is cut exactly as by the entry
    count alone.

    Only the entries' paths and chunk counts and the segment's length decide, so equal
    trees cut identically, a change of content moves a boundary only where it changes a
    file's chunk count, and an inserted or removed entry changes only its own segment (or,
    where it moves a forced or too-early cut, the next one or two, after which the cut
    points realign). Readers do not depend on this rule.
    """

    def __init__(self, max_entries: int, max_chunks: int = SEGMENT_CHUNKS) -> None:
        self.max_entries = max(1, max_entries)
        self.min_entries = max(1, self.max_entries // 4)  # also the spacing of cut points
        self.max_chunks = max(1, max_chunks)
        self.min_chunks = max(1, self.max_chunks // 4)
        self.mask = (1 << (self.min_entries.bit_length() - 1)) - 1

    def before(self, count: int, chunks: int, entry_chunks: int) -> bool:
        """True if a segment of `count` entries holding `chunks` chunk references must end
        before an entry of `entry_chunks` references: they would take it past `max_chunks`
        (an entry with more than that is then a segment by itself)."""
        return count > 0 and chunks + entry_chunks > self.max_chunks

    def after(self, count: int, chunks: int, path: str, entry_chunks: int) -> bool:
        """True if a segment of `count` entries holding `chunks` chunk references should end
        after its last entry, at `path` with `entry_chunks` of those references."""
        if count >= self.max_entries or chunks >= self.max_chunks:
            return True
        if count < self.min_entries and chunks < self.min_chunks:
            return False
        h = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        # `below`: how far the low bits are from all ones; an entry of weight `w` entries
        # is a cut point if that is under `w` (under 1 for a small entry: all ones).
        below = self.mask - (int.from_bytes(h, "little") & self.mask)
        return below == 0 or below * self.max_chunks < entry_chunks * self.max_entries


def _resolve(entries: list[Entry]) -> list[Entry]:
    for e in entries:
        if e.chunks and any(isinstance(c, PendingChunk) for c in e.chunks):
            e.chunks = tuple(c.resolve() if isinstance(c, PendingChunk) else c for c in e.chunks)
    return entries


class ManifestWriter:
    """Collects entries (whose chunks may still be pending) into uploaded segments.

    `known`: digests of segments the store has. `reusable`: segments whose entries are, over
    their whole path range, exactly what the scanner compared the walk with (the caller
    must not pass a segment that only partly fed that stream).
    """

    def __init__(
        self,
        repo: Repository,
        packer: Packer,
        segment_entries: int,
        known: set[bytes],
        reusable: list[SegmentRef],
        on_segment: OnSegment,
    ) -> None:
        self.repo = repo
        self.packer = packer
        self.cuts = SegmentCuts(segment_entries, SEGMENT_CHUNKS)
        self.known = known
        self._reusable = {(r.first_path, r.last_path, r.entries): r for r in reusable}
        self.on_segment = on_segment
        self.uploaded_bytes = 0
        self.reused = 0
        self._entries: list[Entry] = []
        self._chunks = 0  # chunk references in `_entries`
        self._same = True
        self._packs: set[OpenPack] = set()
        self._refs: list[SegmentRef] = []
        self._last: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # The open (unsealed) pack a segment in flight waits for; there is one open pack.
        self._awaited: OpenPack | None = None
        # Segments cut but not yet recorded (waiting for packs or being encoded): each holds
        # at most `segment_entries` entries and `SEGMENT_CHUNKS` chunk references, or one
        # entry: at the defaults at most ~5 MiB, ~10 MiB while it is encoded.
        self._inflight = asyncio.Semaphore(_IN_FLIGHT)

    async def append(self, entry: Entry, same: bool = False) -> None:
        """Add an entry after the previous ones (the caller keeps order), ending the current
        segment before it or after it where `SegmentCuts` says; `same`: it equals the
        previous manifest's entry at its path. Its chunks may still be pending: they are
        resolved when its segment is encoded."""
        chunks = len(entry.chunks)
        if self.cuts.before(len(self._entries), self._chunks, chunks):
            await self.cut()
        self._entries.append(entry)
        self._chunks += chunks
        self._same = self._same and same
        for c in entry.chunks:
            if isinstance(c, PendingChunk):
                self._packs.add(c.pack)
        if self.cuts.after(len(self._entries), self._chunks, entry.path, chunks):
            await self.cut()

    def takes_whole(self, ref: SegmentRef) -> bool:
        """Whether `append_segment` takes previous segment `ref` whole now, without its
        entries."""
        return not self._entries and (ref.first_path, ref.last_path, ref.entries) in self._reusable

    async def append_segment(self, ref: SegmentRef, entries: list[Entry]) -> None:
        """Add `entries`, every entry of previous segment `ref` and equal to it (the
        scanner's `SameSegment`). Where no segment is open and `ref` is one of the
        `reusable`, it is taken whole without looking at the entries, as the parent cut
        it (readers do not depend on the cutting rule); otherwise they are appended one
        by one, and cut where `SegmentCuts` says."""
        if self.takes_whole(ref):
            self.reused += 1
            await self._take_slot()
            self._start(self._record(ref, self._last, reused=True))
            return
        for entry in entries:
            await self.append(entry, True)

    async def cut(self) -> None:
        """Close the current segment and upload it in the background (in order)."""
        if not self._entries:
            return
        entries, self._entries = self._entries, []
        self._chunks = 0
        packs, self._packs = self._packs, set()
        same, self._same = self._same, True
        if same:
            ref = self._reusable.get((entries[0].path, entries[-1].path, len(entries)))
            if ref is not None:
                self.reused += 1
                await self._take_slot()
                self._start(self._record(ref, self._last, reused=True))
                return
        await self._take_slot()
        self._awaited = next((p for p in packs if p.pack_id is None), self._awaited)
        self._start(self._finish(entries, packs, self._last))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        self._last = task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_slot(self) -> None:
        """Wait for a free in-flight slot without waiting for ever.

        If every slot is taken and a segment in flight waits for the open pack, which only
        fills from later segments, that pack is sealed first so the slots can drain. Packs
        otherwise stay open across cuts and fill to `pack_size` (sealing at every cut made
        the packs of a small-file tree a segment's worth: 3.7 MB on average for the bench's
        20,000 files, 7 packs where 2 now do).
        """
        waited = self._awaited
        if self._inflight.locked() and waited is not None and waited.pack_id is None:
            await self.packer.flush()
        await self._inflight.acquire()

    async def _finish(
        self,
        entries: list[Entry],
        packs: set[OpenPack],
        previous: asyncio.Task[None] | None,
    ) -> None:
        try:
            if packs:
                await asyncio.gather(*(p.done for p in packs))
            data = await asyncio.to_thread(lambda: encode_segment(_resolve(entries)))
            digest = blake3.blake3(data).digest()
            if digest not in self.known:
                await self.repo.put_manifest_object(data)
                self.uploaded_bytes += len(data)
            size = sum(e.size for e in entries if e.chunks)
            ref = SegmentRef(
                digest, len(data), len(entries), entries[0].path, entries[-1].path, size
            )
        except BaseException:
            self._inflight.release()
            raise
        await self._record(ref, previous)

    async def _record(
        self, ref: SegmentRef, previous: asyncio.Task[None] | None, reused: bool = False
    ) -> None:
        """Append `ref` to the list and report it (`on_segment`) after the segments before
        it; `reused`: the parent's segment, taken whole."""
        try:
            if previous is not None:
                await previous
            self._refs.append(ref)
            await self.on_segment(len(self._refs) - 1, ref, reused)
        finally:
            self._inflight.release()

    async def finish(self) -> list[SegmentRef]:
        """Cut the last segment, wait for all uploads, return the manifest list in order."""
        await self.cut()
        if self._last is not None:
            await self._last
        return self._refs

    async def abort(self) -> None:
        """Cancel the segment tasks after a failure elsewhere (one may be waiting for a pack
        that will now never be sealed) and wait for them, ignoring their errors."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
