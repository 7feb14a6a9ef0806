"""The push scanner: walk the local tree, merge it with the previous manifest, read what changed.

Runs in a worker thread. Produces a stream of *pieces* in tree order: `NewChunk` carries one
encoded chunk of the file being read, `Done` closes an entry. A file's `NewChunk`s come
before its `Done`, so a multi-GiB file flows through in chunk-sized pieces. Where the walk
finds every entry of a previous segment the stream marks (a `SegmentRef` before its
entries) unchanged, and nothing between them, the segment comes as one `SameSegment`
instead of a `Done` each: a re-push of a tree that changed little handles most of it a
segment, not an entry, at a time.

A file is "unchanged" when size and mtime equal the previous entry's (unless `checksum`) and,
where the site knows since when its tree held that version (`changed_since_ns`), its ctime is
earlier: it is then not opened at all. The ctime catches what size and mtime cannot, a file
replaced by other bytes of its size under its old mtime (`cp -p`, `rsync -a`, archives with
fixed times, a rename over it). An mtime that is the previous one as a file system of coarser
timestamps stores it counts as equal (`coarsened`), and the entry, a directory's or a
symlink's too, keeps the previous mtime. Files to read are batched; once a push has read
enough of them to be worth it, batches go to a pool of worker processes
(`readers.read_batch`) while the walk goes on, and results are consumed in order. Large files
are read here, streaming.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.domain.paths import check_symlink_target, shown, sort_key
from datamover.errors import Conflict, InvalidInput
from datamover.repo.manifest import MAX_FILE_CHUNKS, MAX_STR, MTIME_MAX, MTIME_MIN, SegmentRef
from datamover.transfer import ctimes, procpool, readers
from datamover.transfer.readers import FileRead, NewChunk, ReadProblem, TreeRoot
from datamover.transfer.statahead import THREADS
from datamover.transfer.walk import LocalEntry, Walker

log = logging.getLogger(__name__)

__all__ = [
    "Done",
    "NewChunk",
    "Passed",
    "Previous",
    "SameSegment",
    "ScanStats",
    "Scanner",
    "Unchanged",
]

_BATCH_FILES = 256
_BATCH_BYTES = 4 << 20
_POOL_AFTER = 256  # files read in-process before reader processes are worth starting
#: Previous segments (of up to 8,192 entries each, by default) a re-push needs before the
#: fork server is worth starting for `Scanner.check_ahead` (0.2-0.3 s here, about as long as
#: two segments take to walk, or a no-op push of 20,000 files).
_CHECKS_COLD = 8

#: Timestamp granularities of file systems in use, in nanoseconds: NTFS and SMB 100 ns, NFS
#: servers of microsecond times 1 µs, exFAT 10 ms, Lustre, ext3 and ext4 with 128-byte
#: inodes 1 s, FAT 2 s. Ascending.
GRANULES = (100, 1_000, 10_000_000, 1_000_000_000, 2_000_000_000)


@dataclass(slots=True)
class Done:
    """An entry is complete. `digests` lists a read file's chunks in order; for anything
    else (and for unchanged files, whose `entry.chunks` are reused) it is None. `same` is
    True when the entry equals the previous manifest's entry at its path in every field."""

    entry: Entry
    digests: list[bytes] | None = None
    same: bool = False


@dataclass(slots=True)
class SameSegment:
    """Every entry of previous segment `ref`, in order, found unchanged: equal to its
    entry in every field, with no entry of the walk between them that the segment lacks.
    `entries` are the previous entries themselves, or None where a worker process found
    the segment unchanged (`segcheck`): `found` then says what they hold, and the entries
    are in the manifest cache."""

    ref: SegmentRef
    entries: list[Entry] | None
    found: Unchanged | None = None

    def counts(self) -> tuple[int, int, int, int]:
        """How many of the entries are files, directories and symlinks, and the files'
        bytes (from the entries: the list line of the tree's last segment is never checked
        against it, as the walk ends first)."""
        if self.entries is None:
            assert self.found is not None
            return self.found.files, self.found.dirs, self.found.symlinks, self.found.bytes
        files = dirs = nbytes = 0
        for e in self.entries:
            if e.kind == Kind.FILE:
                files += 1
                nbytes += e.size
            elif e.kind == Kind.DIR:
                dirs += 1
        return files, dirs, len(self.entries) - files - dirs, nbytes


