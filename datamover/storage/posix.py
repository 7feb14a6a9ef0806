"""`PosixStore`: a Store kept as plain files under one directory (a shared file system, a disk).

Key `a/b/c` is the file `<root>/a/b/c`. Writes go to a temporary file in the target directory,
are fsynced, renamed over the final name and the directory is fsynced (as is the parent of every
directory the write had to create), so a reader sees the old object or the new one, an object
`put` has returned for survives a crash, and a crash leaves at most a stray temporary file,
which `list` ignores.
All blocking file-system work runs in worker threads (`asyncio.to_thread`).

One limit a file system imposes and S3 does not: a path cannot be a file and a directory at
once, so this store cannot hold both `a/b` and `a/b/c`; such a `put` raises `Conflict`. The
repository layout never needs that. Parts starting with `.tmp-` are reserved for temporary
files and rejected with `InvalidInput`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from datamover.errors import (
    BucketNotFound,
    Conflict,
    InvalidInput,
    ObjectNotFound,
    StoreAccessDenied,
    StoreUnavailable,
)
from datamover.storage.base import (
    ObjectInfo,
    check_key,
    check_prefix,
    check_range,
    passed,
    start_key,
)

TMP_PREFIX = ".tmp-"

# (sort key, name, is_dir, size): one directory entry, sortable into key order.
_Entry = tuple[bytes, str, bool, int]


class PosixStore:
    """A Store under the directory `root`, which must exist (it is never created here, so a
    mistyped path fails with `BucketNotFound` instead of starting an empty store)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        self._root = str(self.root)
        self.description = f"file://{self._root}"

    # -- the Store interface -------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write `data` atomically (temp file, fsync, rename, fsync of the directory)."""
        path = self._path(key)
        await asyncio.to_thread(self._put_sync, key, path, data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object or the range; `length=0` returns b"" without looking the key up,
        like the S3 driver, which makes no request for it."""
        path = self._path(key)
        check_range(offset, length)
        if length == 0:
            return b""
        return await asyncio.to_thread(self._get_sync, key, path, offset, length)

    async def head(self, key: str) -> ObjectInfo:
        """Return the object's size; raise `ObjectNotFound` if there is no such file."""
        path = self._path(key)
        return await asyncio.to_thread(self._head_sync, key, path)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield objects under `prefix` after `start_after` in UTF-8 byte order of their keys,
        streaming.

        A depth-first walk in which each directory's entries are sorted by `name + "/"` for
        directories and `name` for files: then the walk's order is the keys' byte order
        (`a-b` < `a.b` < `a/…` < `a0`). Only one directory's entries are held at a time per
        level of depth. A directory whose keys all sort at or before `start_after` is not
        entered. Temporary files, symlinks and other non-regular files are skipped.
        """
        after = start_key(start_after)
        if not check_prefix(prefix):
            return  # no valid key lies under such a prefix
        head, _, first = prefix.rpartition("/")
        parts = head.split("/") if head else []
        if not await asyncio.to_thread(os.path.isdir, self._root):
            raise self._missing_root()
        stack: list[tuple[str, Iterator[_Entry]]] = []
        base = head + "/" if head else ""
        entries = await asyncio.to_thread(self._scan, os.path.join(self._root, *parts), first)
        stack.append((base, iter(entries)))
        while stack:
            base, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                stack.pop()
                continue
            _, name, is_dir, size = entry
            key = base + name
            if after and passed((key + "/" if is_dir else key).encode(), after, is_dir):
                continue
            if is_dir:
                sub = await asyncio.to_thread(self._scan, self._fs_path(key), "")
                stack.append((key + "/", iter(sub)))
            else:
                yield ObjectInfo(key, size)

    async def delete(self, key: str) -> None:
        """Remove the file (a missing one is fine) and prune directories left empty."""
        path = self._path(key)
        await asyncio.to_thread(self._delete_sync, path)

    async def check(self) -> None:
        """Raise `BucketNotFound` if the root is missing, `StoreAccessDenied` if unusable."""
        if not await asyncio.to_thread(os.path.isdir, self._root):
            raise self._missing_root()
        if not os.access(self._root, os.R_OK | os.W_OK | os.X_OK):
            raise StoreAccessDenied(f"{self.description}: no read/write permission on {self._root}")

    async def close(self) -> None:
        """Nothing to release."""

    # -- helpers (run in worker threads) ------------------------------------------------

    def _path(self, key: str) -> str:
        check_key(key)
        if any(part.startswith(TMP_PREFIX) for part in key.split("/")):
            raise InvalidInput(
                f"bad store key {key!r}: parts starting with {TMP_PREFIX!r} are reserved"
            )
        return self._fs_path(key)

    def _fs_path(self, key: str) -> str:
        return os.path.join(self._root, *key.split("/"))

    def _missing_root(self) -> BucketNotFound:
        return BucketNotFound(f"store directory {self._root} does not exist")

    def _put_sync(self, key: str, path: str, data: bytes | bytearray | memoryview) -> None:
        if not os.path.isdir(self._root):
            raise self._missing_root()
        parent = os.path.dirname(path)
        # A concurrent delete may prune the directory between makedirs and creating the temp
        # file in it; making it again is enough, and it cannot loop for long.
        for _ in range(10):
            try:
                self._make_parents(parent)
                tmp = os.path.join(parent, f"{TMP_PREFIX}{secrets.token_hex(8)}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileNotFoundError:
                continue
            except (FileExistsError, NotADirectoryError):
                raise self._clash(key) from None
            except OSError as exc:
                if exc.errno == errno.ENAMETOOLONG:
                    raise self._too_long(key) from None
                raise self._os_error(exc, path) from None
        else:
            raise StoreUnavailable(f"{self.description}: directory {parent} keeps disappearing")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, IsADirectoryError):
                raise self._clash(key) from None
            if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
                raise self._too_long(key) from None
            if isinstance(exc, OSError):
                raise self._os_error(exc, path) from None
            raise
        # The rename is durable only once the directory entry is on disk.
        _fsync_dir(parent)

    def _make_parents(self, parent: str) -> None:
        """Make `parent` and the directories missing above it, each durably: the directory
        a new one is made in is fsynced too, or a crash could lose the new directory, and
        the object in it, after `put` returned (objects are written in dependency order:
        a pack in a new `packs/xx/` must not vanish while the manifest naming it stays)."""
        missing: list[str] = []
        path = parent
        while path != self._root and not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made meanwhile (or a file: see put)
                os.mkdir(path)
            _fsync_dir(os.path.dirname(path))  # also when another put made it and may not yet

    def _get_sync(self, key: str, path: str, offset: int, length: int | None) -> bytes:
        # What `head` and `list` see is what `get` reads: a symlink is no object (O_NOFOLLOW:
        # it would read whatever it points at, outside the store too), nor is a FIFO, whose
        # open would wait for a writer forever (O_NONBLOCK; fstat then refuses it).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            # ELOOP: a symlink; ENAMETOOLONG: a key that cannot have been stored.
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO):
                raise self._not_found(key) from None
            raise self._os_error(exc, path) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a directory, a FIFO, a device
                os.close(fd)
                raise self._not_found(key)
            f = open(fd, "rb")  # noqa: SIM115 (closed by the with below; closes fd on error)
        except OSError as exc:
            os.close(fd)
            raise self._os_error(exc, path) from None
        try:
            with f:
                # Cut at the end first: read(n) allocates n bytes up front.
                end = st.st_size if length is None else min(st.st_size, offset + length)
                if offset >= end:
                    return b""
                f.seek(offset)
                return f.read(end - offset)
        except OSError as exc:
            raise self._os_error(exc, path) from None

    def _head_sync(self, key: str, path: str) -> ObjectInfo:
        try:
            st = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise self._not_found(key) from None
            raise self._os_error(exc, path) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(key)
        return ObjectInfo(key, st.st_size)

    def _delete_sync(self, path: str) -> None:
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return
            raise self._os_error(exc, path) from None
        # Empty directories would make a later `put` of a key with that name clash; a put
        # racing with this pruning recreates its directory (see `_put_sync`).
        parent = os.path.dirname(path)
        while parent != self._root and parent.startswith(self._root):
            try:
                Path(parent).rmdir()
            except OSError:
                return
            parent = os.path.dirname(parent)

    def _scan(self, directory: str, name_prefix: str) -> list[_Entry]:
        entries: list[_Entry] = []
        try:
            with os.scandir(directory) as it:
                for e in it:
                    name = e.name
                    if not name.startswith(name_prefix) or name.startswith(TMP_PREFIX):
                        continue
                    try:
                        sort_key = name.encode()
                    except UnicodeEncodeError:
                        continue  # not UTF-8, so not written by this store and not a key
                    try:
                        if e.is_dir(follow_symlinks=False):
                            entries.append((sort_key + b"/", name, True, 0))
                        elif e.is_file(follow_symlinks=False):
                            size = e.stat(follow_symlinks=False).st_size
                            entries.append((sort_key, name, False, size))
                    except FileNotFoundError:
                        continue  # deleted while we listed
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return []  # a prefix with a part no file name can have
            raise self._os_error(exc, directory) from None
        entries.sort()
        return entries

    def _not_found(self, key: str) -> ObjectNotFound:
        return ObjectNotFound(f"object {key!r} not found in {self.description}")

    def _too_long(self, key: str) -> InvalidInput:
        return InvalidInput(
            f"bad store key {key[:60]!r}...: a part is longer than a file name may be in "
            f"{self.description} (255 bytes on most file systems)"
        )

    def _clash(self, key: str) -> Conflict:
        return Conflict(
            f"cannot store {key!r} in {self.description}: the key or one of its parents is "
            "both an object and a directory (a file system cannot hold both)"
        )

    def _os_error(self, exc: OSError, path: str) -> StoreAccessDenied | StoreUnavailable:
        """The one mapping of unexpected OS errors: permissions are permanent, the rest (a full
        disk, an I/O error, a stale NFS handle) may pass."""
        if isinstance(exc, PermissionError):
            return StoreAccessDenied(f"{self.description}: permission denied on {path}")
        return StoreUnavailable(f"{self.description}: {exc.strerror or exc} on {path}")


def _fsync_dir(path: str) -> None:
    """Make the entries of directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
