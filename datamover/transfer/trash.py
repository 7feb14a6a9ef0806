"""The trash: what stage moved aside instead of overwriting or deleting, until it is emptied.

`<state_dir>/trash/<run>/<dataset>/<path>`, one directory per stage run that moved
something, named `<UTC time>-<6 hex>` (`stage.trash_dir`). It holds what users changed: only
`datamover trash --empty` and a daemon with `[api] trash_days` empty it. `runs` lists the
runs; `empty` removes those older than a number of days (one `empty` at a time: it holds an
exclusive `flock` on the trash directory, and another finding it taken is `Busy`), one run
at a time: renamed first to `.emptying-<run>` (so a run half removed, by a crash or a
failure, is no longer listed as one, and the next `empty` finishes it), then removed from
the bottom up through directory descriptors (never following a symlink a user trashed; a
tree deeper than PATH_MAX goes as a shallow one does). A directory a user left without its
owner's write or search bits (a read-only tree trashed whole) gets them first.

A run is aged by its last move, not by its stage's start: a stage sets the mtime of its
run's directory to now after every move (`fsops.TreeWriter.trash_run`), so what a stage
that ran for two days moved at its end is kept as long as what a short one moved. A run
moved into within the last day is never removed, whatever the age asked: its stage may
still be writing into it (a stage holds no lock a run could be told by).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from datamover.errors import Busy, InvalidInput, PermanentError
from datamover.transfer import mounts

#: A run's directory: the stage's start, to the second, and 6 random hex digits.
_RUN = re.compile(r"\A(\d{8}T\d{6}Z)-[0-9a-f]{6}\Z")
_EMPTYING = ".emptying-"
#: The youngest run `empty` removes: a stage may still be writing into a younger one.
MIN_AGE = timedelta(days=1)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OWNER_RWX = stat.S_IRWXU


@dataclass
class TrashRun:
    """One stage run's trash: its directory name, when the run started, its last move (the
    run directory's mtime, never before the start) and what it holds (regular files
    counted, with their bytes; directories and symlinks not)."""

    name: str
    started: datetime
    files: int = 0
    bytes: int = 0
    last_moved: datetime | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "run": self.name,
            "started": self.started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "last_moved": (self.last_moved or self.started).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": self.files,
            "bytes": self.bytes,
        }


def trash_root(state_dir: Path) -> Path:
    """Where the runs are."""
    return state_dir / "trash"


def runs(
    state_dir: Path, older_than: timedelta = timedelta(0), measure: bool = True
) -> Iterator[TrashRun]:
    """The runs in the trash whose last move was more than `older_than` ago (see the module
    docstring), in order of their start, with what each holds where `measure` (each run
    walked once, one directory's names at a time; a directory its owner may not read is
    not counted). Names that are not runs' are left out (and never removed)."""
    root = trash_root(state_dir)
    try:
        names = sorted(p.name for p in root.iterdir())
    except FileNotFoundError:
        _no_dangling_link(root)
        return
    except OSError as exc:  # not a directory, no permission
        raise PermanentError(f"cannot read the trash {str(root)!r}: {exc.strerror}") from None
    now = datetime.now(UTC)
    for name in names:
        started = _started(name)
        if started is None or now - started <= older_than:
            continue
        try:
            mtime = os.stat(root / name, follow_symlinks=False).st_mtime
        except FileNotFoundError:  # an `empty` took it since the names were read
            continue
        except OSError:
            mtime = 0.0
        moved = max(started, datetime.fromtimestamp(mtime, UTC))
        if now - moved <= older_than:
            continue
        run = TrashRun(name, started, last_moved=moved)
        if measure:
            try:
                run.files, run.bytes = _measure(root / name)
            except FileNotFoundError:  # an `empty` took it since the names were read
                continue
        yield run


