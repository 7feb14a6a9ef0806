"""Stage: materialise a version at the site's mapped path, fetching only what is missing.

Flow (DESIGN.md "stage"): resolve the version, bring its manifest into the local cache and
check every entry *before* touching the disk (the store is not trusted), then merge the
local tree with it (`plan.StagePlanner`), fetch missing chunks with coalesced ranged GETs,
verify each against its digest, and write each file under a temporary name renamed into
place with its mode and mtime. Directory modes and mtimes are set last, children first.

Concurrency: the planner walks in one thread, fetches run on the event loop, and every
file-system change goes through one writer thread, in order; except that when a version has
many files, batches of small files are decoded, verified and written by worker processes
(`writers`, one per core), each batch handed over only once the writer thread has made its
directories.
Crash safety: a file appears at its final path only complete and verified; large files keep
a stable partial name so a rerun resumes them after re-checking what is already there.
A stage that fails or is cancelled before its first change to the tree (`_Stager.untouched`)
gives the replica record back as it was; one that changed anything records `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import blake3

from datamover.aio import every
from datamover.catalog.queries import ReplicaRow, owner_alive, owner_id
from datamover.config import TransferSettings
from datamover.console import human_bytes
from datamover.domain.manifest import ChunkRef, Entry, Kind, without_setid
from datamover.domain.paths import MAX_LINK_TARGET, check_logical_path, printable, sort_key
from datamover.errors import (
    Busy,
    Conflict,
    Corrupt,
    DatamoverError,
    InvalidInput,
    NotFound,
)
from datamover.repo.layout import VersionDoc
from datamover.repo.manifest import SegmentRef
from datamover.site import Site
from datamover.transfer import ctimes, fsops, procpool, writers
from datamover.transfer.fetch import (
    ChunkSink,
    Fetcher,
    Range,
    buffer_size,
    decode_ranges,
    plan_ranges,
)
from datamover.transfer.locks import take_lock, take_nested
from datamover.transfer.pins import (
    check_nested_pins,
    check_pins,
    overwritten_below,
    record_overridden,
)
from datamover.transfer.plan import Op, StagePlanner, children_first
from datamover.transfer.progress import NoProgress, Progress
from datamover.transfer.trash import trash_root
from datamover.transfer.walk import LocalEntry, Walker

_PLAN_BATCH = 2048
_BATCH_FILES = 4096
#: A version with at least this many files is written by worker processes (when configured):
#: below it, starting them (0.15-0.2 s) costs more than it saves.
_POOL_FILES = 2048
#: Smaller batches with workers, so every worker has one while the next is fetched.
_POOL_BATCH_FILES = 1024
_MAX_DIRS_IN_MEMORY = 1 << 16
#: Groups of operations (each from at most `_PLAN_BATCH` actions) queued for the writer
#: thread before planning waits for it: the plan must not run ahead of a slow file system
#: with every entry of the version held in the queue.
_OPS_AHEAD = 4
_RANGE_WRITERS = 4
#: The longest streamed range of a large file (at least `max_request`): a pack's whole run
#: of the file's chunks is one request (32 MiB packs by default), and a pack of 1 GiB is
#: still read by several streams at once.
_STREAM_REQUEST = 64 << 20
#: The bytes of a large file whose ranges are planned at once when none is copied.
_STREAM_WINDOW = 1 << 30
#: Manifests of at most this many entries are decoded once, not twice: at most about 20 MiB
#: of entries held for the run (measured: 640 bytes per entry of a docking tree; decoding
#: 20,000 entries takes 0.07-0.14 s).
_KEEP_CHECKED = 1 << 15
# Leftover files a full disk's error names and sums, at most (each one `lstat`).
_HINT_FILES = 1000
#: ... and of at most this many stored (compressed) segment bytes, which bounds the chunk
#: references held too: each holds a 32-byte digest that does not compress, and takes about
#: 320 bytes decoded, so at most about 40 MiB of them. Known before decoding: no per-entry
#: counting.
_KEEP_STORED = 4 << 20

log = logging.getLogger(__name__)

#: A stage touches its replica record this often; one of another host or PID namespace
#: (whose death cannot be seen from here) silent for `_STALE_AFTER` is taken over, as a
#: push's checkpoint is (the window also absorbs clocks minutes apart).
_TOUCH_EVERY = 60.0
_STALE_AFTER = timedelta(minutes=15)

#: A file to fetch: its entry, and the `(inode, size, mtime)` the walk saw of the local file
#: it replaces (`plan.Action.replaces`), or None.
_Fetch = tuple[Entry, tuple[int, int, int] | None]


def _fetched(ranges: list[Range]) -> int:
    """The bytes fetching `ranges` holds: their lengths, the gaps coalesced into them too."""
    return sum(r.end - r.start for r in ranges)


def split_fetch(
    batch: list[_Fetch], gap: int, max_request: int, limit: int
) -> list[tuple[list[_Fetch], list[Range]]]:
    """The parts of a batch of small files to fetch and write one after another, in batch
    order, each with its planned ranges (`plan_ranges`), so that no part holds more than
    `limit` fetched bytes, the gaps coalesced into its ranges included, or than its own
    chunks' stored bytes where those are more (a batch ends just past `limit`).

    A batch is cut by its files' bytes, but its chunks' ranges coalesce neighbours up to
    `gap` apart: scattered missing files (or a hostile manifest) made a batch of 4 KiB
    files fetch a range of up to `max_request` for each. The batch is halved until each
    part's ranges fit (one plan in the usual case of files next to each other in their
    packs; each half still coalesces its neighbours). A part of one file that still does
    not fit is planned without gaps: it then holds only its own chunks' stored bytes,
    which the caller bounds (a larger file is not put in a batch).
    """
    parts: list[tuple[list[_Fetch], list[Range]]] = []
    todo = [batch]
    while todo:
        part = todo.pop()
        ranges = plan_ranges((c for e, _ in part for c in e.chunks), gap, max_request)
        # A batch is cut once it reaches `limit`, so it goes a little over by its own
        # bytes (all of it, for files that do not compress): only the gaps split it.
        own = sum(c.stored_length for e, _ in part for c in e.chunks)
        if _fetched(ranges) <= max(limit, own):
            parts.append((part, ranges))
        elif len(part) == 1:
            parts.append((part, plan_ranges(part[0][0].chunks, 0, max_request)))
        else:
            half = len(part) // 2
            todo += [part[half:], part[:half]]
    return parts


@dataclass
class StageResult:
    """The summary of a stage (`--json` prints it)."""

    dataset: str
    version: str
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    fetched_files: int = 0
    fetched_bytes: int = 0
    #: Bytes of large files copied from their older copies here, not fetched (`_large`).
    reused_bytes: int = 0
    downloaded_bytes: int = 0
    kept_files: int = 0
    removed: int = 0
    trashed: list[str] = field(default_factory=list)
    trashed_count: int = 0
    trash_dir: str | None = None
    seconds: float = 0.0

    @classmethod
    def of(cls, doc: VersionDoc, **counts: Any) -> StageResult:
        """The summary of a stage of version `doc`, its totals filled in from `doc`."""
        return cls(
            doc.dataset,
            doc.version,
            files=doc.files,
            dirs=doc.dirs,
            symlinks=doc.symlinks,
            bytes=doc.bytes,
            **counts,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (`trashed` holds at most the first 100 names, as verify
        prints them: one that is not printable or not UTF-8 as `printable` shows it, so the
        JSON carries no lone surrogate; `trashed_count` counts them all)."""
        data = asdict(self)
        data["trashed"] = [printable(p) for p in self.trashed[:100]]
        return data


