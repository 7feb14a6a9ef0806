"""Safe writes into a local tree: never through a symlink, never a partial file at a final path.

Every operation works relative to directory file descriptors opened with `O_NOFOLLOW` from
the dataset root, so a planted `lig0000 -> /etc` cannot redirect a write. Files are written
under a temporary name (`.dm-<16 hex>.part`) in their destination directory, given their mode
and mtime, and renamed into place. `TreeWriter` is used from one thread only.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import blake3

from datamover.domain.manifest import Entry
from datamover.errors import Conflict

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DIR_FDS = 64


def split(rel: str) -> tuple[str, str]:
    """`(parent, name)` of a relative path (`parent` is "" at the root)."""
    parent, _, name = rel.rpartition("/")
    return parent, name


_TEMP_PREFIX = secrets.randbits(32)
_temp_counter = itertools.count()


def temp_name() -> str:
    """A fresh temporary name matching `walk.PARTIAL_RE` (random per process, then counted:
    a system call per file for randomness would be measurable)."""
    return f".dm-{_TEMP_PREFIX:08x}{next(_temp_counter) & 0xFFFFFFFF:08x}.part"


def partial_name(entry: Entry) -> str:
    """The stable temporary name of a large file, so a rerun can resume it."""
    h = blake3.blake3(entry.path.encode())
    for c in entry.chunks:
        h.update(c.digest)
    return f".dm-{h.hexdigest()[:16]}.part"


def open_dir(name: str, parent_fd: int, shown: str) -> int:
    """Open directory `name` below `parent_fd` without following a symlink."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Conflict(
                f"{shown!r} is not a directory (a symlink or a file is in the way); refusing "
                "to write through it"
            ) from None
        raise


def open_root(base: Path, components: Sequence[str], create: bool = True) -> int:
    """Open (with `create`, creating as needed) `base/components...` without following
    symlinks below `base`.

    `base` is the namespace's configured local directory (trusted, site configuration);
    every component below it comes from a logical path and is opened with `O_NOFOLLOW`.
    """
    if create:
        base.mkdir(parents=True, exist_ok=True)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in components:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
            child = open_dir(name, fd, str(base / name))
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


class TreeWriter:
    """Writes below one root directory fd. See the module docstring."""

    def __init__(self, root_fd: int, root_path: Path, trash_dir: Path | None = None) -> None:
        self.root_fd = root_fd
        self.root_path = root_path
        self.trash_dir = trash_dir
        self.trashed: list[str] = []
        self._fds: OrderedDict[str, int] = OrderedDict()

    def close(self) -> None:
        """Close cached directory descriptors (not the root)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def dir_fd(self, rel: str) -> int:
        """Descriptor of directory `rel`, opened component by component with O_NOFOLLOW."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, name = split(rel)
        fd = open_dir(name, self.dir_fd(parent), rel)
        self._fds[rel] = fd
        if len(self._fds) > _MAX_DIR_FDS:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _forget(self, rel: str) -> None:
        for key in [k for k in self._fds if k == rel or k.startswith(rel + "/")]:
            os.close(self._fds.pop(key))

    def mkdir(self, rel: str) -> None:
        """Create directory `rel` (its mode and mtime are set at the end of the stage)."""
        parent, name = split(rel)
        try:
            os.mkdir(name, 0o700, dir_fd=self.dir_fd(parent))
        except FileExistsError:
            pass

    def remove(self, rel: str) -> None:
        """Unlink a file or symlink that datamover itself wrote."""
        parent, name = split(rel)
        try:
            os.unlink(name, dir_fd=self.dir_fd(parent))
        except FileNotFoundError:
            pass

    def trash(self, rel: str) -> None:
        """Move `rel` (any kind, a whole directory included) into the trash, never delete it."""
        if self.trash_dir is None:
            raise ValueError("this TreeWriter has no trash directory")
        parent, name = split(rel)
        self._forget(rel)
        dest = self.trash_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dfd = self.dir_fd(parent)
        try:
            os.rename(name, dest, src_dir_fd=dfd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Trash on another file system (state on local disk, data on a parallel file
            # system): copy, then remove the original. Reached through the parent's
            # descriptor, as every other write is, so a symlink swapped into the path
            # meanwhile cannot send the copy and the removal elsewhere.
            via_fd = f"/proc/self/fd/{dfd}"
            source = f"{via_fd}/{name}" if os.path.isdir(via_fd) else str(self.root_path / rel)
            shutil.move(source, dest)
        self.trashed.append(rel)

    def write_file(self, entry: Entry, parts: Sequence[bytes | memoryview]) -> None:
        """Write a whole file under a temporary name, set mode and mtime, rename into place."""
        parent, name = split(entry.path)
        dfd = self.dir_fd(parent)
        tmp = temp_name()
        fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=dfd)
        try:
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise

    def open_partial(self, entry: Entry) -> tuple[int, int]:
        """Open the stable partial file of a large entry; return `(fd, valid_chunks)`.

        Chunks already in the partial file from an interrupted run are checked against their
        digests; the file is cut after the last good one, and only the rest is fetched.
        """
        parent, _ = split(entry.path)
        dfd = self.dir_fd(parent)
        fd = os.open(
            partial_name(entry),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
        good = 0
        offset = 0
        size = os.fstat(fd).st_size
        for chunk in entry.chunks:
            if offset + chunk.raw_length > size:
                break
            data = os.pread(fd, chunk.raw_length, offset)
            if blake3.blake3(data).digest() != chunk.digest:
                break
            good += 1
            offset += chunk.raw_length
        os.ftruncate(fd, offset)
        return fd, good

    def finish_partial(self, entry: Entry, fd: int) -> None:
        """Give a completed large file its mode and mtime and rename it into place."""
        parent, name = split(entry.path)
        dfd = self.dir_fd(parent)
        try:
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        os.rename(partial_name(entry), name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def symlink(self, entry: Entry, target: str) -> None:
        """Create (or atomically replace) the symlink of `entry`, pointing at `target` (the
        entry's target as this site writes it)."""
        parent, name = split(entry.path)
        dfd = self.dir_fd(parent)
        tmp = temp_name()
        os.symlink(target, tmp, dir_fd=dfd)
        try:
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise

    def set_attrs(self, entry: Entry) -> None:
        """Set mode and mtime of an existing file or directory without following symlinks."""
        parent, name = split(entry.path)
        dfd = self.dir_fd(parent)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except FileNotFoundError:
            return
        try:
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)


def content_matches(root: str, entry: Entry) -> bool:
    """True when the file at `root/entry.path` holds exactly the entry's chunks (by digest).

    Reads by the manifest's chunk boundaries, so no chunker is needed. Read-only.
    """
    try:
        fd = os.open(os.path.join(root, entry.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        offset = 0
        for chunk in entry.chunks:
            data = os.pread(fd, chunk.raw_length, offset)
            if len(data) != chunk.raw_length or blake3.blake3(data).digest() != chunk.digest:
                return False
            offset += chunk.raw_length
        return not os.pread(fd, 1, offset)
    finally:
        os.close(fd)
