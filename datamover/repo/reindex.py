"""Fill a site's chunk index from the packs in the store (`datamover db rebuild`).

The chunk index is a cache: a site learns where chunks live from its own pushes, so a site
whose catalog was lost, or one new to a bucket that already holds data, would upload again
every chunk other sites (or its own earlier catalog) already stored. The store is
self-describing (docs/format.md): every pack ends with an index of its chunks. `reindex`
lists `packs/<hex[0:2]>/` (`pack_listing`), skips the packs this catalog has recorded,
reads the index of each other pack (one ranged GET of its tail, a second when the index is
longer than the first read; a long index in runs, twice: `PackIndex`) and records the pack
and its chunks, as a push does after uploading one.

Contract:
- Incremental and resumable: a pack is recorded with its chunks once its index is checked
  (packs are written in transactions of up to `FLUSH_ROWS` chunks: one per pack took
  twice as long on SQLite); a rerun (after a crash, or later to learn other sites' new
  packs) reads only packs still unknown.
- The store is not trusted: an index is checked as `parse_index` does (its digest, entries
  tiling the data area, lengths within the format's limits) against the size the listing
  gives. A pack that fails is reported by key and not recorded; the rest go on.
  `read_data` also reads each new pack's data and checks that every chunk decodes to its
  digest and the pack's bytes hash to its name (what the index alone cannot prove); packs
  already recorded are not read again.
- Bounded memory: the listing streams; an index is held whole only up to `INDEX_RUN`
  entries, a longer one is read in runs of that many (`PackIndex`), so at most
  `concurrency` packs' two runs (with `read_data`, `READ_DATA_CONCURRENCY` packs and a span
  of `DATA_SPAN` bytes each) are held at once, plus the chunks queued for the next
  transaction (`FLUSH_ROWS`, and up to `concurrency` packs' runs more).
- `chunks_indexed` counts chunks new to the index: one already there (from another pack,
  or recorded meanwhile by another writer) is not counted again.
- Store outages and refusals end the run (`StoreUnavailable`, `StoreAccessDenied`); what
  was recorded before stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3

from datamover.catalog.queries import Catalog
from datamover.chunking import codec
from datamover.chunking.pack import (
    ENTRY_SIZE,
    TRAILER_SIZE,
    PackEntry,
    check_end,
    parse_entries,
    parse_index,
    parse_trailer,
)
from datamover.domain.manifest import ChunkRef
from datamover.errors import Corrupt, ObjectNotFound
from datamover.storage.base import ObjectInfo, Store
from datamover.transfer.progress import NoProgress, Progress

#: Bytes of a pack's tail read first: the trailer and an index of up to ~1,300 chunks (a
#: pack of large-file chunks); a pack of small files' chunks needs a second read.
FIRST_READ = 64 << 10
#: Packs listed before their ids are looked up in the catalog at once.
BATCH = 256
#: Prefixes of `packs/` listed at once.
LIST_PREFIXES = 16
#: Entries of a pack index read, checked and queued at a time (3.2 MB of index): a longer
#: index is read in runs of this many, twice (`PackIndex`).
INDEX_RUN = 1 << 16
#: Chunks read from pack indexes and recorded in one transaction (about 10 MB queued).
FLUSH_ROWS = 50_000
#: Packs read at once with `read_data`, each `DATA_SPAN` bytes (and a chunk) at a time.
READ_DATA_CONCURRENCY = 4
DATA_SPAN = 16 << 20
#: Corrupt packs named in the result; more are only counted.
SAMPLE = 100

_PACK_KEY = re.compile(r"packs/([0-9a-f]{2})/([0-9a-f]{64})")


@dataclass(slots=True)
class ReindexResult:
    """What a run found: packs listed, already known, recorded; chunks recorded; bytes
    read; corrupt packs (the first `SAMPLE` as `(key, reason)`, all counted); keys under
    `packs/<hex[0:2]>/` that name no pack, and packs gone between listing and reading
    (counted)."""

    packs: int = 0
    packs_known: int = 0
    packs_indexed: int = 0
    chunks_indexed: int = 0
    bytes_read: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    corrupt_count: int = 0
    foreign_keys: int = 0
    vanished: int = 0
    read_data: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every pack listed could be read."""
        return self.corrupt_count == 0

    def to_json(self) -> dict[str, Any]:
        """The result as `--json` prints it."""
        return {
            "packs": self.packs,
            "packs_known": self.packs_known,
            "packs_indexed": self.packs_indexed,
            "chunks_indexed": self.chunks_indexed,
            "bytes_read": self.bytes_read,
            "corrupt": [{"key": k, "error": e} for k, e in self.corrupt],
            "corrupt_count": self.corrupt_count,
            "foreign_keys": self.foreign_keys,
            "vanished": self.vanished,
            "read_data": self.read_data,
            "seconds": round(self.seconds, 3),
        }


