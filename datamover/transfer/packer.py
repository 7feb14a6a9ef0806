"""The push packer: dedup lookup, pack building and bounded concurrent upload.

A chunk goes into a pack only if neither the catalog nor a pack still in flight already has
it. A sealed pack is uploaded in the background (at most `concurrency` at once, which also
bounds memory); when its upload succeeds its chunks are indexed in the catalog, and only then
is the pack's `done` future resolved. Manifest segments wait on those futures, so nothing in
the store ever refers to a pack that is not complete.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from datamover.aio import gather_or_cancel
from datamover.catalog.queries import Catalog
from datamover.chunking.pack import PackBuilder, least_sizes, pack_key
from datamover.domain.manifest import ChunkRef
from datamover.errors import ObjectNotFound
from datamover.storage.base import Store
from datamover.transfer.scan import NewChunk


class OpenPack:
    """A pack being filled or uploaded. `pack_id` is known once sealed."""

    def __init__(self) -> None:
        self.builder = PackBuilder()
        self.pack_id: bytes | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


@dataclass(slots=True, frozen=True)
class PendingChunk:
    """A chunk placed in a pack whose id may not be known yet."""

    digest: bytes
    pack: OpenPack
    offset: int
    stored_length: int
    raw_length: int
    codec: int

    def resolve(self) -> ChunkRef:
        """The final reference; valid once the pack is sealed."""
        assert self.pack.pack_id is not None, "pack not sealed"
        return ChunkRef(
            self.digest,
            self.pack.pack_id,
            self.offset,
            self.stored_length,
            self.raw_length,
            self.codec,
        )


Ref = ChunkRef | PendingChunk

#: The most chunks a pack of this writer holds, whatever its size: readers take up to 2^24
#: (`pack.MAX_ENTRIES`), which a 1 GiB pack of unique chunks under 64 bytes (tiny files)
#: would pass, and `db rebuild` holds a pack's index whole (about 300 bytes a chunk).
MAX_PACK_CHUNKS = 1 << 20


@dataclass
class PackerStats:
    """Counters for the push summary."""

    packs: int = 0
    pack_bytes: int = 0
    new_chunks: int = 0
    new_chunk_bytes: int = 0
    dedup_chunks: int = 0


class Packer:
    """Places new chunks into packs and uploads them; see the module docstring."""

    def __init__(
        self,
        store: Store,
        catalog: Catalog,
        pack_size: int,
        concurrency: int,
        stored_first: bool = False,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.pack_size = pack_size
        #: Ask the store for each of the first packs before sending it (`_upload`): a push
        #: taking over an interrupted one, whose last packs may be stored but not yet in the
        #: chunk index. Those were the ones in flight, at most `concurrency`, and the rerun
        #: builds them first (it finds the packs indexed before them in the chunk index, so
        #: it starts its first pack where they began): twice that many are asked about.
        self.stored_first = 2 * concurrency if stored_first else 0
        self._sealed = 0
        self.stats = PackerStats()
        self._slots = asyncio.Semaphore(concurrency)
        self._pending: dict[bytes, PendingChunk] = {}
        self._open: OpenPack | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        # Sizes of the packs HEADed (or uploaded) during this push; -1: the store lacks it.
        self._sizes: dict[bytes, int] = {}
        # Buffers packs are assembled in, reused once a pack is stored (pack.py: finish).
        # At most `concurrency` are in use, as packs in memory are bounded by the slots.
        self._buffers: list[bytearray] = []

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def lookup(
        self, digests: Sequence[bytes], previous: Mapping[bytes, ChunkRef] | None = None
    ) -> dict[bytes, Ref]:
        """Where each already-stored (or in-flight) digest lives; unknown ones are absent.
        `previous` (the previous version's chunks of the file being read) is asked before
        the chunk index, each of its packs checked in the store as the index's are."""
        self._check()
        found: dict[bytes, Ref] = {}
        missing = []
        for d in digests:
            p = self._pending.get(d)
            if p is not None:
                found[d] = p
            else:
                missing.append(d)
        if missing and previous:
            known = {d: previous[d] for d in missing if d in previous}
            if known:
                gone = await self._packs_gone(known.values())
                found.update((d, ref) for d, ref in known.items() if ref.pack not in gone)
                missing = [d for d in missing if d not in found]
        if missing:
            known = await self.catalog.lookup_chunks(missing)
            gone = await self._packs_gone(known.values())
            if gone:
                stale = [d for d, ref in known.items() if ref.pack in gone]
                await self.catalog.forget_chunks(stale, gone)
                for d in stale:
                    del known[d]
            found.update(known)
        self.stats.dedup_chunks += len(found)
        return found

    async def _packs_gone(self, refs: Iterable[ChunkRef]) -> set[bytes]:
        """The packs of `refs` the store no longer has whole (each HEADed once per push).

        The chunk index is a cache: if packs vanished behind its back (a bucket restored
        from an older copy, objects deleted by hand), or one is shorter than its chunks
        need (`pack.least_sizes`: a copy cut short), a version must not be published
        pointing into them; their chunks are uploaded again instead.
        """
        least = least_sizes(refs)
        unknown = [p for p in least if p not in self._sizes]
        if unknown:

            async def size(pack: bytes) -> int:
                try:
                    return (await self.store.head(pack_key(pack))).size
                except ObjectNotFound:
                    return -1

            sizes = await gather_or_cancel([size(p) for p in unknown])
            self._sizes.update(zip(unknown, sizes, strict=True))
        return {p for p, need in least.items() if self._sizes[p] < need}

    async def add(self, chunks: Sequence[NewChunk]) -> dict[bytes, PendingChunk]:
        """Place new encoded chunks; return where each went (duplicates placed once)."""
        self._check()
        placed: dict[bytes, PendingChunk] = {}
        for chunk in chunks:
            d = chunk.digest
            known = self._pending.get(d)
            if known is not None:
                placed[d] = known
                continue
            if self._open is None:
                self._open = OpenPack()
            pack = self._open
            offset = pack.builder.add(d, chunk.stored, chunk.raw_length, chunk.codec)
            ref = PendingChunk(d, pack, offset, len(chunk.stored), chunk.raw_length, chunk.codec)
            self._pending[d] = placed[d] = ref
            self.stats.new_chunks += 1
            self.stats.new_chunk_bytes += chunk.raw_length
            if pack.builder.size >= self.pack_size or len(pack.builder) >= MAX_PACK_CHUNKS:
                await self._seal()
        return placed

    async def _seal(self) -> None:
        pack, self._open = self._open, None
        if pack is None:
            return
        await self._slots.acquire()  # backpressure: at most `concurrency` packs in memory
        buffer = self._buffers.pop() if self._buffers else bytearray()
        try:
            entries = pack.builder.entries
            pack_id, data = await asyncio.to_thread(pack.builder.finish, buffer)
        except BaseException:
            self._slots.release()
            raise
        pack.pack_id = pack_id
        self._sealed += 1
        ask = self._sealed <= self.stored_first
        task = asyncio.create_task(self._upload(pack, data, entries, buffer, ask))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upload(
        self, pack: OpenPack, data: memoryview, entries: list, buffer: bytearray, ask: bool
    ) -> None:
        assert pack.pack_id is not None
        size = len(data)
        try:
            if not (ask and await self._stored(pack.pack_id, size)):
                await self.store.put(pack_key(pack.pack_id), data)
                self.stats.pack_bytes += size
            del data
            self._buffers.append(buffer)  # only after a completed put: nothing reads it now
            refs = [
                ChunkRef(e.digest, pack.pack_id, e.offset, e.stored_length, e.raw_length, e.codec)
                for e in entries
            ]
            await self.catalog.add_pack(pack.pack_id, size, refs)
            self._sizes[pack.pack_id] = size
            self.stats.packs += 1
            for e in entries:
                if self._pending.get(e.digest) is not None and self._pending[e.digest].pack is pack:
                    del self._pending[e.digest]
            pack.done.set_result(None)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            pack.done.set_exception(exc)
            pack.done.exception()  # mark retrieved; the error surfaces through _check/close
        finally:
            self._slots.release()

    async def _stored(self, pack_id: bytes, size: int) -> bool:
        """Whether the store holds pack `pack_id` whole already (at its size: its name is
        its content's digest). A run killed after a pack's upload and before its chunks
        were indexed stored it; the run taking over builds the same pack from the same
        files, and this spares sending it again (up to `upload_concurrency` packs a
        kill)."""
        try:
            return (await self.store.head(pack_key(pack_id))).size == size
        except ObjectNotFound:
            return False

    async def flush(self) -> None:
        """Seal the open pack, if any."""
        self._check()
        await self._seal()

    async def close(self) -> None:
        """Seal and wait for every upload; raise the first upload error."""
        await self.flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._check()

    async def abort(self) -> None:
        """Cancel uploads in flight (after a failure elsewhere)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
