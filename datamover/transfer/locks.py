"""This host's lock of a dataset's tree: one file per dataset under `<state_dir>/locks/`,
locked with `flock`. A stage holds it exclusively while it changes the tree. A push and a
verify hold it shared while they read the tree: a push must not publish a tree a stage is
half-way through writing (a version of `.dm-….part` files, which every site staging the
latest with `--delete` would then wipe its copy to), and a verify's walk may give a 0o600
directory its owner's read and search bits for a moment (`Walker.allow_unlock`), which a
stage must neither trip over (EACCES) nor take for the directory's mode. Readers do not
exclude each other (a verify may still see the bits another gave a directory, and report
its mode). A stage that finds readers holding it waits for them to end rather than fail: a
job's staging hook must not fail because someone checks or pushes the tree.

The holder's `host:pid` is written into the file by a stage only; a reader, holding it
shared with others, leaves it alone. Whoever finds the lock held tells the two apart by
the lock itself: only a stage holds it exclusively.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from datamover.catalog.queries import owner_id
from datamover.errors import Busy, Conflict, PermanentError

T = TypeVar("T")

log = logging.getLogger(__name__)

#: How often a stage waiting for pushes and verifies to end tries the lock again.
_READER_POLL = 0.2
#: Reads of a lock file's holder, so far apart, before a stage is named without it.
_HOLDER_TRIES = 20
_HOLDER_WAIT = 0.005

#: Opening a lock file: never through a symlink, never waiting on a FIFO put there.
_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def lock_path(state_dir: Path, dataset: str) -> Path:
    """`<state_dir>/locks/stage-<BLAKE2b-128 of the logical path>.lock`."""
    digest = hashlib.blake2b(dataset.encode(), digest_size=16).hexdigest()
    return state_dir / "locks" / f"stage-{digest}.lock"


async def take_lock(state_dir: Path, dataset: str, *, reader: str | None = None) -> int | None:
    """`lock_dataset` in a thread: its `mkdir` and `open` in a state directory on a hung
    network mount must not hold up the event loop, and with it every transfer of a daemon.
    A cancel does not wait for the thread, which may hang for as long as the mount does;
    the descriptor it returns after that is closed then, not leaked. A stage waiting for
    pushes and verifies to end (`lock_dataset`) stops waiting when cancelled."""
    stop = threading.Event()
    taking = _in_own_thread(lambda: lock_dataset(state_dir, dataset, reader=reader, stop=stop))
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        stop.set()
        taking.add_done_callback(_close_taken)  # runs at once if it is done already
        raise


def _in_own_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """`fn()` on a thread of its own, as a future of the running loop. Not the loop's
    default executor (`cpu_count() + 4` threads, shared by every `to_thread` of a daemon):
    stages waiting there for a long push or verify would take all of them, and every
    transfer's file work with them."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed to the waiting task, which raises it
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: its process is ending
            if outcome[0] and isinstance(outcome[1], int):
                os.close(outcome[1])

    threading.Thread(target=run, name="datamover-lock", daemon=True).start()
    return future


def _close_taken(taking: asyncio.Future[int | None]) -> None:
    """Close the descriptor of a lock taken for a caller that was cancelled meanwhile."""
    if taking.cancelled() or taking.exception() is not None:
        return
    fd = taking.result()
    if fd is not None:
        os.close(fd)