def pack_id_of(key: str) -> bytes | None:
    """The pack id a store key names (`packs/<hex[0:2]>/<hex>`), None for any other key."""
    m = _PACK_KEY.fullmatch(key)
    if m is None or not m.group(2).startswith(m.group(1)):
        return None
    return bytes.fromhex(m.group(2))


class PackIndex:
    """The index of the pack at `key` (`size` bytes, as listed), read from the store and
    checked (the module docstring); `read` counts the bytes read so far.

    An index of up to `INDEX_RUN` entries is read whole (one ranged GET of the tail, a
    second when it is longer than the first read). A longer one is read `INDEX_RUN`
    entries at a time, twice: a first pass checks the index's digest and every entry and
    keeps the BLAKE3 of each run; the second hands on each run once it hashes as in the
    first pass. So memory holds one run, whatever the trailer claims (up to 2^24 entries,
    800 MB of index), and nothing of an index that fails is handed on. Within a long index
    a digest listed twice is refused only inside one run (harmless beyond: the chunk index
    keeps one place per digest).
    """

    def __init__(self, store: Store, key: str, size: int) -> None:
        self.store = store
        self.key = key
        self.size = size
        self.read = 0
        self.digest = b""
        self.count = 0
        self.data_size = 0
        self._tail: bytes | None = None  # the index and trailer, when read whole

    async def _get(self, start: int, length: int) -> bytes:
        data = await self.store.get(self.key, start, length)
        if len(data) != length:
            raise Corrupt("the pack is shorter than listed")
        self.read += length
        return data

    async def _open(self) -> None:
        """Read the trailer (and the whole index when it is short enough)."""
        size = self.size
        if size < TRAILER_SIZE + ENTRY_SIZE:
            raise Corrupt(f"{size} bytes, too short for a pack")
        first = min(size, FIRST_READ)
        tail = await self.store.get(self.key, size - first, first)
        if len(tail) != first:
            raise Corrupt(f"read {len(tail)} bytes of its last {first}: shorter than listed")
        self.read += first
        self.digest, self.count = parse_trailer(tail[-TRAILER_SIZE:])
        need = TRAILER_SIZE + self.count * ENTRY_SIZE
        if need > size:
            raise Corrupt(f"an index of {self.count} entries does not fit in {size} bytes")
        self.data_size = size - need
        if self.count > INDEX_RUN:
            return
        if need > first:
            tail = await self._get(size - need, need - first) + tail
        self._tail = tail[len(tail) - need :]

    def _run_spans(self) -> Iterator[tuple[int, int]]:
        """`(start, length)` in the pack of each run of a long index."""
        step = INDEX_RUN * ENTRY_SIZE
        end = self.size - TRAILER_SIZE
        for start in range(self.data_size, end, step):
            yield start, min(step, end - start)

    async def runs(self) -> AsyncIterator[list[PackEntry]]:
        """The index's entries, checked, a run at a time (one run for a short index).
        Raises `Corrupt` naming what is wrong, `ObjectNotFound` if the pack is gone."""
        await self._open()
        if self._tail is not None:
            index = memoryview(self._tail)[:-TRAILER_SIZE]
            yield await asyncio.to_thread(
                parse_index, index, self.digest, self.count, self.data_size
            )
            return
        hasher = blake3.blake3()
        sums: list[bytes] = []
        offset = 0
        for start, length in self._run_spans():
            data = await self._get(start, length)
            hasher.update(data)
            sums.append(blake3.blake3(data).digest())
            run = await asyncio.to_thread(parse_entries, data, offset, self.data_size, set())
            offset = run[-1].offset + run[-1].stored_length
        if hasher.digest() != self.digest:
            raise Corrupt("pack index digest mismatch")
        check_end(offset, self.data_size)
        offset = 0
        for (start, length), digest in zip(self._run_spans(), sums, strict=True):
            data = await self._get(start, length)
            if blake3.blake3(data).digest() != digest:
                raise Corrupt("its index changed while it was read")
            run = await asyncio.to_thread(parse_entries, data, offset, self.data_size, set())
            offset = run[-1].offset + run[-1].stored_length
            yield run

    async def checked_runs(self, pack_id: bytes) -> AsyncIterator[list[PackEntry]]:
        """`runs`, each handed on once its data is read too, `DATA_SPAN` bytes at a time,
        and every chunk of it decodes to its digest; the whole pack must hash to `pack_id`
        (its name). Raises `Corrupt` naming the first failure: a short index's only run is
        then not handed on; a long index's runs before it were (each chunk in them sound,
        but the pack is not what its name says)."""
        hasher = blake3.blake3()
        held: list[PackEntry] | None = None
        async for run in self.runs():
            for span in _spans(run, DATA_SPAN):
                start = span[0].offset
                end = span[-1].offset + span[-1].stored_length
                blob = await self._get(start, end - start)
                await asyncio.to_thread(_check_span, hasher, blob, start, span)
            if self._tail is not None:
                held = run  # the only run: handed on once the name is checked
            else:
                yield run
        if self._tail is not None:
            hasher.update(self._tail)
        else:
            for start, length in self._run_spans():
                hasher.update(await self._get(start, length))
            hasher.update(await self._get(self.size - TRAILER_SIZE, TRAILER_SIZE))
        if hasher.digest() != pack_id:
            raise Corrupt("its bytes do not match its name (the BLAKE3 of the pack)")
        if held is not None:
            yield held


