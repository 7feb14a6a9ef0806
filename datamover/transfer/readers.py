"""Reading files into encoded chunks: the CPU-heavy part of push.

Runs in the scanner's thread for a few files or a large one (streaming), and in worker
processes for many small files (`read_batch`), because reading, hashing and compressing
thousands of 4 KiB files per second is Python-bound and the GIL would serialise threads.
This module imports only what that needs, so a worker starts fast.

A file is read between two `fstat`s; if size, mtime or ctime differ, or the bytes read do
not add up to the size, the read is torn and retried (twice at most), then reported: a torn
file is never published. Failures travel as `ReadProblem` values, which pickle cleanly.

Files are opened below a `TreeRoot`: the dataset's directory as the push found it, whose
every reopen (by a reader process, for each batch) checks it is still that directory.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import blake3

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.chunking.codec import encode

# O_NONBLOCK: a FIFO or device swapped in for a file since the walk must not block the open
# (a FIFO's waits for a writer forever); reads of a regular file ignore the flag, as GNU tar
# relies on too. Callers check the `fstat` they give `read_open` for a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: A directory only passed through on the way to the dataset's.
_PASS_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
ATTEMPTS = 3


class NewChunk(NamedTuple):
    """One chunk of a file, already encoded for a pack. (Tuples: they cross process
    boundaries by the ten thousand, and pickle several times faster than dataclasses.)"""

    digest: bytes
    raw_length: int
    codec: int
    stored: bytes | memoryview


class FileRead(NamedTuple):
    """A file read completely and consistently (stat values from the open file)."""

    mode: int
    mtime_ns: int
    size: int
    chunks: list[NewChunk]


@dataclass(slots=True, frozen=True)
class ReadProblem:
    """Why a file could not be read: `vanished`, `changed`, `denied` or `type`; `moved`,
    the dataset's directory is no longer the one the push started with (`detail`: its
    path); or `large`, which is no failure: the file is to be streamed by the caller."""

    kind: str
    path: str
    detail: str = ""


class Torn(Exception):
    """The file changed while it was read."""


class RootMoved(Exception):
    """The dataset's directory is not the one the push started with: renamed or removed,
    or a symlink or another directory in its place (or on the way to it)."""


@dataclass(slots=True, frozen=True)
class TreeRoot:
    """The dataset's directory a push reads: `parts` below the configured namespace
    directory `base` (site configuration, trusted: it may be a symlink), and the
    `(st_dev, st_ino)` it had when the push opened it (`anchor`). A value, so it travels to
    reader processes with each batch; the push keeps the descriptor `anchor` gave open
    until it ends, so no other directory can be given that inode meanwhile."""

    base: str
    parts: tuple[str, ...]
    dev: int
    ino: int

    @property
    def path(self) -> str:
        """The directory's path, for messages."""
        return os.path.join(self.base, *self.parts)


def _open_below(base: str, parts: Sequence[str]) -> int:
    """Open directory `base/parts...`: `base` as configured, each component below it with
    `O_NOFOLLOW` (as `fsops.open_root` opens it for stage)."""
    if not parts:
        return os.open(base, _DIR_FLAGS)
    # The directories on the way are only passed through (`O_PATH`): like a lookup by
    # path, that needs search permission, not read (a 0o711 directory above the dataset).
    fd = _descend(os.open(base, _PASS_FLAGS), parts[:-1], _PASS_FLAGS)
    return _descend(fd, parts[-1:], _DIR_FLAGS)


def _descend(fd: int, names: Sequence[str], flags: int) -> int:
    """The directory `names` below directory `fd`, each component opened with `flags` and
    `O_NOFOLLOW`; `fd` is consumed (closed, or returned when `names` is empty), also when
    an open fails."""
    try:
        for name in names:
            child = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _moved(exc: OSError) -> bool:
    """Whether `exc`, from opening the dataset's directory, means it is not there as a
    directory any more (not: this process may not open it, or the disk failed)."""
    return isinstance(exc, FileNotFoundError) or exc.errno in (errno.ELOOP, errno.ENOTDIR)


def anchor(base: str, parts: Sequence[str]) -> tuple[TreeRoot, int]:
    """Open the dataset's directory `base/parts...` as a push starts (no symlink below
    `base`), and return it as a `TreeRoot` with its open descriptor, which the caller
    closes once the push is over. Raises `RootMoved` if it is gone or a symlink (it
    changed since the caller checked it), `OSError` otherwise."""
    try:
        fd = _open_below(base, parts)
    except OSError as exc:
        if _moved(exc):
            raise RootMoved from None
        raise
    st = os.fstat(fd)
    return TreeRoot(base, tuple(parts), st.st_dev, st.st_ino), fd