class Passed:
    """The previous segments the walk passed over, found unchanged by workers
    (`Scanner.check_ahead`), by their place in the previous version's list: the previous
    stream (`push._previous`) skips their entries, the rest of one it is in too, and reads
    every other segment to its end as a walk without workers does (which checks it against
    its line in the list). Held as runs of consecutive places, those the stream is past
    dropped: a no-op re-push passes over every segment without the stream moving, one run.
    `moves` counts the passes, for the stream to look again only when it moved."""

    def __init__(self) -> None:
        self._runs: deque[list[int]] = deque()  # [first, last] places, ascending
        self.moves = 0

    def move(self, place: int) -> None:
        """The walk passed over the segment at `place` (after every one it passed before)."""
        if self._runs and self._runs[-1][1] == place - 1:
            self._runs[-1][1] = place
        else:
            self._runs.append([place, place])
        self.moves += 1

    def covers(self, place: int) -> bool:
        """Whether the segment at `place` was passed over; the stream asks in ascending
        order, and what it is past is dropped."""
        runs = self._runs
        while runs and runs[0][1] < place:
            runs.popleft()
        return bool(runs) and runs[0][0] <= place


@dataclass(frozen=True, slots=True)
class Unchanged:
    """What a push needs of a previous segment a worker process found unchanged
    (`segcheck.check`) without its entries: their counts (`SameSegment.counts`), and the
    furthest end of a chunk in each pack they use (`ReuseCheck.ends`)."""

    files: int
    dirs: int
    symlinks: int
    bytes: int
    ends: tuple[tuple[bytes, int], ...]


@dataclass(slots=True)
class Previous:
    """The chunks the previous version had for the file whose `NewChunk`s follow (every
    file read again that the previous version had, small or large): where one of them
    comes again, the push refers to it there instead of uploading it (the site's chunk
    index knows only what this site pushed, not what it staged)."""

    chunks: tuple[ChunkRef, ...]


@dataclass
class ScanStats:
    """What the scanner did, for the push summary."""

    files_read: int = 0
    bytes_read: int = 0
    files_unchanged: int = 0
    skipped_special: list[str] = field(default_factory=list)
    skipped_special_count: int = 0
    skipped_partial: list[str] = field(default_factory=list)
    skipped_partial_count: int = 0


def root_moved(path: str) -> Conflict:
    """The error of a push whose dataset directory, at `path`, is no longer the directory
    it started with (`readers.RootMoved`): what the walk listed and what the readers would
    read are not one tree, or not the dataset's."""
    return Conflict(
        f"the dataset's directory {path!r} was replaced while push read it (renamed, "
        "removed, or a symlink or another directory put in its place); nothing was "
        "published (run push again once the tree is quiet)",
        [path],
    )


def _problem(p: ReadProblem) -> Exception:
    if p.kind == "moved":
        return root_moved(p.detail)
    if p.kind == "denied":
        return InvalidInput(f"cannot read {p.detail!r}: permission denied", [p.path])
    if p.kind == "vanished":
        what = "vanished"
    elif p.kind == "type":
        what = "changed type"
    else:
        what = f"changed while it was read ({readers.ATTEMPTS} attempts)"
    return Conflict(
        f"{p.path!r} {what}; nothing was published (run push again once the tree is quiet)",
        [p.path],
    )


def _when(mtime_ns: int) -> str:
    """`mtime_ns` as a UTC time to the second, for a message."""
    seconds = mtime_ns // 1_000_000_000
    try:
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    except OverflowError:  # beyond year 9999 (or before year 1)
        return f"{seconds} s from 1970-01-01T00:00:00Z"
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _abridged(path: str) -> str:
    """A path too long for a message, as its first and last components."""
    parts = path.split("/")
    return "/".join([*parts[:2], "...", *parts[-2:]]) if len(parts) > 4 else path[:400]