def trash_dir(run_dir: Path, dataset: str) -> Path:
    """Where one stage run's trash for `dataset` goes: the run's directory
    (`<state_dir>/trash/<run>/`) and then the dataset's own path, one directory per
    component (each a valid name, at most 255 bytes, so no component of the trash path can
    be too long), then the entry's path."""
    return run_dir.joinpath(*dataset.strip("/").split("/"))


def _check_manifest(site: Site, refs: list[SegmentRef]) -> list[Entry] | None:
    """Check every entry of the manifest, and that this site can write every symlink's
    target, before anything is written; return the entries if there are at most
    `_KEEP_CHECKED` in at most `_KEEP_STORED` stored bytes (the planner then reads the list
    instead of decoding the manifest a second time)."""
    small = (
        sum(r.entries for r in refs) <= _KEEP_CHECKED
        and sum(r.stored_size for r in refs) <= _KEEP_STORED
    )
    kept: list[Entry] | None = [] if small else None
    for entry in without_setid(site.repo.iter_cached(refs, check=True)):
        if entry.kind == Kind.SYMLINK:
            _link_target(site, entry)
        if kept is not None:
            kept.append(entry)
    return kept


def _link_target(site: Site, entry: Entry) -> str:
    """The target this site writes for a symlink entry (a logical one mapped here)."""
    target = site.config.namespace.link_to_local(entry.target or "")
    if len(target.encode()) > MAX_LINK_TARGET:
        raise InvalidInput(
            f"symlink {entry.path!r} cannot be created at this site: its target, mapped to "
            f"this site's directories, is longer than {MAX_LINK_TARGET} bytes "
            f"({target[:60]}...)",
            [entry.path],
        )
    return target