def open_root(root: TreeRoot) -> int:
    """A new descriptor (the caller's to close) of `root`'s directory, opened as `anchor`
    opened it: the walk's and every reader's way into the tree. Raises `RootMoved` if the
    directory there is not the one the push started with (a different `st_dev`/`st_ino`:
    another directory, or a symlink to one, in its place or on the way to it), or is gone
    or a symlink; `OSError` otherwise. The identity is what makes it safe: a link put in
    the directory's place after the push checked its path would otherwise have the walk
    list the tree and the readers read files from wherever the link leads."""
    try:
        fd = _open_below(root.base, root.parts)
    except OSError as exc:
        if _moved(exc):
            raise RootMoved from None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (st.st_dev, st.st_ino) != (root.dev, root.ino):
        os.close(fd)
        raise RootMoved
    return fd


class Dirs:
    """The directory of the file read last, open: files are read in tree order, so a batch
    opens each of its directories once. Directories are opened component by component from
    `root` (`open_root`, which checks it is the push's directory) with `O_NOFOLLOW`, so a
    directory replaced by a symlink after the walk listed it is not read through
    (`O_NOFOLLOW` on the whole path guards its last component only)."""

    def __init__(self, root: TreeRoot) -> None:
        self.root = root
        self._rel: str | None = None
        self._fd = -1

    def open(self, rel: str) -> int:
        """A descriptor of directory `rel` (owned by this object); raises `OSError`, or
        `RootMoved` (see `open_root`)."""
        if rel == self._rel:
            return self._fd
        self.close()
        fd = _descend(open_root(self.root), rel.split("/") if rel else (), _DIR_FLAGS)
        self._rel, self._fd = rel, fd
        return fd

    def close(self) -> None:
        """Close the directory held, if any."""
        if self._rel is not None:
            self._rel = None
            os.close(self._fd)


def open_file(root: TreeRoot, rel: str, dirs: Dirs | None = None) -> int | ReadProblem:
    """Open `root/rel` for reading without following a symlink anywhere below `root`'s
    configured directory, nor reading below any directory but the push's (`open_root`)."""
    own = dirs is None
    if dirs is None:
        dirs = Dirs(root)
    parent, _, name = rel.rpartition("/")
    try:
        dfd = dirs.open(parent)
        try:
            return os.open(name, _OPEN_FLAGS, dir_fd=dfd)
        except BlockingIOError:  # a lease another host holds (Samba, NFS): wait it out
            if not stat.S_ISREG(os.lstat(name, dir_fd=dfd).st_mode):
                return ReadProblem("type", rel)
            return os.open(name, _OPEN_FLAGS & ~os.O_NONBLOCK, dir_fd=dfd)
    except RootMoved:
        return ReadProblem("moved", rel, root.path)
    except FileNotFoundError:
        return ReadProblem("vanished", rel)
    except PermissionError:
        return ReadProblem("denied", rel, os.path.join(root.path, rel))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return ReadProblem("type", rel)
        raise
    finally:
        if own:
            dirs.close()


def read_open(
    fd: int, before: os.stat_result, chunker: Chunker, level: int | None, digests: list[bytes]
) -> Iterator[NewChunk]:
    """Yield the encoded chunks of open regular file `fd`, whose `fstat` was `before`,
    appending digests; return its stat values.

    Raises `Torn` if the file changed meanwhile (then `digests` is cleared).
    """
    total = 0
    for data in chunker.chunks(fd, before.st_size):
        digest = blake3.blake3(data).digest()
        digests.append(digest)
        total += len(data)
        yield NewChunk(digest, len(data), *encode(data, level))
    after = os.fstat(fd)
    if total != before.st_size or _changed(after, before):
        digests.clear()
        raise Torn
    return stat.S_IMODE(before.st_mode), before.st_mtime_ns, total


#: The timestamp granularity assumed of a file system whose mtimes fall on whole seconds
#: (Lustre, ext4 with 128-byte inodes), and of one with finer ones (ext4, XFS: a kernel tick).
COARSE_NS, FINE_NS = 1_000_000_000, 20_000_000
#: How far the clock the kernel stamps file times from may lag `time.time_ns()`: it is the
#: coarse clock, moved on once a tick (at most 10 ms at HZ=100); `FINE_NS` covers that.
LAG_NS = FINE_NS
#: How far ahead of this host's clock a file server's may run for `settled` still to wait
#: out a file's granule by this clock (NFS and Lustre servers a second or so ahead are
#: common). An mtime further ahead is read at once: waiting minutes could not help.
AHEAD_NS = 2 * COARSE_NS


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether a file's `fstat`s `a` and `b` show a change to it between them."""
    return (
        a.st_size != b.st_size or a.st_mtime_ns != b.st_mtime_ns or a.st_ctime_ns != b.st_ctime_ns
    )