def check_storable(entry: Entry) -> None:
    """Refuse, naming it, an entry of the walk that a manifest cannot hold, so that no
    version is published that no reader accepts (`repo.manifest.encode_entry` refuses it
    too, as a last line). What the walk produces can break two rules only: an mtime (a
    file's, a directory's or a symlink's) outside a signed 64-bit count of nanoseconds,
    and a path longer than a reader takes (a tree some 260 directories deep: the walk
    opens each from its parent, so no `PATH_MAX` stops it). A mode is permission bits
    (`S_IMODE`), a size an `off_t`, a symlink's target at most 4,095 bytes
    (`check_symlink_target`); chunks are datamover's own."""
    path = entry.path
    if len(path) > MAX_STR // 4 and len(path.encode()) > MAX_STR:
        raise InvalidInput(
            f"path {_abridged(path)!r} ({path.count('/') + 1} components) is "
            f"{len(path.encode())} bytes long, more than a manifest can hold ({MAX_STR}); "
            "make the tree shallower or its names shorter and push again",
            [path],
        )
    if not MTIME_MIN <= entry.mtime_ns <= MTIME_MAX:
        touch = "touch -h" if entry.kind == Kind.SYMLINK else "touch"
        raise InvalidInput(
            f"mtime of {entry.path!r} is {_when(entry.mtime_ns)}, outside what a manifest "
            f"can hold (1677-09-21..2262-04-11); give it another time ({touch}) and push "
            "again",
            [entry.path],
        )


def _too_many_chunks(path: str, known: str = "") -> InvalidInput:
    """The one-line error for file `path`, which has more chunks than a manifest can hold
    for one file (`known`: how its size alone shows it)."""
    return InvalidInput(
        f"{shown(path)} has more chunks than a manifest can hold for one file "
        f"({MAX_FILE_CHUNKS}){known}; split it into smaller files and push again",
        [path],
    )


def coarsened(local_ns: int, previous_ns: int) -> bool:
    """Whether mtime `local_ns` is `previous_ns` as a file system of coarser timestamps
    stores it: cut down (towards minus infinity, as the kernel cuts) to a whole multiple of
    one of `GRANULES`. False when the two are equal (the caller compares that first).

    Stage sets each mtime from the manifest, in nanoseconds, and such a file system keeps
    less: without this, the first push after a stage read every file again and published a
    version differing only in cut mtimes. Push may not write in the tree, so it cannot probe
    the file system's granularity as stage and verify do (`fsops.stored_mtime`); any of
    `GRANULES` is accepted instead. A later mtime is never such a cut; an earlier one may
    hide a change that kept the size (docs/design.md, "Push"), which `checksum` sees."""
    below = previous_ns - local_ns
    if not 0 < below < GRANULES[-1]:
        return False
    return any(below < granule and local_ns % granule == 0 for granule in GRANULES)


def _mtime(local_ns: int, previous: Entry | None, kind: Kind) -> int:
    """The mtime to record for a directory or symlink of mtime `local_ns`: the previous
    entry's at its path where it is of that kind and `local_ns` is its mtime `coarsened`."""
    if (
        previous is None
        or previous.mtime_ns == local_ns
        or previous.kind != kind
        or not coarsened(local_ns, previous.mtime_ns)
    ):
        return local_ns
    return previous.mtime_ns


def _read_mtime(mtime_ns: int, size: int, digests: list[bytes], prev: Entry | None) -> int:
    """The mtime to record for a file read with mtime `mtime_ns`: the previous entry's where
    the file holds the previous content (same size and chunk digests) and `mtime_ns` is the
    previous mtime `coarsened`, as for a file not read (so a push that reads every file,
    `checksum` or a tree not known to hold the previous version, publishes no new version
    that differs only in the mtimes a coarser file system cut)."""
    if (
        prev is None
        or prev.size != size
        or prev.mtime_ns == mtime_ns
        or not coarsened(mtime_ns, prev.mtime_ns)
        or [c.digest for c in prev.chunks] != digests
    ):
        return mtime_ns
    return prev.mtime_ns