class _Stager:
    """One stage run; see the module docstring."""

    def __init__(
        self,
        site: Site,
        doc: VersionDoc,
        refs: list[SegmentRef],
        base_refs: list[SegmentRef] | None,
        interrupted_refs: list[SegmentRef] | None,
        root: Path,
        base_path: Path,
        parts: tuple[str, ...],
        delete: bool,
        checksum: bool,
        progress: Progress,
        procs: Procs | None,
        checked: list[Entry] | None,
        changed_since_ns: int | None = None,
    ) -> None:
        t = site.config.transfer
        self.changed_since_ns = changed_since_ns
        self.site, self.doc, self.refs, self.base_refs = site, doc, refs, base_refs
        self.interrupted_refs = interrupted_refs
        self.root, self.base_path, self.parts = root, base_path, parts
        self.delete, self.checksum, self.progress = delete, checksum, progress
        self.gap, self.max_request, self.batch_bytes = t.coalesce_gap, t.max_request, t.batch_bytes
        self.large = max(t.batch_bytes // 4, 1 << 20)
        # A large file's ranges are streamed, not held (`_large`): as long as a pack's run
        # of its chunks, within reason, so several still go at once on a file in few packs.
        self.stream_request = max(self.max_request, _STREAM_REQUEST)
        self.workers = _write_workers(t, doc.files)
        self.batch_files = _BATCH_FILES
        if self.workers:
            # Batches in flight: one per worker and one being fetched, each at most `large`.
            self.batch_files, self.batch_bytes = _POOL_BATCH_FILES, self.large
        # A range the store cannot stream is read `max_request` at a time, as before.
        self.fetcher = Fetcher(site.store, t.download_concurrency, t.max_request)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.trash_run = trash_root(site.state_dir) / f"{stamp}-{secrets.token_hex(3)}"
        self.trash_dir = trash_dir(self.trash_run, doc.dataset)
        self.result = StageResult.of(doc)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dm-writer")
        # Chunks a large file's old copy still holds are read, verified and copied here
        # (`_copy_seeded`), off the event loop; fetched ranges are written by the threads
        # that receive them (`Fetcher.stream`).
        self._range_pool = ThreadPoolExecutor(_RANGE_WRITERS, thread_name_prefix="dm-range")
        self._ops: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._pending: list[asyncio.Future[Any]] = []
        self._batch: list[_Fetch] = []
        self._batch_size = 0
        self._slots = asyncio.Semaphore(self.workers + 1 if self.workers else 2)
        self._procs = procs
        self.checked = checked
        self._last_ops: asyncio.Future[Any] | None = None
        self._queued_ops: deque[asyncio.Future[Any]] = deque()
        # The first failure of a queued operation (a trash move, a directory): once set,
        # nothing more is written, since a write may be the one it was clearing the way for.
        self._ops_error: BaseException | None = None
        self._dirs: list[Entry] = []
        self._dirs_overflow = False
        self._stale: list[str] = []
        self.writer: fsops.TreeWriter | None = None
        self._walker: Walker | None = None
        # Whether the run may have changed the tree: set on the writer thread before its
        # first operation or file write; by a range writer thread before the first write
        # into a partial file (one made and never written is removed again); on the event
        # loop when a batch is handed to a worker process; when the walk unlocked a
        # directory, or the dataset's directory had to be made. Read once every thread and
        # worker has stopped.
        self.changed = False
        self._settled = False
        # Partial files this run made and has neither written nor removed again, by path:
        # their directory's times before and after, and the file's identity. One left when
        # the run ends (a cancel cut the removal short) makes the run a change.
        self._fresh: dict[str, fsops.FreshPartial] = {}
        # The directories worker processes made writable (path -> mode before), recorded
        # as each batch ends, however it ends (`_worker_done`, in the pool's thread), and
        # joined to the writer's on the writer thread (`_take_unlocked`).
        self._from_workers: dict[str, int] = {}
        self._from_workers_lock = threading.Lock()
        # The dataset directory's mode before the run: given back after a worker process
        # was lost, which may have made it writable and told no one.
        self._root_mode: int | None = None
        self._root_id: tuple[int, int] | None = None  # the dataset directory's (dev, ino)

    @property
    def untouched(self) -> bool:
        """Whether the run ended without changing anything in the tree, so it is still what
        it was before the run (False while a thread or worker of the run may still run: a
        second cancel cut its cleanup short; or while a partial file it made is left)."""
        return self._settled and not self.changed and not self._fresh

    # -- writer thread ----------------------------------------------------------------------

    def _on_writer(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _check_ops(self) -> None:
        """Raise the first failure of a queued operation, if any (any thread)."""
        if self._ops_error is not None:
            raise self._ops_error

    def _check_done(self) -> None:
        """Raise the first failure of a queued operation or of a finished batch (on the
        event loop): once one failed, fetching the rest would only be thrown away."""
        self._check_ops()
        for fut in self._pending:
            exc = fut.exception() if fut.done() and not fut.cancelled() else None
            if exc is not None:
                raise exc

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn`, a change to the tree, on the writer thread unless an operation queued
        before it failed."""
        self._check_ops()
        self.changed = True
        return fn(*args)

    def _open_partial(self, entry: Entry) -> tuple[int, int, bool]:
        """On the writer thread, unless an operation queued before it failed: open the
        partial file of large `entry` (`open_partial`); return `(fd, good chunks, made)`.

        A partial file this run makes is recorded in `_fresh` (not yet a change: the run
        removes it again if it fails before writing into it, `_drop_partial`); opening one
        that was there (a resume, which cuts it to its good chunks, or a file not ours in
        the way, replaced) is a change."""
        self._check_ops()
        w = self.writer
        assert w is not None
        before = w.partial_missing(entry)
        if before is None:
            self.changed = True
        else:  # recorded first: whatever fails from here on, the file is not forgotten
            self._fresh[entry.path] = fsops.FreshPartial(before, None, None)
        try:
            fd, good = w.open_partial(entry)
        except BaseException:
            self._drop_partial(entry)  # it may have made the file before it failed
            raise
        if before is not None:
            self._fresh[entry.path] = w.fresh_partial(entry, fd, before)
        return fd, good, before is not None

    async def _abandon_open(self, opening: asyncio.Future[Any], entry: Entry) -> None:
        """After a cancel that came while the writer thread opened `entry`'s partial file
        (`_open_partial`, which goes on): close the file once it is open, whatever happens
        next, and remove it if this run made it (a second cancel cuts the removal short;
        `untouched` then stays False)."""

        def close(done: asyncio.Future[Any]) -> None:
            if not done.cancelled() and done.exception() is None:
                os.close(done.result()[0])

        opening.add_done_callback(close)
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None and opening.result()[2]:
            await self._on_writer(self._drop_partial, entry)

    def _drop_partial(self, entry: Entry) -> None:
        """On the writer thread: remove the partial file of `entry` this run made and never
        wrote, giving its directory its times back (`TreeWriter.drop_partial`); if that
        cannot be done as it should, the run has changed the tree."""
        fresh = self._fresh.get(entry.path)
        if fresh is None:
            return
        assert self.writer is not None
        try:
            dropped = self.writer.drop_partial(entry, fresh)
        except (OSError, DatamoverError):
            dropped = False
        if dropped:
            del self._fresh[entry.path]
        else:
            self.changed = True

    def _finish(self, entry: Entry, fd: int, replaces: tuple[int, int, int] | None) -> None:
        """On the writer thread: rename a large file's partial file into place, unless an
        operation queued before it failed; `fd` is closed either way."""
        try:
            self._check_ops()
        except BaseException:
            os.close(fd)
            raise
        assert self.writer is not None
        self.changed = True
        self._fresh.pop(entry.path, None)
        self.writer.finish_partial(entry, fd, replaces)

    def _submit_ops(self) -> None:
        """Send queued small operations to the writer thread without waiting for them.

        Their future fails if any group submitted before them failed, so awaiting the
        latest one (a worker batch does) waits for, and checks, every operation before it.
        """
        if not self._ops:
            return
        ops, self._ops = self._ops, []

        def run() -> None:
            self._check_ops()
            self.changed = True
            try:
                for fn, args in ops:
                    fn(*args)
            except BaseException as exc:
                self._ops_error = exc
                raise

        self._last_ops = self._on_writer(run)
        self._pending.append(self._last_ops)
        self._queued_ops.append(self._last_ops)
        if len(self._pending) > 64:
            self._pending = [f for f in self._pending if not f.done() or f.exception()]

    async def _keep_up(self) -> None:
        """Wait until at most `_OPS_AHEAD` groups of operations are queued for the writer
        thread (memory: the entries they hold); raise the first failure so far."""
        while len(self._queued_ops) > _OPS_AHEAD:
            await asyncio.wait([self._queued_ops.popleft()])
        self._check_done()

    def _write_batch(self, batch: list[_Fetch], ranges: list[Range], blobs: list[bytes]) -> None:
        """Verify and write a batch, on the writer thread: decoding there too saves a thread
        hop per batch and GIL contention between a decoder and the writer. Writes nothing if
        an operation queued before it failed."""
        self._check_ops()
        decoded = decode_ranges(ranges, blobs, _owners(batch))
        blobs.clear()
        self.changed = True  # every chunk verified: the first file is written now
        write = self.writer.write_file  # type: ignore[union-attr]
        for entry, replaces in batch:
            write(entry, [decoded[c] for c in entry.chunks], replaces)

    # -- worker processes -------------------------------------------------------------------

    async def _write_elsewhere(
        self,
        batch: list[_Fetch],
        ranges: list[Range],
        blobs: list[bytes],
        ops: asyncio.Future[Any] | None,
    ) -> bool:
        """Have a worker process write the batch; False if there are no workers.

        `ops` is the latest group of operations queued before the batch: it has run, and
        every group before it has succeeded, before the batch is handed over.
        """
        procs = await self._procs if self._procs is not None else None
        if procs is None:
            return False
        if ops is not None:
            await ops  # the batch's directories exist (the writer thread runs ops in order)
        self._check_ops()
        self.changed = True  # whatever the worker gets to before it fails or is stopped
        files = [(e.path, e.mode, e.mtime_ns, e.chunks, replaces) for e, replaces in batch]
        assert self.writer is not None
        try:
            job = procs.submit(
                writers.write_batch,
                str(self.base_path),
                self.parts,
                ranges,
                blobs,
                files,
                str(self.trash_dir),
                self.writer.sparse,  # every write path takes the one setting
                str(self.trash_run),
                self._root_id,
            )
            job.add_done_callback(self._worker_done)  # before the wait's: it runs first
            written = await asyncio.wrap_future(job)
        except BrokenProcessPool:
            raise procpool.lost("stage writer") from None
        except writers.BatchFailed as failed:
            raise failed.error from failed  # with the worker's traceback (its cause)
        if written.trashed_count:  # counted on the writer thread, which counts its own
            await self._on_writer(self.writer.note_trashed, written.trashed, written.trashed_count)
        return True

    def _worker_done(self, job: Future[writers.Written]) -> None:
        """Record the directories a worker process made writable once its batch is over,
        whether it succeeded, failed (`writers.BatchFailed` carries them) or the wait for it
        was cancelled (another batch failed first); `_take_unlocked` gives them to the
        writer, so they get their mode back at the end, as the writer's own do.

        A worker that was lost (killed: `BrokenProcessPool`) tells nothing: the dataset
        directory, which no later stage gives a mode (it is no entry of the version), gets
        the mode it had before the run when that denied its owner writing; a directory of
        the version that such a worker made writable gets its mode at the next stage.
        Runs in the pool's thread, or in the caller's when the job is already over."""
        if job.cancelled():
            return
        exc = job.exception()
        if exc is None:
            unlocked = job.result().unlocked
        elif isinstance(exc, writers.BatchFailed):
            unlocked = exc.unlocked
        elif isinstance(exc, BrokenProcessPool) and self._root_mode is not None:
            mode = self._root_mode
            unlocked = {} if mode & fsops.OWNER_WX == fsops.OWNER_WX else {"": mode}
        else:
            return
        with self._from_workers_lock:
            for rel, mode in unlocked.items():
                self._from_workers.setdefault(rel, mode)

    # -- fetching ---------------------------------------------------------------------------

    async def _process(self, batch: list[_Fetch], ops: asyncio.Future[Any] | None) -> None:
        """Fetch and write a batch, in parts that each hold at most `batch_bytes` of fetched
        data (`split_fetch`), one after another."""
        try:
            for part, ranges in split_fetch(batch, self.gap, self.max_request, self.batch_bytes):
                blobs = await self.fetcher.fetch(ranges, functools.partial(_owners, part))
                if not await self._write_elsewhere(part, ranges, blobs, ops):
                    await self._on_writer(self._write_batch, part, ranges, blobs)
                nbytes = sum(e.size for e, _ in part)
                self.result.fetched_files += len(part)
                self.result.fetched_bytes += nbytes
                self.progress.advance(len(part), nbytes)
        finally:
            self._slots.release()

    async def _flush(self) -> None:
        if not self._batch:
            return
        self._check_done()  # stop fetching once nothing more will be written
        self._submit_ops()  # directories and removals first: the writer thread keeps order
        batch = self._batch
        self._batch, self._batch_size = [], 0
        await self._slots.acquire()
        try:
            self._check_done()  # a batch that failed while this one waited for its turn
        except BaseException:
            self._slots.release()
            raise
        self._pending.append(asyncio.ensure_future(self._process(batch, self._last_ops)))

    async def _large(
        self,
        entry: Entry,
        replaces: tuple[int, int, int] | None,
        seed: tuple[ChunkRef, ...] | None = None,
    ) -> None:
        """Stream one large file into its stable partial file.

        Over a file datamover wrote (`replaces`) holding the chunks `seed` (an older version
        of it), the chunks the new version shares with it are copied from it, each verified
        by its digest as it is read (one that fails is fetched), and only the others are
        fetched: an edit in the middle of a 30 GiB file, or frames appended to a trajectory,
        cost the chunks that changed, not the file (`_copy_seeded`). Window by window, so a
        cancel waits for one window's copy at most.

        Ranges, each a pack's run of the file's chunks (up to `stream_request` bytes), are
        streamed `download_concurrency` at a time (`Fetcher.stream`): the thread receiving
        one verifies each chunk as its last byte arrives and writes it (`pwrite` at its file
        offsets, so arrival order does not matter). The threads verify in parallel but take
        turns to write: writes to one file serialise on its inode lock in the kernel anyway,
        where a waiting writer spins (in a 1 GiB stage, 6% of all CPU samples were that
        spin, and page-cache copies under contention took twice as long); a lock of ours
        makes it sleep instead. Memory: one chunk's buffer per stream, reused, whatever the
        range's size.
        """
        self._check_done()
        self._submit_ops()
        assert self.writer is not None
        # A partial file this run makes and never writes is removed again if the run fails,
        # its directory's times given back: the run changes the tree only from its first
        # write into it (`writing`), or its rename.
        opening = self._on_writer(self._open_partial, entry)
        try:
            fd, good, made = await asyncio.shield(opening)
        except asyncio.CancelledError:
            await self._abandon_open(opening, entry)
            raise
        wrote = False

        def writing() -> None:  # in a range writer thread, before its first pwrite
            nonlocal wrote
            wrote = self.changed = True

        sparse = self.writer.sparse  # as finish_partial's: one setting for both ends
        slots = asyncio.Semaphore(self.site.config.transfer.download_concurrency)
        tasks: set[asyncio.Task[None]] = set()
        writes: list[Future[Any]] = []  # every pwrite job, so none outlives the fd
        offsets = list(itertools.accumulate((c.raw_length for c in entry.chunks), initial=0))
        turn = threading.Lock()
        source: int | None = None  # the old copy the seed's chunks are copied from
        if seed and replaces is not None and good < len(entry.chunks):
            seeding = self._on_writer(self.writer.open_seed, entry.path, replaces)
            try:
                source = await asyncio.shield(seeding)
            except BaseException:
                seeding.add_done_callback(_close_opened)  # cancelled: it opens on regardless
                await asyncio.shield(self._on_writer(os.close, fd))
                if made:
                    await self._on_writer(self._drop_partial, entry)
                raise
        old_at: dict[bytes, int] = {}
        if source is not None and seed is not None:
            at = 0
            for c in seed:
                old_at.setdefault(c.digest, at)
                at += c.raw_length
        reused = 0
        # One chunk's buffer per stream, reused by the next (a fresh one is cleared page by
        # page): at most `download_concurrency` chunks of at most 16 MiB, whatever the
        # file's or a range's size.
        buffers: list[bytearray] = []

        use = _FdUse()  # the streams' threads write to fd only while it is open

        async def one(rng: Range, positions: dict[ChunkRef, list[int]]) -> None:
            written = 0

            def chunk(ref: ChunkRef, raw: bytes | memoryview) -> None:  # a stream's thread
                nonlocal written
                ats = positions[ref]
                if sparse and fsops.is_hole(raw):  # (a compare: no turn, no use of fd)
                    written += len(raw) * len(ats)
                    return
                for at in ats:  # one write at a time: a cancel waits for one at most
                    with use:
                        written += _write_chunk(fd, raw, at, turn, writing)

            try:
                need = buffer_size(rng)
                buffer = buffers.pop() if buffers else None
                if buffer is None or len(buffer) < need:  # a smaller one is dropped
                    buffer = bytearray(need)
                try:
                    sink = ChunkSink(rng, buffer, chunk, entry.path)
                    await self.fetcher.stream(rng, sink, entry.path)
                except OSError as exc:  # a full disk, say: name the file it was writing
                    raise fsops.named(exc, self.root / entry.path) from None
                # Only a stream that ended hands its buffer on: a cancelled one's thread may
                # still be filling it.
                buffers.append(buffer)
                self.progress.advance(0, written)
            finally:
                slots.release()

        try:
            start = good
            while start < len(entry.chunks):
                # Small windows only while chunks are copied from an old copy (a cancel
                # waits for one window's copy); otherwise a GiB, so that a range spans all
                # the file holds of a pack but for one cut a GiB, while the chunks planned
                # at once stay bounded (a 1 TB file has a million).
                window = self.batch_bytes if source is not None else _STREAM_WINDOW
                end, size = start, 0
                while end < len(entry.chunks) and (end == start or size < window):
                    size += entry.chunks[end].raw_length
                    end += 1
                copied: set[int] = set()
                if source is not None:
                    job = self._range_pool.submit(
                        _copy_seeded,
                        fd,
                        source,
                        entry,
                        offsets,
                        start,
                        end,
                        old_at,
                        turn,
                        sparse,
                        writing,
                    )
                    writes.append(job)
                    try:
                        copied, nbytes, odd = await asyncio.wrap_future(job)
                    except OSError as exc:  # a full disk, say: name the file it was writing
                        raise fsops.named(exc, self.root / entry.path) from None
                    reused += nbytes
                    self.progress.advance(0, nbytes)
                    if odd:
                        # Not the old version's bytes, whatever its size and mtime say: a
                        # user's edit, for the trash at the rename (as over a file the walk
                        # did not see), and nothing more is taken from it.
                        replaces = None
                        os.close(source)
                        source = None
                positions: dict[ChunkRef, list[int]] = {}
                wanted: list[ChunkRef] = []
                for i in range(start, end):
                    if i not in copied:
                        positions.setdefault(entry.chunks[i], []).append(offsets[i])
                        wanted.append(entry.chunks[i])
                for rng in plan_ranges(wanted, self.gap, self.stream_request):
                    await slots.acquire()
                    for done in [t for t in tasks if t.done()]:
                        tasks.discard(done)
                        done.result()  # surface a failure now, not after the whole file
                    tasks.add(asyncio.create_task(one(rng, positions)))
                start = end
            await asyncio.gather(*tasks)
            use.close()
            owned, fd = fd, -1  # closed by finish_partial, even when it fails, or here
            await self._on_writer(self._finish, entry, owned, replaces)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if source is not None:  # first: a cancel during an await below skips the rest
                wait_futures(writes)  # every copy from it is over (a window's at most)
                os.close(source)
            if fd >= 0:
                # A cancelled task does not stop its thread: wait for every pwrite before the
                # fd is closed, or a write could land in whatever file reuses its number.
                # (Blocking the loop here is short: one chunk per stream, one window's copy.)
                use.close()
                wait_futures(writes)
                # Shielded: a cancel meanwhile must not leave the file open for good.
                await asyncio.shield(self._on_writer(os.close, fd))
                if made and not wrote:
                    await self._on_writer(self._drop_partial, entry)
        self.result.fetched_files += 1
        self.result.fetched_bytes += entry.size - offsets[good] - reused
        self.result.reused_bytes += reused
        self.progress.advance(1, 0)

    # -- the run ----------------------------------------------------------------------------

    def _entries(self, refs: list[SegmentRef]) -> Iterator[Entry]:
        """The entries of `refs`: from the check pass's list when it kept them (entries are
        never modified, so the target and the base may share it), else decoded again."""
        if refs is self.refs and self.checked is not None:
            return iter(self.checked)
        return without_setid(self.site.repo.iter_cached(refs, check=False))

    def _planner(self, stored_mtime: Callable[[int], int]) -> Iterator[Any]:
        # The walk reads the directory the writes go to (the root's descriptor), not
        # whatever its path leads to by now: a dataset directory swapped for a link to
        # another tree must not have that tree decide what is removed from this one.
        assert self.writer is not None
        via_fd = f"/proc/self/fd/{self.writer.root_fd}"
        root = via_fd if os.path.isdir(via_fd) else str(self.root)

        def read_ok(_local: LocalEntry, e: Entry) -> bool:
            return fsops.content_matches(root, e)

        content_ok = read_ok if self.checksum else None
        # Files changed since the tree was known to hold its base are read before they are
        # taken for an entry: size and mtime do not tell a file replaced under them.
        since = self.changed_since_ns
        changed_since = None if since is None else (since, read_ok)
        # A directory whose mode from a version denies the stage's user reading or searching
        # it (0o600) is given those bits for the run; `_finish_tree` sets its mode again.
        self._walker = Walker(
            root,
            strict=False,
            keep_unlocked=True,
            lookup_threads=self.site.config.transfer.lookup_threads,
        )
        planner = StagePlanner(
            self._walker,
            self._entries(self.refs),
            # A base that is the target tells nothing apart (a restage): not read twice.
            self._entries(self.base_refs)
            if self.base_refs and self.base_refs is not self.refs
            else None,
            self.delete,
            content_ok,
            self.site.config.namespace.same_link,
            self._entries(self.interrupted_refs) if self.interrupted_refs else None,
            stored_mtime,
            *self._changed_entries(self.base_refs, self.interrupted_refs),
            changed_since,
        )
        return iter(planner)

    def _changed_entries(self, *versions: list[SegmentRef] | None) -> list[Iterator[Entry]]:
        """For each of `versions`, the entries of its segments the target does not have (for
        `StagePlanner._ambiguous`): a segment both have holds the target's entries."""
        target = {r.digest for r in self.refs}
        return [
            self._entries([r for r in refs or () if r.digest not in target]) for refs in versions
        ]

    def _keep_dir(self, entry: Entry) -> None:
        if len(self._dirs) < _MAX_DIRS_IN_MEMORY:
            self._dirs.append(entry)
        else:
            self._dirs_overflow = True

    async def _dispatch(self, actions: list[Any]) -> None:
        w = self.writer
        assert w is not None
        kept = kept_bytes = 0
        stale = [action.path for action in actions if action.op is Op.STALE]
        earlier = await asyncio.to_thread(self._earlier_partials, stale) if stale else set()
        for action in actions:
            op, entry = action.op, action.entry
            if op is Op.FETCH:
                # What the file holds, or its chunks take stored if more (a hostile manifest
                # may give a chunk of a few bytes up to 16 MiB stored).
                size = max(entry.size, sum(c.stored_length for c in entry.chunks))
                if size > self.large:
                    await self._large(entry, action.replaces, action.seed)
                    continue
                self._batch.append((entry, action.replaces))
                self._batch_size += size
                if self._batch_size >= self.batch_bytes or len(self._batch) >= self.batch_files:
                    await self._flush()
            elif op is Op.KEEP or op is Op.ATTR:
                if entry.kind == Kind.DIR:
                    self._keep_dir(entry)
                elif entry.kind == Kind.FILE:
                    kept += 1
                    kept_bytes += entry.size
                    if op is Op.ATTR:
                        self._ops.append((w.set_attrs, (entry, action.replaces)))
            elif op is Op.MKDIR:
                self._ops.append((w.mkdir, (action.path,)))
                self._keep_dir(entry)
            elif op is Op.LINK:
                target = _link_target(self.site, entry)
                self._ops.append((w.symlink, (entry, target, action.replaces)))
            elif op is Op.TRASH:
                self._ops.append((w.trash, (action.path,)))
            elif op is Op.REMOVE:
                self._ops.append((w.remove, (action.path, action.seen)))
            elif op is Op.STALE:
                if action.path in earlier:
                    # Removed before the writes that follow it, not at the end: on a disk
                    # it fills, they would fail first, at every run.
                    self._ops.append((w.drop_leftover, (action.path, True)))
                else:
                    self._stale.append(action.path)
        self.result.kept_files += kept
        if kept:
            self.progress.advance(kept, kept_bytes)
        self._submit_ops()
        await self._keep_up()

    def _finish_tree(self) -> None:
        """Directory attributes (after every write below them, children before parents)
        and leftover partial files."""
        w = self.writer
        assert w is not None
        self._check_ops()
        self.changed = True
        self._take_unlocked()
        ours = self._partials_of_versions(self._stale) if self._stale else set()
        for rel in self._stale:  # first: removing one changes its directory's mtime
            # Not ours: a killed stage's temporary, or a file a user gave a name like it:
            # as anything else the version does not have, never destroyed.
            w.drop_leftover(rel, rel in ours)
        dirs: Iterator[Entry] = iter(self._dirs)
        if self._dirs_overflow:
            dirs = (
                e for e in self.site.repo.iter_cached(self.refs, check=False) if e.kind == Kind.DIR
            )
        for entry in children_first(dirs):  # a parent's mode may close the way below it
            w.set_attrs(entry)
        w.restore_modes()  # directories made writable that the manifest gives no mode
        if self.site.config.transfer.fsync:
            _syncfs(w.root_fd)

    def _earlier_partials(self, stale: list[str]) -> set[str]:
        """Which of `stale` are partial files this stage will not resume, to remove as soon
        as the plan meets them: of the base's or the interrupted version's files that the
        target changed or dropped, and any of another user's or under the name of releases
        before (one for every user) of a file of any of the three. A stage that ran out of
        space writing such a file left it holding the space; the next stage would fail the
        same way before it reached its end, where such files were removed."""
        known = self._partials_of_versions(stale)
        mine = self._partials_of_versions(sorted(known), (self.refs,), (os.geteuid(),))
        return known - mine

    def _partials_of_versions(
        self,
        stale: list[str],
        versions: tuple[list[SegmentRef] | None, ...] | None = None,
        uids: tuple[int, ...] | None = None,
    ) -> set[str]:
        """Which of `stale` are the partial files (`fsops.partial_name`, known for every file)
        of a file of `versions` (default: the target, the base and the interrupted version)
        under the names of users `uids` (default: each file's owner's, and the one name of
        releases before, -1): datamover's, to remove; the rest go to the trash. Reads again
        only the segments that may hold the files of the directories `stale` names are in."""
        names = set(stale)
        if not names:
            return set()
        dirs = {sort_key(rel)[:-1] for rel in names}
        if uids is None:
            uids = (*{self._owner(rel) for rel in names}, -1)
        ours: set[str] = set()
        seen: list[list[SegmentRef]] = []
        if versions is None:
            versions = (self.refs, self.base_refs, self.interrupted_refs)
        for refs in versions:
            if not refs or any(refs is other for other in seen):
                continue
            seen.append(refs)
            near = [r for r in refs if any(_may_hold_children(r, d) for d in dirs)]
            if not near:
                continue
            entries = self._entries(refs) if len(near) == len(refs) else self._entries(near)
            for entry in entries:
                if entry.kind == Kind.FILE and sort_key(entry.path)[:-1] in dirs:
                    for uid in uids:
                        path = _partial_path(entry, uid)
                        if path in names:
                            ours.add(path)
        return ours

    def _owner(self, rel: str) -> int:
        """The owner of the file at `rel` (this process's user if it cannot be looked at)."""
        try:
            return os.lstat(self.root / rel).st_uid
        except OSError:
            return os.geteuid()

    def _take_unlocked(self) -> None:
        """On the writer thread, once the walk is over and no worker process writes: the
        directories the walk made readable, and those worker processes made writable, join
        those the writer made writable, to get their modes back at the end. The walk saw
        each before any write into it, so its mode before is the walk's; of the others, the
        first recorded is the mode before (a later one saw it made writable)."""
        assert self.writer is not None
        if self._walker is not None:
            self.writer.unlocked.update(self._walker.unlocked)
            self._walker.unlocked.clear()
        with self._from_workers_lock:
            for rel, mode in self._from_workers.items():
                self.writer.unlocked.setdefault(rel, mode)
            self._from_workers.clear()

    def _restore_modes(self) -> None:
        """On the writer thread, after a failure: every directory made readable or writable
        gets its mode back."""
        assert self.writer is not None
        if self._walker is not None and self._walker.unlocked:
            self.changed = True  # a mode the walk changed, given back below or not
        self._take_unlocked()
        if not self.writer.restore_modes():
            self.changed = True  # a directory left writable (or readable)

    def _open_root(self) -> int:
        """On the writer thread: open the dataset's directory, made (with the directories
        above it, up to the namespace's own) if missing, which is a change: an empty tree
        where there was none."""
        try:
            return fsops.open_root(self.base_path, self.parts, create=False)
        except FileNotFoundError:
            self.changed = True
            return fsops.open_root(self.base_path, self.parts)

    async def _settle(self) -> None:
        """Wait until no worker process or thread of the run can still change the tree, so
        `changed` is final (`untouched`)."""
        await _stop_procs(self._procs)
        self._pool.shutdown(wait=True)
        self._range_pool.shutdown(wait=True)
        self._settled = True

    async def run(self) -> StageResult:
        try:
            root_fd = await self._on_writer(self._open_root)
        except BaseException:
            # A dataset directory that cannot be opened (a symlink in the way, no
            # permission): a stage that changed nothing, unless it made directories.
            await self._settle()
            raise
        self.writer = fsops.TreeWriter(
            root_fd,
            self.root,
            self.trash_dir,
            sparse=self.site.config.transfer.sparse,
            trash_run=self.trash_run,
        )
        root_st = os.fstat(root_fd)
        self._root_mode = stat.S_IMODE(root_st.st_mode)
        self._root_id = (root_st.st_dev, root_st.st_ino)
        # Probed in the directory the walk lists first, so it never sees the probe's file.
        plan = self._planner(fsops.lazy_stored_mtime(root_fd))
        failed = False
        stopping = threading.Event()
        walking = threading.Lock()  # held while a thread walks (`next_actions`)

        def next_actions() -> list[Any]:
            """The next group of planned actions (in a thread); cut short once stopping."""
            group = []
            with walking:
                if stopping.is_set():
                    return group
                for action in itertools.islice(plan, _PLAN_BATCH):
                    group.append(action)
                    if stopping.is_set():
                        break
            return group

        reading = asyncio.ensure_future(asyncio.to_thread(next_actions))
        try:
            # Shielded: a cancel must not leave the walk running in its thread, where it
            # may still unlock a directory (`Walker.allow_unlock`), while the modes are
            # given back below.
            while actions := await asyncio.shield(reading):
                reading = asyncio.ensure_future(asyncio.to_thread(next_actions))
                await self._dispatch(actions)
            await self._flush()
            self._submit_ops()
            await asyncio.gather(*self._pending)
            await self._on_writer(self._finish_tree)
        except BaseException:
            failed = True
            stopping.set()  # the walk stops at its next entry, and is over once this returns
            await asyncio.gather(reading, return_exceptions=True)
            for fut in self._pending:
                fut.cancel()
            await asyncio.gather(*self._pending, return_exceptions=True)
            raise
        finally:
            await _stop_procs(self._procs)  # before modes are given back: none is writing
            if failed:  # directories made writable get their mode back, as on success
                with contextlib.suppress(OSError, DatamoverError):
                    await self._on_writer(self._restore_modes)
            # A walk cut short holds descriptors and threads. Not one still running in its
            # thread (a second cancel ended the wait for it above, and cancelled the task
            # but not the thread): the collector's then. Once stopping, no walk starts.
            if self._walker is not None and walking.acquire(blocking=False):
                try:
                    with contextlib.suppress(OSError, DatamoverError):
                        await self._on_writer(self._walker.close)
                finally:
                    walking.release()
            await self._on_writer(self.writer.close)
            await self._on_writer(os.close, root_fd)
            await self._settle()
        self.result.removed = self.writer.removed
        self.result.trashed = self.writer.trashed
        self.result.trashed_count = self.writer.trashed_count
        if self.writer.trashed_count:
            self.result.trash_dir = str(self.trash_dir)
        self.result.downloaded_bytes += self.fetcher.downloaded
        return self.result


#: Above every name a directory can hold (at most 255 bytes): the end of its children's keys.
_AFTER_NAMES = (chr(0x10FFFF) * 256,)


def _may_hold_children(ref: SegmentRef, parent: tuple[str, ...]) -> bool:
    """Whether segment `ref` may hold entries of directory `parent` (its sort key): its
    path range overlaps that of `parent`'s children."""
    return sort_key(ref.first_path) <= parent + _AFTER_NAMES and sort_key(ref.last_path) > parent


def _close_opened(done: asyncio.Future[Any]) -> None:
    """Close the descriptor `done` (an `open_seed` nobody waits for any more) opened."""
    if not done.cancelled() and done.exception() is None and done.result() is not None:
        os.close(done.result())


def _partial_path(entry: Entry, uid: int | None = None) -> str:
    """Where `entry`'s partial file (of user `uid`, default this process's) is, if it is
    large, relative to the tree."""
    parent, _ = fsops.split(entry.path)
    name = fsops.partial_name(entry, uid)
    return f"{parent}/{name}" if parent else name


def _copy_seeded(
    fd: int,
    source: int,
    entry: Entry,
    offsets: list[int],
    start: int,
    end: int,
    old_at: dict[bytes, int],
    turn: threading.Lock,
    sparse: bool,
    writing: Callable[[], None],
) -> tuple[set[int], int, bool]:
    """Copy into partial file `fd` the chunks `start:end` of `entry` that the old copy
    `source` holds (at `old_at[digest]`), each only if what is read there has its digest;
    return their indices, the bytes copied, and whether a chunk read did not have its
    digest (then it stops: the old copy is not the old version's). A read that fails ends
    the copying (the rest is fetched); a failed write raises, as `_write_chunk`'s
    does. All-zero chunks are left as holes with `sparse`, as fetched ones are."""
    copied: set[int] = set()
    nbytes = 0
    for i in range(start, end):
        chunk = entry.chunks[i]
        at = old_at.get(chunk.digest)
        if at is None:
            continue
        try:
            data = os.pread(source, chunk.raw_length, at)
        except OSError:
            break
        if len(data) != chunk.raw_length or blake3.blake3(data).digest() != chunk.digest:
            return copied, nbytes, True  # not what the old version held there: fetched
        if not (sparse and fsops.is_hole(data)):
            _write_chunk(fd, data, offsets[i], turn, writing)
        copied.add(i)
        nbytes += chunk.raw_length
    return copied, nbytes, False


def _write_chunk(
    fd: int, raw: bytes | memoryview, at: int, turn: threading.Lock, writing: Callable[[], None]
) -> int:
    """Write a verified chunk `raw` at offset `at` of `fd`, holding `turn`, after calling
    `writing()`; its length. (With `sparse`, the caller leaves an all-zero chunk unwritten,
    `fsops.is_hole`: the partial file was cut before the first chunk this run fetches, so
    the bytes there read as zeros, and `finish_partial` sets the size.)"""
    with turn:
        writing()
        return _pwrite_all(fd, raw, at)


class _FdClosed(Exception):
    """A write refused by `_FdUse` after its `close()`: no one waits for it any more."""


class _FdUse:
    """Threads writing to one descriptor (`with use:` around each write) until `close()`:
    from then on a write refuses to start (`_FdClosed`), and `close()` returns once those
    running are over, so the descriptor can be closed with no thread left to write into
    whatever file reuses its number (a cancelled stream's thread runs on for a moment)."""

    __slots__ = ("_active", "_closed", "_cond")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._cond:
            if self._closed:
                raise _FdClosed("the file was closed: its stage ended")
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def close(self) -> None:
        """No write starts from now on; return when none runs."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._active == 0)


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> int:
    """Write all of `data` at offset `at` of `fd` (`pwrite` may write less); its length."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return len(data)


Procs = asyncio.Future[ProcessPoolExecutor | None]


def _write_workers(t: TransferSettings, files: int) -> int:
    """How many writer processes a version of `files` files gets (0: the writer thread)."""
    if t.write_workers < 0 or files < _POOL_FILES:
        return 0
    return t.write_workers or (os.cpu_count() or 1)


def _start_procs(workers: int) -> ProcessPoolExecutor | None:
    try:
        return procpool.start(workers)
    except OSError as exc:  # no fork server here (a locked-down container): one thread
        log.warning("cannot start writer processes (%s); writing in this process", exc)
        return None


async def _stop_procs(procs: Procs | None) -> None:
    """Wait for every batch a worker has begun (none is writing once this returns)."""
    if procs is None:
        return
    done = await asyncio.gather(procs, return_exceptions=True)
    if isinstance(done[0], ProcessPoolExecutor):
        await asyncio.to_thread(done[0].shutdown, True, cancel_futures=True)


def _syncfs(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syncfs(fd) != 0:
        os.sync()


async def stage(
    site: Site,
    logical: str,
    *,
    version: str | None = None,
    delete: bool = False,
    checksum: bool = False,
    progress: Progress | None = None,
    pin: tuple[str, str] | None = None,
    force: bool | Literal["tenant"] = False,
    operator: bool = False,
) -> StageResult:
    """Stage `logical` (the latest version, or `version`) at this site's mapped path.

    Raises `Conflict` when another stage of the dataset runs (`locks.take_lock`, `_base`),
    and `Pinned` when pins other than `pin` (the caller's own `(pin id, tenant)`, which a
    requeued job holds already) hold the replica at another version: jobs are reading it
    (`pins.check_pins`), or would change files that jobs pinning a dataset nested with it
    read (`pins.check_nested_pins`). `force` overrides every pin; `"tenant"` only those of
    `pin`'s tenant (a token without `admin` scope cannot change the files under another
    tenant's jobs, as it cannot release their pins). `operator`: run in this process by
    the CLI, which holds the catalog: a refusal names every pin (`pins.holders`). Waits
    for pushes and verifies of it on
    this host to end, and for stages of datasets above or below it (`locks.take_nested`)."""
    started = time.monotonic()
    dataset = check_logical_path(logical)
    lock = await take_lock(site.state_dir, dataset)
    try:
        nested = await take_nested(site.state_dir, dataset)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    try:
        return await _stage(
            site, dataset, version, delete, checksum, progress, started, pin, force, operator
        )
    finally:
        for fd in nested:
            os.close(fd)
        if lock is not None:
            os.close(lock)


async def _stage(
    site: Site,
    dataset: str,
    version: str | None,
    delete: bool,
    checksum: bool,
    progress: Progress | None,
    started: float,
    pin: tuple[str, str] | None = None,
    force: bool | Literal["tenant"] = False,
    operator: bool = False,
) -> StageResult:
    """`stage`, holding the dataset's stage lock."""
    progress = progress or NoProgress()
    base_path, parts = site.config.namespace.split(dataset)
    root = base_path.joinpath(*parts)
    fsops.check_state_outside(site.state_dir, dataset, root)
    fsops.check_base(base_path)
    fetched_before = site.repo.fetched_bytes
    doc = await site.repo.resolve(dataset, version)
    overridden = await check_pins(
        site, doc, root, pin, force == "tenant", operator, forced=force is True
    )
    workers = _write_workers(site.config.transfer, doc.files)
    # Started now, they boot while the manifest is fetched and checked (0.15-0.2 s).
    procs = asyncio.ensure_future(asyncio.to_thread(_start_procs, workers)) if workers else None
    try:
        refs = await site.repo.prefetch(doc)
        checked = await asyncio.to_thread(_check_manifest, site, refs)
        if force is not True:  # before anything is written: jobs reading nested datasets
            await check_nested_pins(site, doc, root, refs, pin, force == "tenant", delete, operator)
        me = owner_id()
        base_version, base_refs, interrupted_refs = await _base(site, doc, root, refs, me)
        below = await overwritten_below(site, doc, root, refs, delete)
        # A tree with no time yet holds nothing known: should this stage not end, its rerun
        # reads every file before keeping it (what this stage wrote, and what was there).
        before = await site.catalog.begin_replica(
            dataset, str(root), doc.version, base_version, me, ctimes.NEVER
        )
        await site.catalog.mark_overwritten(below)  # before anything is written: crash-safe
        stager: _Stager | None = None
        try:
            progress.total(doc.files, doc.bytes)
            stager = _Stager(
                site,
                doc,
                refs,
                base_refs,
                interrupted_refs,
                root,
                base_path,
                parts,
                delete,
                checksum,
                progress,
                procs,
                checked,
                # Since when this tree held its base (kept while a stage of it was interrupted:
                # what that stage wrote is newer, and read before it is kept). A tree with no
                # record here: every file that looks like its entry is read before it is kept,
                # as a push reads every file of such a tree.
                before.held_since_ns
                if before is not None and before.root == str(root)
                else ctimes.NEVER_NS,
            )
            # Touched, so that a stage silent for long is known dead (`_silent`).
            touch = functools.partial(site.catalog.touch_replica, dataset, me)
            failed_touch = f"stage of {dataset}: could not touch its record"
            async with every(_TOUCH_EVERY, touch, failed_touch):
                result = await stager.run()
        except BaseException as exc:
            untouched = stager is None or stager.untouched
            try:
                await asyncio.shield(_record_failure(site, doc, me, before, untouched, below))
            except Exception:  # the original error is the one to report
                pass
            if _out_of_space(exc) and stager is not None and stager._stale:
                stale = stager._stale
                # Not the known ones: the target's own partial files are resumed by the
                # next run; removing them would free nothing it does not write again.
                try:
                    ours = await asyncio.to_thread(stager._partials_of_versions, stale)
                except Exception:  # the full disk is the error to report
                    ours = set(stale)
                full = _full_disk(exc, root, [rel for rel in stale if rel not in ours])
                if full is not None:
                    raise full from exc
            raise
        # The tree holds the version from now on; a change during the stage to a file it
        # had already passed, keeping size and mtime, is not seen (docs/design.md).
        held = await ctimes.after_writes(str(root), wrote=not stager.untouched)
        if not await site.catalog.finish_replica(
            dataset, doc.version, "ready", doc.files, doc.bytes, held, owner=me
        ):
            await site.catalog.finish_replica(dataset, doc.version, "failed", 0, 0)
            raise _taken_over(dataset)
        if overridden:
            await record_overridden(site, dataset, doc.version, overridden)
    finally:
        await _stop_procs(procs)
    result.downloaded_bytes += site.repo.fetched_bytes - fetched_before
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _taken_over(dataset: str) -> Conflict:
    """The error of a stage whose record another stage took over while it ran (it had not
    touched it for `_STALE_AFTER`: a host that stalled, or its clock): both may have
    written the tree, so neither records it ready."""
    return Conflict(
        f"another stage of {dataset!r} took this stage's record over while it ran (it had "
        f"not touched it for {int(_STALE_AFTER.total_seconds() // 60)} minutes); the tree "
        "may hold files of both, so it is recorded failed: stage again"
    )


def _silent(replica: ReplicaRow) -> bool:
    """Whether the stage of `replica` (`staging`) has not touched it for `_STALE_AFTER`."""
    touched = replica.updated_at
    if touched is None:
        return True
    if touched.tzinfo is None:  # SQLite keeps UTC without a zone
        touched = touched.replace(tzinfo=UTC)
    return datetime.now(UTC) - touched > _STALE_AFTER


def _owners(batch: list[_Fetch]) -> dict[bytes, str]:
    """Each chunk digest of `batch` and a file that needs it (for an error's message)."""
    return {c.digest: e.path for e, _ in batch for c in e.chunks}


def _out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a write refused for want of space or quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _full_disk(exc: BaseException, root: Path, stale: list[str]) -> DatamoverError | None:
    """For a stage that ran out of space (or quota) with files an interrupted stage left
    in the tree that it could not prove datamover's (`_Stager._earlier_partials` removes
    those it can): the error naming them and what they hold, so that a user knows what to
    remove to make room. None otherwise (the error stands as it is)."""
    if not isinstance(exc, OSError) or not _out_of_space(exc) or not stale:
        return None
    held, names = 0, []
    for rel in stale[:_HINT_FILES]:
        with contextlib.suppress(OSError):
            held += os.lstat(root / rel).st_blocks * 512
            names.append(rel)
    if not names:
        return None
    reason = exc.strerror or str(exc)
    where = f": {exc.filename!r}" if exc.filename is not None else ""
    more = f" ({len(stale)} in all)" if len(stale) > len(names) else ""
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return DatamoverError(
        f"{reason}{where}; {len(names)} file(s) left in the tree by interrupted stages hold "
        f"{human_bytes(held)}{more}: {shown}. They are kept, as not proven datamover's: "
        "remove them to make room"
    )


async def _record_failure(
    site: Site,
    doc: VersionDoc,
    me: str,
    before: ReplicaRow | None,
    untouched: bool,
    below: list[str],
) -> None:
    """Record a stage of `doc` that failed or was cancelled: `failed`, the tree may hold
    files of two versions (push refuses it); but one that changed nothing in the tree
    (`untouched`: the store was unreachable, a pack was corrupt, before the first write)
    gives the record back as it was (`before`), since the tree still is what it said, and
    the nested records it marked `overwritten` (`below`) their `ready`."""
    if untouched:
        await site.catalog.restore_replica(doc.dataset, doc.version, me, before)
        await site.catalog.unmark_overwritten(below)
    else:
        await site.catalog.finish_replica(doc.dataset, doc.version, "failed", 0, 0)


async def _base(
    site: Site, doc: VersionDoc, root: Path, refs: list[SegmentRef], me: str
) -> tuple[str | None, list[SegmentRef] | None, list[SegmentRef] | None]:
    """The version this site last completed at `root` and its segments: the base of the
    three-way merge (None when unknown); and the segments of the version a stage since then
    was bringing the tree to when it stopped, if any (it may have written some of its
    files). Raises `Busy` if a live stage holds the dataset: one whose owner is not known
    dead (`owner_alive`: on this host and PID namespace) and which touched its record
    within `_STALE_AFTER` (one of another host or namespace that died is taken over then)."""
    replica = await site.catalog.replica(doc.dataset)
    if (
        replica is not None
        and replica.state == "staging"
        and replica.owner not in (None, me)
        and owner_alive(replica.owner)
    ):
        if not _silent(replica):
            raise Busy(f"a stage of {doc.dataset!r} is already running ({replica.owner})")
        log.warning(
            "the stage of %s by %s has not touched its record since %s; taking it over",
            doc.dataset,
            replica.owner,
            replica.updated_at,
        )
    if replica is None or replica.root != str(root):
        return None, None, None
    base_version = replica.base_version
    interrupted = None
    if replica.state != "ready" and replica.version not in (base_version, doc.version):
        interrupted = await _segments(site, doc, refs, replica.version)
    if base_version is None:
        return None, None, interrupted
    return base_version, await _segments(site, doc, refs, base_version), interrupted


async def _segments(
    site: Site, doc: VersionDoc, refs: list[SegmentRef], version: str
) -> list[SegmentRef] | None:
    """The segments of `version` of `doc`'s dataset (`refs`, `doc`'s own, if it is `doc`),
    or None when it cannot be read: then every differing file is treated as the user's."""
    if version == doc.version:
        return refs
    try:
        return await site.repo.prefetch(await site.repo.read_version(doc.dataset, version))
    except (NotFound, Corrupt):
        return None
