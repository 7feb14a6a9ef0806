"""`PosixStore`: a Store kept as plain files under one directory (a shared file system, a disk).

Key `a/b/c` is the file `<root>/a/b/c`. Writes go to a temporary file in the target directory,
are fsynced, renamed over the final name and the directory is fsynced (as is the parent of every
directory the write had to create), so a reader sees the old object or the new one, an object
`put` has returned for survives a crash, and a crash leaves at most a stray temporary file,
which `list` ignores.
All blocking file-system work runs in worker threads (`asyncio.to_thread`).

Nothing below the root is reached through a symlink. Anyone who may write to the store
directory could otherwise replace a directory (`packs/ab`) by a link and so have the store
write, read, delete and list elsewhere. So every directory of a key is opened below the one
before it, from a descriptor of the root, with `O_NOFOLLOW`, and the file is then used by
its name in the last one. A symlink in a directory's place holds no objects: `get` and
`head` find none through it, `delete` removes none, `list` lists nothing under it (as it
lists no symlink), and `put` refuses with `StoreAccessDenied` naming it, as the store could
hold the object only by removing what someone else put there. The root itself is taken as
configured, a symlink or not.

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
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from datamover.errors import (
    BucketNotFound,
    Conflict,
    DatamoverError,
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

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# What opening a key's directories or file reports when the key cannot be there: missing, a
# file or a symlink in a directory's place (ENOTDIR, ELOOP), a part too long for a name.
_ABSENT = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)

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
        entered. Temporary files, symlinks and other non-regular files are skipped, and a
        prefix through a symlink lists nothing.
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
        entries = await asyncio.to_thread(self._scan, parts, first)
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
                sub = await asyncio.to_thread(self._scan, key.split("/"), "")
                stack.append((key + "/", iter(sub)))
            else:
                yield ObjectInfo(key, size)

    async def delete(self, key: str) -> None:
        """Remove the file (a missing one is fine) and prune directories left empty."""
        path = self._path(key)
        await asyncio.to_thread(self._delete_sync, key, path)

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
        return os.path.join(self._root, *key.split("/"))

    def _missing_root(self) -> BucketNotFound:
        return BucketNotFound(f"store directory {self._root} does not exist")

    def _open_dir(self, parts: Sequence[str]) -> int:
        """A descriptor of the directory `<root>/<parts>`, each part opened below the one
        before without following a symlink; the `OSError` of the first that fails."""
        fd = os.open(self._root, _ROOT_FLAGS)
        try:
            for part in parts:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _parent_of(self, key: str, path: str) -> int | None:
        """A descriptor of the directory `key` is in, None if the key cannot be there."""
        try:
            return self._open_dir(key.split("/")[:-1])
        except OSError as exc:
            if exc.errno in _ABSENT:
                return None
            raise self._os_error(exc, os.path.dirname(path)) from None

    def _put_sync(self, key: str, path: str, data: bytes | bytearray | memoryview) -> None:
        *parts, name = key.split("/")
        # A concurrent delete may prune a directory between opening it and creating the temp
        # file in it; making it again is enough, and it cannot loop for long.
        for _ in range(10):
            try:
                dfd = self._make_dirs(key, parts)
            except FileNotFoundError:
                continue
            tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
            try:
                fd = os.open(tmp, _NEW_FILE, 0o644, dir_fd=dfd)
                break
            except FileNotFoundError:
                os.close(dfd)
                continue
            except OSError as exc:
                os.close(dfd)
                raise self._os_error(exc, os.path.dirname(path)) from None
        else:
            raise StoreUnavailable(
                f"{self.description}: directory {os.path.dirname(path)} keeps disappearing"
            )
        try:
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                if isinstance(exc, IsADirectoryError):
                    raise self._clash(key) from None
                if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
                    raise self._too_long(key) from None
                if isinstance(exc, OSError):
                    raise self._os_error(exc, path) from None
                raise
            # The rename is durable only once the directory entry is on disk.
            try:
                os.fsync(dfd)
            except OSError as exc:
                raise self._os_error(exc, os.path.dirname(path)) from None
        finally:
            os.close(dfd)

    def _make_dirs(self, key: str, parts: Sequence[str]) -> int:
        """A descriptor of `key`'s directory, made where missing, each new one durably: the
        directory it is made in is fsynced too, or a crash could lose the new directory, and
        the object in it, after `put` returned (objects are written in dependency order:
        a pack in a new `packs/xx/` must not vanish while the manifest naming it stays).
        `FileNotFoundError` if a concurrent delete pruned a directory on the way."""
        try:
            fd = os.open(self._root, _ROOT_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing_root() from None
        except OSError as exc:
            raise self._os_error(exc, self._root) from None
        for depth, part in enumerate(parts, 1):
            try:
                try:
                    inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    with contextlib.suppress(FileExistsError):  # made meanwhile (or not one)
                        os.mkdir(part, dir_fd=fd)
                    os.fsync(fd)  # also when another put made it and may not have yet
                    inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.close(fd)
                raise
            except OSError as exc:
                error = self._no_dir(exc, key, fd, part, "/".join(parts[:depth]))
                os.close(fd)
                raise error from None
            os.close(fd)
            fd = inner
        return fd

    def _no_dir(self, exc: OSError, key: str, fd: int, part: str, where: str) -> DatamoverError:
        """What `put` says when it cannot open the directory `part` in `fd`. A symlink there
        fails with ENOTDIR (Linux, under O_DIRECTORY) or ELOOP, as a file does with the
        first, so the entry is looked at to name it."""
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            with contextlib.suppress(OSError):
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    return self._symlink(key, where)
            return self._clash(key)
        if exc.errno == errno.ENAMETOOLONG:
            return self._too_long(key)
        return self._os_error(exc, os.path.join(self._root, where))

    def _get_sync(self, key: str, path: str, offset: int, length: int | None) -> bytes:
        dfd = self._parent_of(key, path)
        if dfd is None:
            raise self._not_found(key)
        # What `head` and `list` see is what `get` reads: a symlink is no object (O_NOFOLLOW:
        # it would read whatever it points at, outside the store too), nor is a FIFO, whose
        # open would wait for a writer forever (O_NONBLOCK; fstat then refuses it).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(key.rpartition("/")[2], flags, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._not_found(key) from None
        except OSError as exc:
            # ELOOP: a symlink; ENAMETOOLONG: a key that cannot have been stored.
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENXIO):
                raise self._not_found(key) from None
            raise self._os_error(exc, path) from None
        finally:
            os.close(dfd)
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
        dfd = self._parent_of(key, path)
        if dfd is None:
            raise self._not_found(key)
        try:
            st = os.stat(key.rpartition("/")[2], dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _ABSENT:
                raise self._not_found(key) from None
            raise self._os_error(exc, path) from None
        finally:
            os.close(dfd)
        if not stat.S_ISREG(st.st_mode):
            raise self._not_found(key)
        return ObjectInfo(key, st.st_size)

    def _delete_sync(self, key: str, path: str) -> None:
        *parts, name = key.split("/")
        # The descriptor of each directory on the way, the root first: the ones left empty
        # are removed by name from the one above, through no symlink either.
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(self._root, _ROOT_FLAGS))
                for part in parts:
                    fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                os.unlink(name, dir_fd=fds[-1])
            except OSError as exc:
                if exc.errno in _ABSENT or isinstance(exc, IsADirectoryError):
                    return
                raise self._os_error(exc, path) from None
            # Empty directories would make a later `put` of a key with that name clash; a
            # put racing with this pruning makes its directory again (see `_put_sync`).
            for depth in range(len(parts) - 1, -1, -1):
                try:
                    os.rmdir(parts[depth], dir_fd=fds[depth])
                except OSError:
                    return
        finally:
            for fd in fds:
                os.close(fd)

    def _scan(self, parts: Sequence[str], name_prefix: str) -> list[_Entry]:
        try:
            fd = self._open_dir(parts)
        except OSError as exc:
            if exc.errno in _ABSENT:
                return []  # nothing there, a file or a symlink, a part no name can have
            raise self._os_error(exc, os.path.join(self._root, *parts)) from None
        entries: list[_Entry] = []
        try:
            with os.scandir(fd) as it:
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
        except OSError as exc:
            raise self._os_error(exc, os.path.join(self._root, *parts)) from None
        finally:
            os.close(fd)
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

    def _symlink(self, key: str, where: str) -> StoreAccessDenied:
        return StoreAccessDenied(
            f"cannot store {key!r} in {self.description}: {where} is a symlink, and this store "
            "writes through none (it could lead out of the store directory)"
        )

    def _os_error(self, exc: OSError, path: str) -> StoreAccessDenied | StoreUnavailable:
        """The one mapping of unexpected OS errors: permissions are permanent, the rest (a full
        disk, an I/O error, a stale NFS handle) may pass."""
        if isinstance(exc, PermissionError):
            return StoreAccessDenied(f"{self.description}: permission denied on {path}")
        return StoreUnavailable(f"{self.description}: {exc.strerror or exc} on {path}")