def empty(
    state_dir: Path, older_than_days: int, stop: threading.Event | None = None
) -> list[TrashRun]:
    """Remove the runs that started more than `older_than_days` days ago (at least
    `MIN_AGE`), and the remains of any run an earlier `empty` did not finish; return the
    runs removed, with what they held. `InvalidInput` for fewer than one day; `Busy` if
    another `empty` is under way (it holds the trash directory's `flock`; this one does not
    wait for it). Once `stop` is set, it returns between two entries with the runs removed
    so far: a run it was removing is left renamed, and the next `empty` finishes it.

    The trash directory itself is followed if it is a symlink (an operator may put it on
    another disk; stage writes through it too); nothing below it is."""
    if older_than_days < 1:
        raise InvalidInput(
            f"--older-than {older_than_days}: at least 1 day (a stage of the last day may "
            "still be writing into its trash)"
        )
    root = trash_root(state_dir)
    removed: list[TrashRun] = []
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        _no_dangling_link(root)
        return []
    except OSError as exc:  # not a directory, no permission
        raise PermanentError(f"cannot empty the trash {str(root)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"the trash {str(root)!r} is being emptied by another process (a site "
                "daemon's [api] trash_days, or another `datamover trash --empty`)"
            ) from None
        # A run that cannot be removed whole (a directory of another user's that a stage
        # moved in, which this user may not empty) is named, and the others are emptied:
        # one such run had stopped every later `empty`, for good.
        failed: list[str] = []
        for name in _names(root_fd):
            if name.startswith(_EMPTYING):
                _try_removing(root_fd, name, stop, root, failed)
        age = max(timedelta(days=older_than_days), MIN_AGE)
        for run in list(runs(state_dir, age, measure=False)):
            point = mounts.mounted_at(root_fd, run.name)
            if point is not None:  # renamed aside, the mount would go with it
                failed.append(f"{str(root / run.name)!r}: a file system is mounted at {point!r}")
                continue
            aside = _EMPTYING + run.name
            os.rename(run.name, aside, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            counted = _try_removing(root_fd, aside, stop, root, failed)
            if counted is not None:
                run.files, run.bytes = counted
                removed.append(run)
    except _Stopped:
        pass
    except OSError as exc:
        where = exc.filename or root
        raise PermanentError(
            f"cannot empty the trash {str(root)!r}: {exc.strerror} ({where})"
        ) from None
    finally:
        os.close(root_fd)
    if failed:
        emptied = f"; {len(removed)} other run(s) were emptied" if removed else ""
        raise TrashStuck(
            f"cannot empty the trash {str(root)!r}: {failed[0]}"
            + (f" (and {len(failed) - 1} more run(s))" if len(failed) > 1 else "")
            + emptied,
            removed,
        )
    return removed


def _try_removing(
    root_fd: int, name: str, stop: threading.Event | None, root: Path, failed: list[str]
) -> tuple[int, int] | None:
    """`remove_tree` of run directory `name`; None, and what stopped it added to `failed`,
    where something in it cannot be removed (what could be is gone; the rest stays under
    its `.emptying-` name, tried again by the next `empty`)."""
    try:
        return remove_tree(root_fd, name, stop)
    except OSError as exc:
        entry = f", at {exc.filename!r}" if exc.filename else ""
        failed.append(f"{str(root / name)!r}: {exc.strerror or exc}{entry}")
        return None


def _no_dangling_link(root: Path) -> None:
    """`PermanentError` if `root` is a symlink to nothing (a trash moved to a disk that is
    not mounted), which would otherwise read as an empty trash."""
    if root.is_symlink():
        raise PermanentError(
            f"the trash {str(root)!r} is a symbolic link to {os.readlink(root)!r}, which does "
            "not exist (a disk not mounted?)"
        )


class TrashStuck(PermanentError):
    """`empty` could not remove some runs (named in the message); `removed` holds the runs
    it did remove, for its caller to report."""

    def __init__(self, message: str, removed: list[TrashRun]) -> None:
        super().__init__(message)
        self.removed = removed

    def __reduce__(self) -> tuple[type[TrashStuck], tuple[str, list[TrashRun]]]:
        return (type(self), (self.message, self.removed))


class _Stopped(Exception):
    """`empty` was asked to stop (its `stop` event was set)."""


def _started(name: str) -> datetime | None:
    matched = _RUN.match(name)
    if matched is None:
        return None
    try:
        return datetime.strptime(matched.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def _measure(path: Path) -> tuple[int, int]:
    """Regular files below `path` and their bytes (symlinks not followed; a directory that
    cannot be read is not counted)."""
    files = size = 0
    for _, _, names, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in names:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


def _names(fd: int) -> list[str]:
    """The names in directory `fd`, sorted."""
    with os.scandir(fd) as entries:
        return sorted(e.name for e in entries)


def _open_dir(parent_fd: int, name: str) -> int:
    """Directory `name` in `parent_fd`, opened without following a symlink, with its owner's
    read, write and search bits (given where it lacks them: its entries are removed)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        os.chmod(name, _OWNER_RWX, dir_fd=parent_fd)  # a directory (lstat'ed), not a link
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if os.fstat(fd).st_mode & _OWNER_RWX != _OWNER_RWX:
        os.fchmod(fd, _OWNER_RWX)
    return fd


def remove_tree(parent_fd: int, name: str, stop: threading.Event | None = None) -> tuple[int, int]:
    """Remove directory `name` of `parent_fd` and everything below it, bottom up, with one
    descriptor and one directory's names held per level (no recursion: a trashed tree may
    be thousands of levels deep); return the regular files removed and their bytes.
    `_Stopped` once `stop` is set (checked before each entry).

    Never reaches into another file system: a directory holding a mount point (`mounts`,
    a bind mount of the same file system included) is refused before anything is removed,
    and a directory met on the way that is a mount point once opened (mounted since, or by
    the open: an automount) stops the removal there (`OSError`, EBUSY or EXDEV), before
    anything in it is removed (`mounts.refuse_mount_point`)."""
    files = size = 0
    fd = _open_dir(parent_fd, name)
    point = mounts.mounted_in(fd)
    if point is not None:
        os.close(fd)
        raise OSError(errno.EBUSY, f"a file system is mounted at {point!r} in it", name)
    stack = [(fd, iter(_names(fd)), parent_fd, name)]
    try:
        while stack:
            fd, names, up, here = stack[-1]
            for child in names:
                if stop is not None and stop.is_set():
                    raise _Stopped
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    inner = _open_dir(fd, child)
                    try:
                        mounts.refuse_mount_point(inner, fd, child)
                    except OSError:
                        os.close(inner)
                        raise
                    stack.append((inner, iter(_names(inner)), fd, child))
                    break
                os.unlink(child, dir_fd=fd)
                if stat.S_ISREG(st.st_mode):
                    files, size = files + 1, size + st.st_size
            else:
                stack.pop()
                os.close(fd)
                os.rmdir(here, dir_fd=up)
    finally:
        for fd, _, _, _ in stack:
            os.close(fd)
    return files, size