def lock_dataset(
    state_dir: Path,
    dataset: str,
    *,
    reader: str | None = None,
    stop: threading.Event | None = None,
) -> int | None:
    """Take this host's lock of `dataset`'s tree, an `flock` on `lock_path` held until the
    returned descriptor is closed (the kernel drops it when the process dies): exclusive
    for a stage (`reader` None), which then writes its `host:pid` into the file, shared for
    a command that reads the tree, named by `reader` ("push", "verify") in its messages.
    Of two stages of one dataset on this host, `--local` runs or a daemon's, one takes it
    and the other is `Conflict`: a check of the replica record and the record that follows
    it are two statements, which both could pass. A stage and a reader of one dataset do
    not run together either. A reader that finds a stage running is `Conflict` (the tree is
    changing: there is nothing to push or verify yet). A stage that finds only readers
    holding the lock waits for them to end, with a warning, until it gets the lock, a stage
    takes it first (`Conflict`), or `stop` is set (`Conflict`; its caller is gone): a job's
    staging hook must not fail because someone checks or pushes the tree.

    The lock file is opened without following a symlink, and written only when it is a
    regular file with one link: in a state directory others may write to, a link planted
    there must not have a stage cut the file it leads to. A lock file that cannot be made
    or opened, or is not a regular file, is a one-line `PermanentError`. Where the file
    system keeps no `flock` (Lustre mounted `noflock`, NFS without a lock manager, or over
    NFS another user's lock file, which only opens read-only) the command runs without it,
    after a warning, kept apart from others by the replica record alone, as before the
    lock; None is returned then."""
    path = lock_path(state_dir, dataset)
    fd, st = _open_lock_file(path, dataset)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if reader is None else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            conflict, by_readers = _held(fd, dataset, reader)
            if by_readers and stop is not None:
                _wait_out_readers(fd, dataset, stop, conflict)
            else:
                raise conflict from None
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        os.close(fd)
        who = "stages of %s are" if reader is None else f"a {reader} of %s is"
        apart = " not kept apart" if reader is None else " not kept apart from stages"
        log.warning(
            who + apart + " on this host: %s cannot be locked (%s)",
            dataset,
            path,
            exc.strerror or exc,
        )
        return None
    except BaseException:
        os.close(fd)
        raise
    if reader is None and st.st_nlink == 1:
        with contextlib.suppress(OSError):  # only for the message of one that finds it held
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner_id().encode(), 0)
    return fd