async def read_index(store: Store, key: str, size: int) -> tuple[list[PackEntry], int]:
    """Every entry of the checked index of the pack at `key` (`PackIndex.runs` gathered:
    for a pack known to be small) and the bytes read."""
    index = PackIndex(store, key, size)
    entries = [e async for run in index.runs() for e in run]
    return entries, index.read


def _spans(entries: list[PackEntry], limit: int) -> Iterator[list[PackEntry]]:
    """Runs of consecutive entries of at most `limit` stored bytes (one entry at least)."""
    run: list[PackEntry] = []
    size = 0
    for e in entries:
        if run and size + e.stored_length > limit:
            yield run
            run, size = [], 0
        run.append(e)
        size += e.stored_length
    if run:
        yield run


def _check_span(hasher: Any, blob: bytes, start: int, run: list[PackEntry]) -> None:
    """Hash `blob` (the data area from `start`) into the pack's digest and check that
    every chunk of `run` in it decodes to its digest. Blocking: run it off the loop."""
    hasher.update(blob)
    view = memoryview(blob)
    for e in run:
        stored = view[e.offset - start : e.offset - start + e.stored_length]
        try:
            codec.decode_verified(stored, e.codec, e.raw_length, e.digest)
        except Corrupt as exc:
            raise Corrupt(f"chunk at offset {e.offset}: {exc}") from None


async def read_checked(
    store: Store, key: str, size: int, pack_id: bytes
) -> tuple[list[PackEntry], int]:
    """`PackIndex.checked_runs` gathered (for a pack known to be small) and the bytes
    read."""
    index = PackIndex(store, key, size)
    entries = [e async for run in index.checked_runs(pack_id) for e in run]
    return entries, index.read