def settled(fd: int, st: os.stat_result) -> os.stat_result:
    """The `fstat` of open file `fd` to read it between: `st`, unless the file's mtime lies
    within its file system's timestamp granularity (and the kernel clock's lag) of now;
    then, once that much time has passed since the mtime, a fresh one. Raises `Torn` if
    the fresh one shows the file changed meanwhile: its new mtime may be as recent, and
    the caller reopens it and settles again (`ATTEMPTS` times, as for a torn read).

    Comparing `fstat`s before and after a read sees a write during the read only if that
    write moves the mtime (or size, or ctime). A write in the same granule as the last
    one does not (1 s on Lustre): read then, the file could be published torn, and every
    later push would take it as unchanged. Read after the granule, any later write lands
    in another one. Mtimes on whole seconds are taken as a 1 s granularity, others as a
    kernel tick's (`COARSE_NS`, `FINE_NS`). The kernel stamps a write from its coarse
    clock, up to a tick behind `time_ns` (`LAG_NS`): a write in the first milliseconds
    after the granule by `time_ns` still got the old second, so the wait is a granule and
    `LAG_NS`. A file whose mtime is older costs one `time_ns` and no wait. A file
    server's clock may run ahead of this host's: an mtime up to `AHEAD_NS` in the future
    is waited out too (by this clock, then its granule and `LAG_NS`), so that a write
    stamped later in the server's same second is not missed; one further ahead is read at
    once. The wait is per clock, not per file: files stamped in the same second as one
    waited for need none. A server behind this host's clock is not seen.
    """
    grain = COARSE_NS if st.st_mtime_ns % COARSE_NS == 0 else FINE_NS
    wait = st.st_mtime_ns + grain + LAG_NS - time.time_ns()
    if wait <= 0 or wait > grain + LAG_NS + AHEAD_NS:
        return st
    time.sleep(wait / 1e9)
    fresh = os.fstat(fd)
    if _changed(fresh, st):
        raise Torn
    return fresh


def read_whole(
    root: TreeRoot, rel: str, chunker: Chunker, level: int | None, dirs: Dirs | None = None
) -> FileRead | ReadProblem:
    """Read a small file completely, retrying torn reads; never raises for file problems.

    A file larger than the chunker's small-file limit is not read here (it would be held in
    memory whole): the answer is `ReadProblem("large")`, and the caller streams it instead.
    """
    for _ in range(ATTEMPTS):
        fd = open_file(root, rel) if dirs is None else open_file(root, rel, dirs)
        if isinstance(fd, ReadProblem):
            return fd
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return ReadProblem("type", rel)
            st = settled(fd, st)
            if st.st_size > chunker.params.small_file_limit:
                return ReadProblem("large", rel)
            digests: list[bytes] = []
            reader = read_open(fd, st, chunker, level, digests)
            chunks = []
            while True:
                try:
                    chunks.append(next(reader))
                except StopIteration as done:
                    mode, mtime_ns, size = done.value
                    return FileRead(mode, mtime_ns, size, chunks)
        except Torn:
            continue
        finally:
            os.close(fd)
    return ReadProblem("changed", rel)


_chunkers: dict[ChunkerParams, Chunker] = {}


def read_batch(
    root: TreeRoot, paths: list[str], params: ChunkerParams, level: int | None, budget: int
) -> list[tuple[Any, ...] | ReadProblem]:
    """Worker-process entry point: read many small files; results in `paths` order.

    Reading stops after the file that brings the bytes read to `budget`, so a batch's
    result holds at most `budget` plus one small file: the caller does not always know the
    sizes (a first push walks without `stat`), and reads the rest of `paths` in another
    batch. A result is a `FileRead` flattened to plain tuples (what pickles fastest); the
    caller rebuilds it with `FileRead.from_wire`.
    """
    chunker = _chunkers.get(params)
    if chunker is None:
        chunker = _chunkers[params] = Chunker(params)
    out: list[tuple[Any, ...] | ReadProblem] = []
    dirs = Dirs(root)
    held = 0
    try:
        for rel in paths:
            r = read_whole(root, rel, chunker, level, dirs)
            if isinstance(r, ReadProblem):
                out.append(r)
                continue
            out.append((r[0], r[1], r[2], [tuple(c) for c in r[3]]))
            held += r.size
            if held >= budget:
                break
    finally:
        dirs.close()
    return out


def from_wire(item: tuple[Any, ...] | ReadProblem) -> FileRead | ReadProblem:
    """Rebuild what `read_batch` flattened."""
    if isinstance(item, ReadProblem):
        return item
    mode, mtime_ns, size, chunks = item
    return FileRead(mode, mtime_ns, size, [NewChunk._make(c) for c in chunks])