def _open_lock_file(path: Path, dataset: str) -> tuple[int, os.stat_result]:
    """A descriptor of lock file `path` (made if missing, with its directory) and its
    `fstat`: opened without following a symlink or blocking on a FIFO, read-only where it
    is another user's (locking needs no write). `PermanentError` (`_lock_error`) when it
    cannot be made or opened, or is not a regular file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _FLAGS, 0o666)
        except PermissionError as refused:  # another user's lock file: locking needs no write
            try:
                fd = os.open(path, os.O_RDONLY | _FLAGS)
            except FileNotFoundError:  # none, and none can be made: the refusal says why
                raise refused from None
        st = os.fstat(fd)
    except OSError as exc:
        raise _lock_error(dataset, path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _lock_error(dataset, path, None)
    return fd, st


def _held(fd: int, dataset: str, reader: str | None) -> tuple[Conflict, bool]:
    """The `Conflict` for a lock `fd` could not take (as `reader`, or as a stage), and
    whether only readers hold it. Only a stage holds it exclusively, so a reader was
    stopped by a stage; a stage asks the lock whether it is held shared (by readers) before
    it names the stage whose `host:pid` the file holds, which may be the last one's, long
    gone. A shared lock does not say whose it is, so a stage names both readers."""
    try:
        holder = _holder(os.pread(fd, 256, 0))
    except OSError:
        holder = ""
    if reader is not None:
        running = f"a stage of {dataset!r} is running" + (f" ({holder})" if holder else "")
        return Busy(f"{running}; {reader} after it ends"), False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # held exclusively: a stage
        running = f"a stage of {dataset!r} is already running"
        # A stage writes its `host:pid` just after it takes the lock: one caught between
        # the two is named once it has (a few milliseconds), not left out.
        for _ in range(_HOLDER_TRIES):
            if holder:
                break
            time.sleep(_HOLDER_WAIT)
            try:
                holder = _holder(os.pread(fd, 256, 0))
            except OSError:
                break
        return Busy(f"{running} ({holder})" if holder else running), False
    except OSError:
        return Busy(f"a stage, push or verify of {dataset!r} is running"), False
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)  # the probe's shared lock must not keep a stage out
    return Conflict(f"a push or verify of {dataset!r} is running; stage after it ends"), True


def _wait_out_readers(fd: int, dataset: str, stop: threading.Event, conflict: Conflict) -> None:
    """Take `fd`'s lock exclusively once the pushes and verifies holding it shared are
    over. Raises `conflict` when `stop` is set first, and a stage's `Conflict` when one
    takes it first."""
    log.warning("a push or verify of %r is running; the stage waits for it to end", dataset)
    while not stop.wait(_READER_POLL):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            conflict, by_readers = _held(fd, dataset, None)
            if not by_readers:
                raise conflict from None
    raise conflict


def _lock_error(dataset: str, path: Path, exc: OSError | None) -> PermanentError:
    """The one-line error for a dataset lock file that cannot be used (`exc`: why; None: it
    is not a regular file)."""
    if exc is None:
        why = "it is not a regular file"
    elif exc.errno == errno.ELOOP:
        why = "it is a symlink"
    else:
        why = (exc.strerror or type(exc).__name__).lower()
    return PermanentError(
        f"cannot take the lock of {dataset!r}, {str(path)!r}: {why} (check [site] "
        "state_dir and its locks/ directory)"
    )


def _holder(raw: bytes) -> str:
    """The `host:pid` a held lock file names, as one printable line (others may write it)."""
    lines = raw.decode(errors="replace").strip().splitlines()
    return "".join(c for c in lines[0] if c.isprintable()) if lines else ""


def tree_lock_path(state_dir: Path, path: str) -> Path:
    """`<state_dir>/locks/tree-<BLAKE2b-128 of the logical path>.lock`: the lock that keeps
    the stages of datasets nested in one another apart (`lock_nested`)."""
    digest = hashlib.blake2b(path.encode(), digest_size=16).hexdigest()
    return state_dir / "locks" / f"tree-{digest}.lock"


def _above(dataset: str) -> list[str]:
    """The logical paths above `dataset`, outermost first (`/proj`, `/proj/ds` for
    `/proj/ds/sub`)."""
    parts = dataset.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


async def take_nested(state_dir: Path, dataset: str) -> list[int]:
    """`lock_nested` on a thread of its own, as `take_lock`; a cancel stops its wait."""
    stop = threading.Event()
    taking = _in_own_thread(lambda: lock_nested(state_dir, dataset, stop))
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        stop.set()
        taking.add_done_callback(_close_all_taken)
        raise


def _close_all_taken(taking: asyncio.Future[list[int]]) -> None:
    if taking.cancelled() or taking.exception() is not None:
        return
    for fd in taking.result():
        os.close(fd)


def lock_nested(state_dir: Path, dataset: str, stop: threading.Event | None = None) -> list[int]:
    """Keep this host's stages of datasets nested in one another apart (`/proj/ds` and
    `/proj/ds/sub` share a tree: run together, their writes interleave and leave the tree
    part one version, part another, though each records its own as complete). A stage
    holds the tree lock (`tree_lock_path`) of every path above its dataset shared and its
    dataset's own exclusively, taken in that order, outermost first, each without
    blocking: a stage of a dataset above holds its own exclusively, one below holds this
    one's shared. Whichever it finds holding one, it waits for (every `_READER_POLL`
    seconds, with a warning) until the lock is free, or `stop` is set (`Conflict`): the
    daemon's queue waits so too, and a job's staging hook must not fail because another
    job stages a dataset nested with its own. The descriptors are returned, to close when
    the stage ends (the kernel drops the locks with the process). Siblings share the
    paths above them only shared, and do not wait for each other.

    Lock files that cannot be made, opened or locked (a state directory on a file system
    without `flock`) are left out, after a warning, as `lock_dataset` does."""
    held: list[int] = []
    try:
        for path, exclusive in [*((p, False) for p in _above(dataset)), (dataset, True)]:
            fd = _tree_lock(state_dir, path, dataset, exclusive, stop)
            if fd is not None:
                held.append(fd)
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return held


def _tree_lock(
    state_dir: Path, path: str, dataset: str, exclusive: bool, stop: threading.Event | None
) -> int | None:
    """One tree lock of `lock_nested`: `path`'s, exclusive for `dataset`'s own."""
    lock = tree_lock_path(state_dir, path)
    fd, _ = _open_lock_file(lock, dataset)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    # Only a stage of `path` holds its lock exclusively; only stages below it, shared.
    what = (
        f"a stage of a dataset below {dataset!r} is running"
        if exclusive
        else f"a stage of {path!r}, above {dataset!r}, is running"
    )
    warned = False
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            if not warned:
                log.warning("%s; the stage waits for it to end", what)
                warned = True
            if stop is None:
                time.sleep(_READER_POLL)
            elif stop.wait(_READER_POLL):
                raise Conflict(f"{what}; stage {dataset!r} after it ends")
    except OSError as exc:
        os.close(fd)
        log.warning(
            "stages of datasets nested with %s are not kept apart on this host: %s cannot "
            "be locked (%s)",
            dataset,
            lock,
            exc.strerror or exc,
        )
        return None
    except BaseException:
        os.close(fd)
        raise