class _Run:
    """One `reindex` call's state."""

    def __init__(
        self, store: Store, catalog: Catalog, concurrency: int, read_data: bool, progress: Progress
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.read_data = read_data
        self.progress = progress
        limit = min(concurrency, READ_DATA_CONCURRENCY) if read_data else concurrency
        self.slots = asyncio.Semaphore(max(1, limit))
        self.writing = asyncio.Lock()
        # Read, not yet recorded: (pack id, its size or None for chunks only, chunks).
        self.queued: list[tuple[bytes, int | None, list[ChunkRef]]] = []
        self.queued_rows = 0
        self.totals: dict[bytes, int] = {}  # chunks of each pack queued whole
        self.result = ReindexResult(read_data=read_data)

    def _corrupt(self, key: str, reason: str) -> None:
        self.result.corrupt_count += 1
        if len(self.result.corrupt) < SAMPLE:
            self.result.corrupt.append((key, reason))

    async def one(self, info: ObjectInfo, pack_id: bytes) -> None:
        """Read and check one pack and queue it for recording. The slot is held until it
        is queued (and written, when that makes the queue full), so at most `concurrency`
        packs' runs (two `INDEX_RUN`s each at most) besides the queue's `FLUSH_ROWS`
        chunks are in memory. A long index's runs are queued as they come, as chunks
        only; the pack itself is recorded with its last run, so a pack whose index fails
        later, or a run cut short, is read again by the next run."""
        index = PackIndex(self.store, info.key, info.size)
        reported = 0
        async with self.slots:
            pending: list[ChunkRef] | None = None
            runs = index.checked_runs(pack_id) if self.read_data else index.runs()
            try:
                async with contextlib.aclosing(runs):
                    async for run in runs:
                        if pending is not None:
                            await self._queue(pack_id, None, pending)
                        pending = [
                            ChunkRef(
                                e.digest, pack_id, e.offset, e.stored_length, e.raw_length, e.codec
                            )
                            for e in run
                        ]
                        self.progress.advance(0, index.read - reported)
                        reported = index.read
            except ObjectNotFound:
                self.result.vanished += 1  # removed since it was listed: nothing to learn
                return
            except Corrupt as exc:
                self._corrupt(info.key, exc.message)
                return
            finally:
                self.result.bytes_read += index.read
                self.progress.advance(0, index.read - reported)
            assert pending is not None  # an index holds one entry at least
            self.progress.advance(1, 0)
            self.totals[pack_id] = index.count
            await self._queue(pack_id, info.size, pending)

    async def _queue(self, pack_id: bytes, size: int | None, refs: list[ChunkRef]) -> None:
        """Queue `refs` for recording, with their pack when `size` is given (else as chunks
        only), and record the queue once it holds `FLUSH_ROWS` chunks."""
        self.queued.append((pack_id, size, refs))
        self.queued_rows += len(refs)
        if self.queued_rows >= FLUSH_ROWS:
            await self.flush()

    async def flush(self) -> None:
        """Record every queued pack in one transaction."""
        async with self.writing:
            if not self.queued:
                return
            packs, self.queued, self.queued_rows = self.queued, [], 0
            totals = {p: self.totals.pop(p) for p, size, _ in packs if size is not None}
            self.result.chunks_indexed += await self.catalog.add_packs(packs, totals)
            self.result.packs_indexed += sum(size is not None for _, size, _ in packs)

    async def batch(self, listed: Sequence[tuple[ObjectInfo, bytes]]) -> None:
        """Record the packs of `listed` this catalog does not know."""
        known = await self.catalog.known_packs([pid for _, pid in listed])
        self.result.packs_known += len(known)
        self.progress.advance(len(known), 0)
        todo = [(info, pid) for info, pid in listed if pid not in known]
        tasks = [asyncio.ensure_future(self.one(info, pid)) for info, pid in todo]
        try:
            await asyncio.gather(*tasks)
            await self.flush()
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise


async def pack_listing(store: Store) -> AsyncIterator[ObjectInfo]:
    """Every object under the 256 prefixes `packs/00/` to `packs/ff/`, `LIST_PREFIXES` of
    them listed at once, in no particular order (a store that lists a level at a time
    answers `packs/` in 257 requests one after another: 6.6 s for 1,000 packs at 20 ms a
    request, 0.87 s so; bench/listing.py); `packs/00/` alone first. Holds at most `BATCH`
    objects besides the listings' current pages; a listing's error (the first, if several
    fail) is raised once the objects before it are handed on. A consumer that stops early
    closes the generator (`contextlib.aclosing`), which ends the listing's tasks before
    the close returns; left to the event loop's finaliser, they would end later."""
    queue: asyncio.Queue[ObjectInfo | None] = asyncio.Queue(maxsize=BATCH)
    reading = True  # False once the consumer has stopped reading the queue
    prefixes = iter([f"packs/{i:02x}/" for i in range(256)])

    async def lister() -> None:
        for prefix in prefixes:  # shared: each lister takes the next prefix
            async for info in store.list(prefix):
                await queue.put(info)

    async def list_all() -> None:
        try:
            # One prefix alone first: a store that does not answer is then one listing
            # retrying (one warning a try), not `LIST_PREFIXES` of them.
            async for info in store.list(next(prefixes)):
                await queue.put(info)
            async with asyncio.TaskGroup() as group:  # one fails: the others are cancelled
                for _ in range(LIST_PREFIXES):
                    group.create_task(lister())
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None
        finally:
            # The end mark. Waiting for room is only for a consumer still reading: one that
            # stopped cancels this task, and that cancel may already be spent (on a `put`
            # above, or swallowed by the task group as a lister failed), so a wait for room
            # it will never make would never end.
            if not queue.full():
                queue.put_nowait(None)
            elif reading:
                await queue.put(None)

    task = asyncio.ensure_future(list_all())
    try:
        while (info := await queue.get()) is not None:
            yield info
        await task
    finally:
        reading = False
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def reindex(
    store: Store,
    catalog: Catalog,
    *,
    concurrency: int,
    read_data: bool = False,
    progress: Progress | None = None,
) -> ReindexResult:
    """Record in `catalog` every pack in `store` it does not know, with its chunks; see the
    module docstring. `progress` counts packs (known ones included) and bytes read."""
    started = time.monotonic()
    run = _Run(store, catalog, concurrency, read_data, progress or NoProgress())
    listed: list[tuple[ObjectInfo, bytes]] = []
    # Closed here when a batch fails, so the listing's tasks end with the run.
    async with contextlib.aclosing(pack_listing(store)) as listing:
        async for info in listing:
            pack_id = pack_id_of(info.key)
            if pack_id is None:
                run.result.foreign_keys += 1
                continue
            run.result.packs += 1
            listed.append((info, pack_id))
            if len(listed) >= BATCH:
                await run.batch(listed)
                listed = []
    if listed:
        await run.batch(listed)
    run.result.seconds = time.monotonic() - started
    return run.result