class Scanner:
    """Produces pieces for the tree at `root`, merged with `previous` (sorted entries; a
    `SegmentRef` before the entries of a segment marks them as all of that segment, which
    lets them come as one `SameSegment` when the walk finds them unchanged).

    The walk and every reader open `root` with `readers.open_root`: a directory there that
    is not the one the push started with is `Conflict` (`root_moved`), and nothing of it is
    read.

    `workers` is the number of reader processes to use for many small files (0: none).
    `links` turns a symlink target read from disk into its stored form
    (`Namespace.link_to_logical`). `changed_since_ns`: the time (ns since the epoch) from
    which the tree is known to hold the previous version; a file whose ctime is not before
    it is read, whatever its size and mtime (None: size and mtime decide). Call `close`
    when done.
    """

    def __init__(
        self,
        root: TreeRoot,
        previous: Iterator[Entry | SegmentRef],
        params: ChunkerParams,
        checksum: bool = False,
        zstd_level: int | None = 3,
        workers: int = 0,
        links: Callable[[str], str] = str,
        changed_since_ns: int | None = None,
        lookup_threads: int = THREADS,
    ) -> None:
        self.root = root
        self.links = links
        self.changed_since_ns = changed_since_ns
        self._resumed_until: tuple[str, ...] | None = None
        self._resumed_since_ns = 0
        self.walker = Walker(
            root.path,
            strict=True,
            stat_files=False,
            open_root=self._open_root,
            lookup_threads=lookup_threads,
        )
        self._lookup_threads = lookup_threads
        self.previous = previous
        self.params = params
        self.checksum = checksum
        self.level = zstd_level
        self.workers = workers
        self.chunker = Chunker(params)
        self.stats = ScanStats()
        self._prev: Entry | None = None
        self._prev_key: tuple[str, ...] = ()
        self._segment: SegmentRef | None = None  # the marked segment `_prev` is in, if any
        self._taken = 0  # previous entries taken from the stream since its last mark
        self._pool: ProcessPoolExecutor | None = None
        self._queued_reads = 0
        self._window = 2 * workers + 1  # read batches in flight at most
        # A moving mean of the sizes of the small files read last (large ones are streamed,
        # not batched): what a file walked without its size (`UNKNOWN`, a first push)
        # counts towards a batch's `_BATCH_BYTES`.
        self._typical = 0
        # The previous entry of each file planned for a read that the previous version
        # had as a file, until read: at most the files `_generate` holds in flight.
        self._previous_files: dict[str, Entry] = {}
        # `check_ahead`: the segments still to hand to a worker, those being checked by
        # their first path, how to find one in the manifest cache, and how far the walk
        # passed over them (the previous stream's to skip).
        self._to_check: deque[tuple[int, SegmentRef]] = deque()  # (place in the list, ref)
        self._checking: dict[str, tuple[int, SegmentRef, Future[Unchanged | None]]] = {}
        self._cache_file: Callable[[bytes], str] = str
        self._passed = Passed()
        self._checks_started = False
        self._pieces = self._generate()

    def _open_root(self) -> int:
        """The walk's way into the tree (`readers.open_root`, its change a `Conflict`)."""
        try:
            return readers.open_root(self.root)
        except readers.RootMoved:
            raise root_moved(self.root.path) from None

    def close(self) -> None:
        """Close what the scan holds open, the walk's directory descriptors (one per level)
        and a large file being read, and stop the worker processes, if any. Idempotent.
        Both sit in reference cycles (the pieces' generator and this scanner), so without
        this a failed push kept them open until a full garbage collection, which a
        long-running daemon does seldom. While `next_batch` still runs in another thread
        (its caller gave up waiting for it), they are left to it."""
        try:
            self._pieces.close()  # runs the `finally` of a large file's read
        except ValueError:
            pass  # "generator already executing": closing under it would pull fds away
        else:
            self.walker.close()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None

    def next_batch(self, max_pieces: int = 4096, max_bytes: int = 8 << 20) -> list[object]:
        """Up to `max_pieces` pieces (a `SameSegment` counting as its entries) or about
        `max_bytes` of chunk data; [] at the end."""
        batch: list[object] = []
        size = held = 0
        try:
            for piece in self._pieces:
                batch.append(piece)
                held += 1
                if isinstance(piece, NewChunk):
                    size += piece.raw_length
                elif isinstance(piece, Done):  # every entry of the tree, of every kind
                    check_storable(piece.entry)
                elif isinstance(piece, SameSegment):  # stored before: storable
                    held += piece.ref.entries - 1
                if held >= max_pieces or size >= max_bytes:
                    break
        except BrokenProcessPool:
            raise procpool.lost("reader") from None
        self.stats.skipped_special = self.walker.skipped_special
        self.stats.skipped_special_count = self.walker.skipped_special_count
        self.stats.skipped_partial = self.walker.skipped_partial
        self.stats.skipped_partial_count = self.walker.skipped_partial_count
        return batch

    def check_ahead(
        self, refs: list[SegmentRef], cache_file: Callable[[bytes], str], passed: Passed
    ) -> None:
        """Have the worker processes look ahead of the walk for previous segments found
        unchanged (`segcheck.check`): `refs` are the segments the previous stream marks,
        all of them, in order, each to be found in the manifest cache at
        `cache_file(digest)`. The walk passes over a segment a worker found unchanged
        without looking at its entries, and adds its place in `refs` to `passed`: the
        previous stream must then skip its entries (`push._previous`). One the walk reaches before
        a worker took it is walked here. The workers start once the walk has found a
        segment unchanged itself (`_start_checks`). Not with `checksum` (every file is
        read), nor without workers, nor for fewer than two segments, nor,
        where the fork server is not running yet (a command, not a daemon), for fewer than
        `_CHECKS_COLD` (its start-up takes longer than walking them here)."""
        if self.checksum or self.workers < 1 or len(refs) < 2:
            return
        if len(refs) < _CHECKS_COLD and not procpool.is_warm():
            return
        self._to_check = deque(enumerate(refs))  # handed out by `_start_checks`, on the walk
        self._cache_file = cache_file
        self._passed = passed

    def _start_checks(self, found: SegmentRef) -> None:
        """The walk found segment `found` unchanged itself: if it is the first, hand the
        segments after the next one to the workers (`check_ahead`), starting them. Not
        before: where every segment has a change (1% of a tree's files rewritten, spread
        over it), starting workers that find none unchanged only costs. Where no fork
        server can run, the walk goes through every segment itself."""
        if not self._to_check or self._checks_started:
            return
        self._checks_started = True
        last = sort_key(found.last_path)
        while self._to_check and sort_key(self._to_check[0][1].first_path) <= last:
            self._to_check.popleft()
        if self._to_check:
            self._to_check.popleft()  # the walk is at it next: no worker would be sooner
        try:
            self._top_up()
        except Exception as exc:  # no fork server, or it cannot fork (EAGAIN, ENOMEM)
            log.info("%s: no worker processes (%r); walking every segment", self.root.path, exc)
            self._to_check.clear()
            self._checking.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _top_up(self) -> None:
        """Hand segments to the workers until two for each are being checked."""
        from datamover.transfer import segcheck  # it builds on this module

        while self._to_check and len(self._checking) < 2 * self.workers:
            place, ref = self._to_check.popleft()
            if self._pool is None:
                self._pool = procpool.start(self.workers)
            future = self._pool.submit(
                segcheck.check,
                self.root,
                self._cache_file(ref.digest),
                ref,
                self.params,
                self.links,
                self.changed_since_ns,
                self._lookup_threads,
            )
            self._checking[ref.first_path] = (place, ref, future)

    def _passed_over(self, first: tuple[str, ...]) -> None:
        """The walk is past every path before sort key `first`: a segment handed out
        whose first path sorts before it will never be met (gone, or no longer what the
        walk yields), and makes room for another."""
        while self._checking:
            path = next(iter(self._checking))
            if sort_key(path) >= first:
                break
            self._checking.pop(path)[2].cancel()
        self._top_up()

    def _checked(self, path: str) -> SameSegment | None:
        """The walk is at `path`, the first of a segment handed to a worker: the segment
        as one `SameSegment` if the worker found it unchanged, the walk and the previous
        stream moved past it; None to walk it here (not unchanged, or still waiting for a
        worker)."""
        place, ref, future = self._checking.pop(path)
        self._top_up()
        if future.cancel():  # no worker took it yet: no sooner done there than here
            return None
        try:
            found = future.result()
        except BrokenProcessPool:
            raise procpool.lost("reader") from None
        except Exception as exc:  # a bug of the check's: the walk here knows what is there
            log.warning("checking a segment from %s failed (%r); walking it", path, exc)
            return None
        if found is None:
            return None
        self._stream_to(ref)
        self.walker.skip(sort_key(ref.last_path), inclusive=True)
        self._passed.move(place)
        self.stats.files_unchanged += found.files
        return SameSegment(ref, None, found)

    def _stream_to(self, ref: SegmentRef) -> None:
        """Take from the previous stream what comes before segment `ref`, whose first
        path the walk is at, as the walk would on its way there: each segment before it
        that no worker passed over is read to its end (where it is checked against its
        line in the list, `Repository.iter_cached`), up to `ref`'s mark."""
        if self._segment is not None and self._segment.digest == ref.digest:
            return  # in it already (its first entry is `_prev`)
        self._prev = None  # whatever is held sorts before the walk: gone from the tree
        while (got := next(self.previous, None)) is not None:
            if isinstance(got, SegmentRef):
                self._segment, self._taken = got, 0
                if got.digest == ref.digest:
                    return
                if self._checking:
                    self._passed_over(sort_key(got.first_path))
            # an entry before `ref`: gone from the walk, dropped as `_previous_for` does

    def whole(self) -> SameSegment | None:
        """The pieces of this scan if they are one `SameSegment`, else None (at the first
        piece that shows they are not). For `segcheck`, whose scan is of one segment."""
        pieces = self._plan()
        first = next(pieces, None)
        if not isinstance(first, SameSegment) or next(pieces, None) is not None:
            return None
        return first

    def resume_cutoff(self, until: tuple[str, ...], since_ns: int) -> None:
        """The previous entries up to sort key `until` are an interrupted run's, which
        walked the tree from `since_ns` on: a file among them is read if its ctime is not
        before that, instead of `changed_since_ns`."""
        self._resumed_until, self._resumed_since_ns = until, since_ns

    def _changed_since(self, path: str) -> int | None:
        """The ctime from which the file at `path` counts as changed since its previous
        entry was made (None: size and mtime tell)."""
        if self._resumed_until is not None and sort_key(path) <= self._resumed_until:
            return self._resumed_since_ns
        return self.changed_since_ns

    # -- merge ------------------------------------------------------------------------

    def _previous_for(self, path: str) -> Entry | None:
        """The previous entry at `path`, advancing the sorted previous stream to it (the
        walk asks for each path once, in order, so a match is consumed)."""
        while True:
            prev = self._prev
            if prev is None:
                got = next(self.previous, None)
                if isinstance(got, SegmentRef):
                    self._segment, self._taken = got, 0
                    if self._checking:  # the walk is past the segments before this one
                        self._passed_over(sort_key(got.first_path))
                    continue
                if got is None:
                    return None
                prev = self._prev = got
                self._taken += 1
                self._prev_key = ()
            if prev.path == path:  # the common case in a re-push: no sort keys needed
                self._prev = None
                return prev
            if not self._prev_key:
                self._prev_key = sort_key(prev.path)
            if self._prev_key < sort_key(path):
                self._prev = None
                continue
            return None

    def _plan(self) -> Iterator[Done | SameSegment | LocalEntry]:
        """Entries needing no read as `Done`, or as `SameSegment` where they are a marked
        previous segment, unchanged; files to read as their `LocalEntry`.

        The entries of a segment are held until its last one, and no longer than the
        previous stream is in it (at most a segment's worth, as its reader holds): a
        segment is whole when the run of unchanged entries starts at its first path, ends
        at its last and counts its entries (the previous stream is sorted and has no
        duplicates)."""
        run: list[Entry] | None = None  # unchanged entries from the first of `segment`
        segment: SegmentRef | None = None
        for piece in self._compare():
            if not isinstance(piece, Entry):  # a change: what was held goes out as it was
                if run:
                    yield from (Done(e, None, True) for e in run)
                run = None
                yield piece
                continue
            if run is not None and (
                self._segment is not segment or self._taken > len(run) + 1
            ):  # the stream left the segment or skipped an entry of it: one is gone
                yield from (Done(e, None, True) for e in run)
                run = None
            if run is None:
                segment = self._segment
                if segment is None or piece.path != segment.first_path:
                    yield Done(piece, None, True)
                    continue
                run = []
            run.append(piece)
            assert segment is not None
            if piece.path == segment.last_path:
                if len(run) == segment.entries:
                    self._start_checks(segment)
                    yield SameSegment(segment, run)
                else:  # an entry of the segment is gone
                    yield from (Done(e, None, True) for e in run)
                run = None
        if run:
            yield from (Done(e, None, True) for e in run)

    def _compare(self) -> Iterator[Entry | Done | LocalEntry | SameSegment]:
        """The walk merged with the previous stream: an entry equal to its previous entry
        in every field as that previous `Entry`, any other needing no read as `Done`, a
        file to read as its `LocalEntry`, a segment a worker found unchanged as one
        `SameSegment` (`check_ahead`)."""
        for local in self.walker:
            if self._checking and local.path in self._checking:
                same = self._checked(local.path)
                if same is not None:
                    yield same
                    continue
            if local.kind == Kind.DIR:
                prev = self._previous_for(local.path)
                mtime = _mtime(local.mtime_ns, prev, Kind.DIR)
                entry = Entry(local.path, Kind.DIR, local.mode, mtime)
                yield prev if prev is not None and entry == prev else Done(entry)
                continue
            if local.kind == Kind.SYMLINK:
                target = self.links(local.target or "")
                check_symlink_target(local.path, target)
                prev = self._previous_for(local.path)
                entry = Entry(
                    local.path,
                    Kind.SYMLINK,
                    local.mode,
                    _mtime(local.mtime_ns, prev, Kind.SYMLINK),
                    len(target.encode()),
                    target,
                )
                yield prev if prev is not None and entry == prev else Done(entry)
                continue
            prev = self._previous_for(local.path)
            if (
                prev is not None
                and not self.checksum
                and prev.kind == Kind.FILE
                and self.walker.fill(local)
                and prev.size == local.size
                and (prev.mtime_ns == local.mtime_ns or coarsened(local.mtime_ns, prev.mtime_ns))
                and ctimes.unchanged_since(local.ctime_ns, self._changed_since(local.path))
            ):
                self.stats.files_unchanged += 1
                if local.mode == prev.mode:
                    yield prev
                else:
                    yield Done(
                        Entry(
                            local.path,
                            Kind.FILE,
                            local.mode,
                            prev.mtime_ns,
                            local.size,
                            None,
                            prev.chunks,
                        )
                    )
            else:
                if prev is not None and prev.kind == Kind.FILE:
                    self._previous_files[local.path] = prev
                yield local

    # -- reading ----------------------------------------------------------------------

    def _submit(self, items: list[Any]) -> tuple[str, list[Any], Future[Any] | None]:
        jobs = [i.path for i in items if isinstance(i, LocalEntry)]
        self._queued_reads += len(jobs)
        if self.workers and jobs and self._queued_reads > _POOL_AFTER:
            if self._pool is None:
                # All started at once: reads of a cold tree wait on the disk, and several in
                # flight is what keeps it busy.
                self._pool = procpool.start(self.workers)
            future = self._pool.submit(
                readers.read_batch, self.root, jobs, self.params, self.level, _BATCH_BYTES
            )
            return ("pool", items, future)
        return ("here", items, None)

    def _emit(self, item: Any, result: FileRead | ReadProblem) -> Iterator[object]:
        if isinstance(result, ReadProblem):
            if result.kind == "large":
                yield from self._read_large(item)
                return
            raise _problem(result)
        prev = self._previous_files.pop(item.path, None)
        if prev is not None and prev.chunks:
            yield Previous(prev.chunks)
        yield from result.chunks
        self.stats.files_read += 1
        self.stats.bytes_read += result.size
        self._typical += (result.size - self._typical) >> 4  # the last few dozen files
        digests = [c.digest for c in result.chunks]
        mtime = _read_mtime(result.mtime_ns, result.size, digests, prev)
        entry = Entry(item.path, Kind.FILE, result.mode, mtime, result.size)
        yield Done(entry, digests)

    def _consume(self, slot: tuple[str, Any, Any]) -> Iterator[object]:
        kind, items, future = slot
        if kind == "large":
            yield from self._read_large(items)
            return
        results = iter(future.result()) if future is not None else None
        got = held = 0
        for at, item in enumerate(items):
            if not isinstance(item, LocalEntry):  # `Done`, `SameSegment`
                yield item
            elif results is not None:
                result = next(results, None)
                if result is None:  # the batch reached its byte budget: the rest in others
                    mean = held // max(got, 1) or 1
                    yield from self._consume_rest(items[at:], _BATCH_BYTES // mean)
                    return
                read = readers.from_wire(result)
                if not isinstance(read, ReadProblem):
                    got, held = got + 1, held + read.size
                yield from self._emit(item, read)
            else:
                yield from self._emit(
                    item, readers.read_whole(self.root, item.path, self.chunker, self.level)
                )

    def _consume_rest(self, rest: list[Any], per: int) -> Iterator[object]:
        """Read what a batch left unread, in batches of `per` files (or at least one), as
        many in flight as `_generate` keeps, and yield their pieces in order."""
        flight: deque[tuple[str, Any, Any]] = deque()
        piece: list[Any] = []
        jobs = 0
        for item in rest:
            if isinstance(item, LocalEntry):
                if jobs >= max(per, 1):
                    flight.append(self._submit(piece))
                    piece, jobs = [], 0
                    if len(flight) >= self._window:
                        yield from self._consume(flight.popleft())
                jobs += 1
            piece.append(item)
        if piece:
            flight.append(self._submit(piece))
        while flight:
            yield from self._consume(flight.popleft())

    def _read_large(self, local: LocalEntry) -> Iterator[object]:
        """Stream a large file's chunks. One with more chunks than a manifest holds for a
        file (`MAX_FILE_CHUNKS`) is refused, naming it: before it is read when its size
        alone proves it (at the chunker's largest chunk), else as its count passes the
        bound; either way before its entry reaches a segment, which the encoder would
        refuse only once every chunk was uploaded. The previous version's chunks of the
        file, if it had any, come first (`Previous`)."""
        prev = self._previous_files.pop(local.path, None)
        if prev is not None and prev.chunks:
            yield Previous(prev.chunks)
        for _ in range(readers.ATTEMPTS):
            fd = readers.open_file(self.root, local.path)
            if isinstance(fd, ReadProblem):
                raise _problem(fd)
            try:
                st, largest = os.fstat(fd), self.params.max_size
                if not stat.S_ISREG(st.st_mode):
                    raise _problem(ReadProblem("type", local.path))
                st = readers.settled(fd, st)
                size = st.st_size
                least = -(-size // largest)
                if least > MAX_FILE_CHUNKS:
                    known = f": {size} bytes, at least {least} chunks of at most {largest} bytes"
                    raise _too_many_chunks(local.path, known)
                digests: list[bytes] = []
                mode, mtime_ns, size = yield from self._chunks(fd, st, local.path, digests)
            except readers.Torn:
                continue  # chunks already sent are harmless: unreferenced or deduplicated
            finally:
                os.close(fd)
            self.stats.files_read += 1
            self.stats.bytes_read += size
            mtime_ns = _read_mtime(mtime_ns, size, digests, prev)
            yield Done(Entry(local.path, Kind.FILE, mode, mtime_ns, size), digests)
            return
        raise _problem(ReadProblem("changed", local.path))

    def _chunks(
        self, fd: int, st: os.stat_result, path: str, digests: list[bytes]
    ) -> Generator[NewChunk, None, tuple[int, int, int]]:
        """`readers.read_open`, refusing the file at the chunk that passes `MAX_FILE_CHUNKS`
        (before that chunk goes on to a pack)."""
        reader = readers.read_open(fd, st, self.chunker, self.level, digests)
        while True:
            try:
                chunk = next(reader)
            except StopIteration as end:
                return end.value
            if len(digests) > MAX_FILE_CHUNKS:
                raise _too_many_chunks(path)
            yield chunk

    def _generate(self) -> Iterator[object]:
        queue: deque[tuple[str, Any, Any]] = deque()
        items: list[Any] = []
        jobs = nbytes = held = 0  # `held`: entries in `items`
        window = self._window
        small = self.params.small_file_limit

        def ready() -> bool:
            head = queue[0][2]
            pooled = sum(1 for s in queue if s[2] is not None)
            return head is None or head.done() or pooled >= window or len(queue) > 4 * window

        for item in self._plan():
            if isinstance(item, LocalEntry) and item.size > small:
                if items:
                    queue.append(self._submit(items))
                    items, jobs, nbytes, held = [], 0, 0, 0
                queue.append(("large", item, None))
            else:
                items.append(item)
                held += item.ref.entries if isinstance(item, SameSegment) else 1
                if isinstance(item, LocalEntry):
                    jobs += 1
                    nbytes += item.size if item.size >= 0 else self._typical
                if jobs >= _BATCH_FILES or nbytes >= _BATCH_BYTES or held >= 4096:
                    queue.append(self._submit(items))
                    items, jobs, nbytes, held = [], 0, 0, 0
            # Keep the pool busy: wait on the head only when enough batches are in flight.
            while queue and ready():
                yield from self._consume(queue.popleft())
        if items:
            queue.append(self._submit(items))
        while queue:
            yield from self._consume(queue.popleft())
