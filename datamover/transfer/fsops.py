"""Safe writes into a local tree: never through a symlink, never a partial file at a final path.

Every operation works relative to directory file descriptors opened with `O_NOFOLLOW` from
the dataset root, so a planted `lig0000 -> /etc` cannot redirect a write. A new file is
written without a name (`O_TMPFILE`) in its destination directory, given its mode and mtime,
and then linked at its path, which it never replaces; where the file system has no unnamed
files (NFS, Lustre), and for a file that replaces another, it is written under a temporary
name (`.dm-<16 hex>.part`) and renamed into place. `TreeWriter` is used from one thread only.

Sparse files: with `sparse` (`[transfer] sparse`, the default), an all-zero chunk of at least
`MIN_HOLE` bytes is not written but skipped over, and the file's size set at the end, so a
file that was sparse at the source (a preallocated or mostly empty image) does not take its
whole size on the cache's disk. What a reader sees is the same bytes.

Permissions, as rsync does: a directory whose recorded mode is read-only (0o555) is given
its owner's write and search bits while datamover writes into it (only after a write was
refused: no extra system call on the normal path), and its mode is restored at the end
(`TreeWriter.unlocked`, `restore_modes`). A permission problem that cannot be worked around
(a directory of another user) is a one-line `PermanentError` naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, TypeVar

import blake3

from datamover.chunking.codec import MAX_RAW_CHUNK
from datamover.domain.manifest import Entry
from datamover.errors import Conflict, DatamoverError, InvalidInput, NotFound, PermanentError
from datamover.transfer import crossfs, mounts

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A directory only passed through on the way to the dataset's: search permission suffices.
_PASS_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_DIR_FDS = 64

T = TypeVar("T")
#: Owner write and search: what a directory needs for entries to be created in it.
OWNER_WX = stat.S_IWUSR | stat.S_IXUSR
#: How many trashed paths a writer remembers by name (the rest are only counted).
TRASHED_SAMPLE = 100

log = logging.getLogger(__name__)

#: `renameat2(2)`'s flags: fail with EEXIST instead of replacing the destination; swap the
#: two names atomically.
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
#: What `renameat2` fails with where the file system does not take a flag (NFS, Lustre).
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)
#: Moves to the trash of what a user keeps saving at a new file's path before stage gives
#: up on it (`rename_into_place`).
_PLACE_ATTEMPTS = 3


#: A new file without a name (`TreeWriter._write_unnamed`), where the kernel has them and
#: `/proc/self/fd` can give them one (`linkat` through it needs no privilege, unlike
#: `AT_EMPTY_PATH` before Linux 6.10).
_UNNAMED_FILE = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC if hasattr(os, "O_TMPFILE") else 0
_PROC_FD = "/proc/self/fd"
_HAS_UNNAMED = bool(_UNNAMED_FILE) and os.path.isdir(_PROC_FD)
#: What opening one fails with where the file system has none: EISDIR before Linux 3.11.
_NO_UNNAMED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS)


def _saved_again(rel: str) -> Conflict:
    """A new file's path a user saved at again each time stage moved what was there to the
    trash (`_PLACE_ATTEMPTS` times)."""
    return Conflict(
        f"{clipped(rel)!r} was saved again each time stage moved it to the trash "
        f"({_PLACE_ATTEMPTS} times); it was left as it is: stage again once nothing writes "
        "there",
        [rel],
    )


def _rename2(dfd: int, src: str, dst: str, flag: int) -> int:
    """`renameat2(2)` of `src` to `dst`, both in directory `dfd`: 0, or the errno."""
    if _renameat2(dfd, os.fsencode(src), dfd, os.fsencode(dst), flag) == 0:
        return 0
    return ctypes.get_errno()


#: The shortest all-zero chunk left as a hole: a shorter one saves a few blocks at most and
#: fragments the file.
MIN_HOLE = 64 * 1024
#: Zeros to compare chunks with: as long as the longest chunk. Allocated with calloc and
#: only ever read, it maps the kernel's zero page and takes no memory.
_ZEROS = bytes(MAX_RAW_CHUNK)


def is_hole(data: bytes | memoryview) -> bool:
    """Whether `data` (bytes, or a memoryview of bytes: format "B") is at least `MIN_HOLE`
    bytes, all zero (a memcmp that stops at the first byte that is not: about 0.3 ms for
    8 MiB of zeros, nothing for other data)."""
    return len(data) >= MIN_HOLE and _ZEROS.startswith(data)


def split(rel: str) -> tuple[str, str]:
    """`(parent, name)` of a relative path (`parent` is "" at the root)."""
    parent, _, name = rel.rpartition("/")
    return parent, name


_temp_prefix = secrets.randbits(32)
_temp_counter = itertools.count()


def _reseed_temp_names() -> None:
    """A fresh prefix and counter in a new process: worker processes are forked from one
    fork server, and must not share its sequence of names."""
    global _temp_prefix, _temp_counter
    _temp_prefix = secrets.randbits(32)
    _temp_counter = itertools.count()


os.register_at_fork(after_in_child=_reseed_temp_names)


def temp_name() -> str:
    """A fresh temporary name matching `walk.PARTIAL_RE` (random per process, then counted:
    a system call per file for randomness would be measurable). Unique in practice, not
    guaranteed: creators retry on `FileExistsError`."""
    return f".dm-{_temp_prefix:08x}{next(_temp_counter) & 0xFFFFFFFF:08x}.part"


class FreshPartial(NamedTuple):
    """A partial file a stage made: its directory's (atime, mtime) in ns before and its
    mtime right after (None: not known, the open failed), and the file's (st_dev, st_ino)
    (None: not known)."""

    before: tuple[int, int]
    after: int | None
    ident: tuple[int, int] | None


def partial_name(entry: Entry, uid: int | None = None) -> str:
    """The stable temporary name of a large file, so a rerun can resume it: one per user
    (`uid`, default this process's effective one; -1: the name of releases before that,
    one for every user, recognised as a leftover). In a directory with the sticky bit
    (/tmp, a shared scratch) a user may not remove another's file: a partial file a
    killed stage of one user left there would otherwise hold the name for every other."""
    h = blake3.blake3(entry.path.encode())
    if uid != -1:
        h.update(b"\0%d\0" % (os.geteuid() if uid is None else uid))
    for c in entry.chunks:
        h.update(c.digest)
    return f".dm-{h.hexdigest()[:16]}.part"


_NS = 1_000_000_000
#: Probe mtimes: all nanosecond digits set (granularity), then the ends of the range.
_MTIME_PROBES = (1_700_000_000 * _NS + _NS - 1, -(1 << 63), (1 << 63) - 1)


def _exact(mtime_ns: int) -> int:
    return mtime_ns


def _probe_file(dir_fd: int) -> tuple[int, str | None]:
    """`(fd, name)` of a new file in directory `dir_fd` to probe timestamps on: unnamed
    (`O_TMPFILE`, name None) where the file system supports that, else a temporary name."""
    try:
        return os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd), None
    except OSError:  # EOPNOTSUPP: not on this file system; EISDIR: a kernel before 3.11
        tmp = temp_name()
        return os.open(tmp, _NEW_FILE, 0o600, dir_fd=dir_fd), tmp


def stored_mtime(dir_fd: int) -> Callable[[int], int]:
    """What the file system of directory `dir_fd` stores when a file's mtime is set to a
    given value (nanoseconds): probed once on a temporary file, then modelled as the kernel
    does (seconds clamped to the file system's range, nanoseconds cut to its granularity).
    A file system with 1 s timestamps, or one that cannot hold an mtime before 1901, stores
    another value than the manifest's; the identity if nothing differs or it cannot be
    probed.

    The probe's file has no name where the file system allows (`O_TMPFILE`), so the
    directory is left as it was, its mtime included (verify compares that mtime, and
    changes nothing); elsewhere it is a temporary name, removed again."""
    try:
        fd, tmp = _probe_file(dir_fd)
    except OSError:
        return _exact
    got: list[int] = []
    try:
        for ns in _MTIME_PROBES:
            os.utime(fd, ns=(ns, ns))
            got.append(os.fstat(fd).st_mtime_ns)
    except OSError:
        return _exact
    finally:
        os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
    if got == list(_MTIME_PROBES):
        return _exact
    cut = got[0] - _MTIME_PROBES[0] // _NS * _NS
    if not 0 <= cut < _NS:
        return _exact  # not a cut of the nanoseconds: no model of ours fits
    gran = _NS - cut
    lo, hi = got[1] // _NS, got[2] // _NS
    clamped_lo, clamped_hi = lo > _MTIME_PROBES[1] // _NS, hi < _MTIME_PROBES[2] // _NS

    def stored(mtime_ns: int) -> int:
        sec, nsec = divmod(mtime_ns, _NS)
        if clamped_lo and sec <= lo:
            return lo * _NS
        if clamped_hi and sec >= hi:
            return hi * _NS
        return sec * _NS + nsec - nsec % gran

    return stored


def lazy_stored_mtime(dir_fd: int) -> Callable[[int], int]:
    """`stored_mtime(dir_fd)`, probed when first called (from one thread): a file whose
    mtime is not the manifest's is rare, and without `O_TMPFILE` the probe changes the
    directory's mtime."""
    model: list[Callable[[int], int]] = []

    def stored(mtime_ns: int) -> int:
        if not model:
            model.append(stored_mtime(dir_fd))
        return model[0](mtime_ns)

    return stored


def same_mtime(local_ns: int, entry_ns: int, stored: Callable[[int], int]) -> bool:
    """Whether a local mtime is the entry's, as the file system stores it (`stored`, a
    `stored_mtime` model, asked only when the two differ)."""
    return local_ns == entry_ns or local_ns == stored(entry_ns)


def denied(shown: str, exc: OSError) -> PermanentError:
    """The one-line error for a permission problem datamover cannot work around (a long
    path cut in the message: `clipped`)."""
    reason = exc.strerror or type(exc).__name__
    return PermanentError(
        f"{clipped(shown)!r}: {reason.lower()} (check the owner and mode of it and of its "
        "directory)",
        [shown],
    )


def named(exc: OSError, path: str | Path) -> OSError:
    """`exc` naming `path`, when it names no file: a write, `fchmod` or `utime` through a
    descriptor fails with a bare "No space left on device", which says nothing of where."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, str(path))


def open_dir(name: str, parent_fd: int, shown: str, flags: int = _DIR_FLAGS) -> int:
    """Open directory `name` below `parent_fd` without following a symlink (`flags`: for
    reading, or `_PASS_FLAGS` to pass through it)."""
    try:
        return os.open(name, flags, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Conflict(
                f"{shown!r} is not a directory (a symlink or a file is in the way); refusing "
                "to write through it"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise denied(shown, exc) from None
        raise


def _not_a_directory(base: Path) -> InvalidInput:
    """The error for a configured namespace directory that is a file (or lies below one)."""
    return InvalidInput(f"{base}: is not a directory ([namespace] maps the dataset there)")


def check_state_outside(state_dir: Path, dataset: str, root: Path) -> None:
    """`InvalidInput` if the site's state directory lies in the tree of `dataset` (its local
    directory `root`): a push would publish the catalog, caches and trash, and a stage with
    `--delete` would try to move the state directory into its own trash (failing for
    ever). Compared as written, normalised, as the configuration compares them, and with
    symlinks resolved: a state directory reached through a link into the tree had been
    pushed with the tree (its lock files staged at other sites), and every `stage
    --delete` failed moving it into its own trash."""
    state = Path(os.path.normpath(state_dir))
    tree = Path(os.path.normpath(root))
    if state.is_relative_to(tree) or Path(os.path.realpath(state)).is_relative_to(
        os.path.realpath(tree)
    ):
        raise InvalidInput(
            f"{dataset!r}: the site's state directory {str(state)!r} lies in its tree "
            f"{str(tree)!r}; set [site] state_dir outside every dataset's tree"
        )


def check_root(base: Path, parts: Sequence[str]) -> None:
    """Check that the dataset directory `base/parts...` exists as stage would write it: every
    component below the configured directory `base` (trusted site configuration, which may
    itself be a symlink) a real directory, not a symlink.

    Raises `NotFound` when it is missing, `InvalidInput` when a component is a symlink or
    not a directory: push must not read, nor verify compare, a tree reached through a link
    (it may lead outside the namespace), and stage never writes through one. A component
    this process may not look into is `PermanentError` naming it, not "does not exist".
    """
    missing = f"{base.joinpath(*parts)}: the dataset's local directory does not exist"
    try:
        base_mode = os.stat(base).st_mode
    except FileNotFoundError:
        raise NotFound(missing) from None
    except NotADirectoryError:
        raise _not_a_directory(base) from None  # it lies below a file
    except PermissionError as exc:
        raise denied(str(base), exc) from None
    if not stat.S_ISDIR(base_mode):
        raise _not_a_directory(base)
    path = base
    for name in parts:
        path = path / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise NotFound(missing) from None
        except PermissionError as exc:
            raise denied(str(path), exc) from None
        if stat.S_ISLNK(mode):
            raise InvalidInput(
                f"{path}: is a symlink, not the dataset's directory (datamover never reads "
                "or writes through it)"
            )
        if not stat.S_ISDIR(mode):
            raise InvalidInput(f"{path}: is not a directory")


def open_root(base: Path, components: Sequence[str], create: bool = True) -> int:
    """Open (with `create`, creating as needed) `base/components...` without following
    symlinks below `base`.

    `base` is the namespace's configured local directory (trusted, site configuration);
    every component below it comes from a logical path and is opened with `O_NOFOLLOW`.
    `base` itself is never made: missing, it is `NotFound` with `create` (`check_base`),
    `FileNotFoundError` without. Only the last directory is opened for reading; those above
    it are passed through (`O_PATH`), which needs search permission only, as a lookup by
    path does (a 0o711 home or project directory above the dataset). A directory that
    cannot be created or opened for lack of permission is `PermanentError`.
    """
    shown = str(base)
    try:
        fd = os.open(base, (_PASS_FLAGS if components else _DIR_FLAGS) & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        if create:
            raise _missing_base(base) from None
        raise
    except PermissionError as exc:
        raise denied(shown, exc) from None
    except NotADirectoryError:  # `base`, or a directory above it, is a file
        raise _not_a_directory(base) from None
    try:
        for i, name in enumerate(components, 1):
            shown = os.path.join(shown, name)
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                except PermissionError as exc:
                    raise denied(shown, exc) from None
            child = open_dir(name, fd, shown, _DIR_FLAGS if i == len(components) else _PASS_FLAGS)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_base(base: Path) -> None:
    """`NotFound` if `base`, a namespace's configured local directory, does not exist.

    Stage makes the directories of a dataset inside it, never the directory itself: a
    mistyped `[namespace]` path would otherwise get a new tree made wherever it points,
    and a path on a file system that is not mounted (`/lustre/proj` under an empty
    `/lustre`) would fill the disk below the mount point. A loop of symbolic links on
    the way is `InvalidInput` naming it (the configuration's to mend, not the system's)."""
    try:
        os.stat(base)
    except FileNotFoundError:
        raise _missing_base(base) from None
    except OSError as exc:  # not a directory, no permission: named where it is opened
        if exc.errno == errno.ELOOP:
            raise InvalidInput(
                f"{base}: the namespace's local directory is reached through a loop of "
                "symbolic links"
            ) from None


def _missing_base(base: Path) -> NotFound:
    return NotFound(
        f"{base}: the namespace's local directory does not exist; stage makes the "
        "directories of datasets in it, never it (a mistyped [namespace] path, or a file "
        "system not mounted?)"
    )


def _private_dirs(path: Path) -> None:
    """Make directory `path` and every missing one above it, each 0o700: a trash holds
    other users' files with their modes (and, moved as root, their owners), which must not
    be reached through it (`Path.mkdir(parents=True)` gives the parents it makes 0o777)."""
    missing: list[Path] = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(made, 0o700)


def _free_name(at: int, name: str, directory: bool) -> str:
    """`name`, or `name~N` (cut to fit 255 bytes) for the first N that is free in directory
    `at` (a descriptor); with `directory`, a real directory there is good too (made if
    missing)."""
    for n in itertools.count():
        if n:
            suffix = f"~{n}"
            candidate = name.encode()[: 255 - len(suffix)].decode(errors="ignore") + suffix
        else:
            candidate = name
        try:
            st = os.stat(candidate, dir_fd=at, follow_symlinks=False)
        except FileNotFoundError:
            if not directory:
                return candidate
            with contextlib.suppress(FileExistsError):  # another writer made it: look again
                os.mkdir(candidate, 0o700, dir_fd=at)
            st = os.stat(candidate, dir_fd=at, follow_symlinks=False)
        if directory and stat.S_ISDIR(st.st_mode):
            return candidate
    raise AssertionError("unreachable")


#: The longest path a message shows whole; a longer one is cut in its middle (`clipped`).
_SHOWN_PATH = 200


def clipped(path: str | Path) -> str:
    """`path` for a one-line message: whole up to `_SHOWN_PATH` characters, else its start
    and end around an ellipsis (a tree may be thousands of levels deep: a message of
    12 KB is no line)."""
    text = str(path)
    if len(text) <= _SHOWN_PATH:
        return text
    return f"{text[: _SHOWN_PATH // 2 - 10]}...{text[-(_SHOWN_PATH // 2) :]}"


def _chmod_at(dfd: int, name: str, mode: int) -> None:
    """Give `name` in directory `dfd` `mode`, following no symlink (through its `O_PATH`
    descriptor: `fchmodat` cannot, for a name)."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):
            os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _writable_partial(dfd: int, name: str) -> bool:
    """After opening the partial file `name` (in directory `dfd`) for writing was refused,
    make it so the open can be tried again; False where nothing here can help (there is
    no such file: the directory refused to create it).

    A regular file of this process's user with one link that lacks its owner's read or
    write bit is given them (through an `O_PATH` descriptor, following no link):
    `finish_partial` gives a partial file the entry's mode before its rename, and a run
    stopped between the two (killed, or the rename failed) left a read-only one, which
    every later run was refused for good. Any other file there is not ours to write
    through (`open_partial`): it is removed, to be created anew."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
            rw = stat.S_IRUSR | stat.S_IWUSR
            if st.st_mode & rw == rw:
                return False  # refused for another reason: nothing to give
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | rw)
            return True
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dfd)  # refused: `_unlocking` makes the directory writable
    return True


#: `replaces` for a path where the walk saw nothing: whatever is there is not datamover's.
_NOTHING = (-1, -1, -1)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """`(inode, size, mtime)`: what shows that a file was not changed between two looks."""
    return st.st_ino, st.st_size, st.st_mtime_ns


class TreeWriter:
    """Writes below one root directory fd. See the module docstring.

    `trashed` holds the first `TRASHED_SAMPLE` trashed paths, `trashed_count` counts all;
    `removed` counts the entries `remove` unlinked as planned;
    `unlocked` maps each directory (relative path) this writer made writable to its mode
    before that, until `set_attrs` or `restore_modes` gives it its mode back.
    `stored_mtime` is what the file system stores for an mtime (a `stored_mtime` model;
    default: `lazy_stored_mtime` of the root, probed the first time an mtime is not the
    entry's exactly), so that `set_attrs` leaves one that is the entry's as stored.
    """

    def __init__(
        self,
        root_fd: int,
        root_path: Path,
        trash_dir: Path | None = None,
        *,
        sparse: bool = False,
        stored_mtime: Callable[[int], int] | None = None,
        trash_run: Path | None = None,
    ) -> None:
        self.root_fd = root_fd
        self.root_path = root_path
        self.trash_dir = trash_dir
        #: The stage run's directory in the trash (`trash_dir` is below it): its mtime is
        #: set to now after every move, as the trash ages a run by its last move
        #: (`trash.runs`), not by the start a long stage had a day before.
        self.trash_run = trash_run
        self.sparse = sparse
        self.stored_mtime = stored_mtime or lazy_stored_mtime(root_fd)
        self.trashed: list[str] = []
        self.trashed_count = 0
        self.removed = 0
        self.unlocked: dict[str, int] = {}
        self._fds: OrderedDict[str, int] = OrderedDict()
        #: Whether a new file is written unnamed and then linked (`_write_unnamed`).
        self._unnamed = _HAS_UNNAMED
        #: Whether a new file is renamed into place without replacing (`rename_into_place`).
        self._noreplace = _renameat2 is not None
        #: Whether a file replaces another by exchanging names (`_exchange_into_place`).
        self._exchange = _renameat2 is not None

    def close(self) -> None:
        """Close cached directory descriptors (not the root)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def dir_fd(self, rel: str) -> int:
        """Descriptor of directory `rel`, opened component by component with O_NOFOLLOW
        from the nearest directory already open (in a loop: a tree may be thousands of
        levels deep)."""
        if not rel:
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        below = [rel]  # the directories to open, deepest first
        while (up := split(below[-1])[0]) and up not in self._fds:
            below.append(up)
        fd = self._fds[up] if up else self.root_fd
        for path in reversed(below):
            fd = open_dir(split(path)[1], fd, path)  # before the cache may close its parent
            self._fds[path] = fd
            if len(self._fds) > _MAX_DIR_FDS:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def _forget(self, rel: str) -> None:
        for key in [k for k in self._fds if k == rel or k.startswith(rel + "/")]:
            os.close(self._fds.pop(key))

    # -- permissions (only after a refusal) -------------------------------------------------

    def _unlock(self, rel: str, exc: OSError, shown: str) -> None:
        """After `exc` refused a change in directory `rel`: give the directory its owner's
        write and search bits, remembering its mode, so the caller can try once more.
        Raise `PermanentError` naming `shown` when that cannot help."""
        if not isinstance(exc, PermissionError):
            raise exc
        fd = self.dir_fd(rel)
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & OWNER_WX == OWNER_WX:
            return  # already writable (another worker unlocked it): just try again
        try:
            os.fchmod(fd, mode | OWNER_WX)
        except PermissionError:
            raise denied(shown, exc) from None
        self.unlocked.setdefault(rel, mode)

    def restore_modes(self) -> bool:
        """Give every directory still in `unlocked` its mode back (deepest first); whether
        each one got it (a directory gone meanwhile counts as given back)."""
        restored = True
        for rel in sorted(self.unlocked, key=len, reverse=True):
            mode = self.unlocked.pop(rel)
            try:
                os.fchmod(self.dir_fd(rel), mode)
            except FileNotFoundError:
                pass
            except (OSError, Conflict, PermanentError):
                restored = False
        return restored

    def _unlocking(self, parent: str, shown: str, op: Callable[[], T]) -> T:
        """`op()`, a change in directory `parent`; if it is refused, once more after
        `_unlock`. A second refusal is `PermanentError` naming `shown`."""
        try:
            return op()
        except PermissionError as exc:
            self._unlock(parent, exc, shown)
        try:
            return op()
        except PermissionError as again:
            raise denied(shown, again) from None

    def _new_temp(self, parent: str, shown: str, create: Callable[[str], T]) -> tuple[T, str]:
        """`(create(name), name)` for a fresh temporary name in directory `parent`, skipping
        names that are taken (`FileExistsError`), unlocking the directory if refused."""

        def attempt() -> tuple[T, str] | None:
            tmp = temp_name()
            try:
                return create(tmp), tmp
            except FileExistsError:
                return None

        for _ in range(8):
            made = self._unlocking(parent, shown, attempt)
            if made is not None:
                return made
        raise Conflict(f"{shown!r}: cannot find a free temporary name in its directory")

    # -- operations -------------------------------------------------------------------------

    def mkdir(self, rel: str) -> None:
        """Create directory `rel` (its mode and mtime are set at the end of the stage)."""
        parent, name = split(rel)
        dfd = self.dir_fd(parent)

        def make() -> None:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=dfd)

        self._unlocking(parent, rel, make)

    def remove(self, rel: str, seen: tuple[bool, int, int] | None = None) -> None:
        """Unlink a file or symlink that datamover itself wrote.

        `seen` is how the plan saw it (is a symlink, size, mtime): if it has changed since
        (a user saved into it meanwhile), it is moved to the trash instead.
        """
        parent, name = split(rel)
        dfd = self.dir_fd(parent)
        if seen is not None:
            try:
                st = os.lstat(name, dir_fd=dfd)
            except FileNotFoundError:
                return
            if (stat.S_ISLNK(st.st_mode), st.st_size, st.st_mtime_ns) != seen:
                self.trash(rel)
                return
            self.removed += 1

        def unlink() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)

        self._unlocking(parent, rel, unlink)

    def drop_leftover(self, rel: str, ours: bool) -> None:
        """A killed stage's leftover partial file or temporary `rel`: removed when `ours`
        (a partial file of a file the stage knows, `partial_name`), else moved to the trash
        (it might be a user's file with such a name). One of another user that this user
        may not remove or move (a directory with the sticky bit; a file only its owner may
        read, for a copy into a trash on another file system) is left where it is, with a
        warning: every user's partial files have names of their own, so it stands in the
        way of no stage; verify still names it."""
        try:
            if ours:
                self.remove(rel)
            else:
                self.trash(rel)
        except PermanentError:
            parent, name = split(rel)
            dfd = self.dir_fd(parent)
            try:
                owner = os.lstat(name, dir_fd=dfd).st_uid
            except FileNotFoundError:
                return
            if owner == os.geteuid():
                raise  # (a full or read-only trash is no PermanentError: it stops the stage)
            log.warning(
                "left %r: a partial file of an interrupted stage of user %d, which this "
                "user may not remove or move to the trash",
                clipped(rel),
                owner,
            )

    def _refuse_mounts(self, rel: str) -> None:
        """`PermanentError` if `rel` is a directory with a mount point at or below it
        (`mounts`): renamed into the trash the mounted file system would go with it, and
        emptying the trash would delete its files (copied to a trash on another file
        system, they were copied and removed). Nothing is moved."""
        parent, name = split(rel)
        point = mounts.mounted_at(self.dir_fd(parent), name)
        if point is not None:
            raise PermanentError(
                f"{clipped(rel)!r} holds a mount point ({point}); it was left in place, not "
                "moved to the trash: unmount it, or move it out of the tree, and stage again",
                [rel],
            )

    def rename_into_place(
        self, tmp: str, rel: str, dfd: int, replaces: tuple[int, int, int] | None
    ) -> None:
        """Rename `tmp` to `rel` (both in directory `dfd`). Over a file or symlink the walk
        saw as `replaces`: `make_way` first. Where the walk saw nothing: without replacing
        (`renameat2` with `RENAME_NOREPLACE`, no extra system call), and what a user put
        there since goes to the trash first; where the file system cannot rename so (NFS:
        EINVAL), it is looked for first (`fstatat`), for every new file of this writer."""
        name = split(rel)[1]
        if replaces is None and self._noreplace:
            # Renamed without replacing until it goes in: what a user saves there again
            # between a move to the trash and the rename goes to the trash too (an
            # exchange here would take it out and unlink it, unchecked).
            err = self._without_replacing(rel, lambda: _rename2(dfd, tmp, name, _RENAME_NOREPLACE))
            if err == 0:
                return
            if err not in _UNSUPPORTED:
                raise OSError(err, os.strerror(err), rel)
            self._noreplace = False
        if replaces is None and not self._noreplace:
            replaces = _NOTHING
        self.make_way(rel, dfd, replaces)
        if replaces is not _NOTHING and self._exchange_into_place(tmp, rel, dfd, replaces):
            return
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def _exchange_into_place(
        self, tmp: str, rel: str, dfd: int, replaces: tuple[int, int, int] | None = None
    ) -> bool:
        """Replace the file at `rel` by `tmp` with one atomic exchange of their names, then
        unlink the replaced file, now under `tmp`; False (nothing done) where there is no
        file at `rel` any more, or the file system cannot exchange (then this writer stops
        trying). The path names a whole file throughout, as with a rename over it.

        What the exchange took out is looked at again (one `fstatat`) when the walk saw
        `replaces` there: if it is not that file any more (a user saved into it, or renamed
        another file or a directory onto the name, after `make_way` looked), it goes to the
        trash instead of being unlinked. A rename over the file, where there is no
        exchange, cannot tell: that window stays there.

        Not a rename over the file: ext4 takes that as a file being replaced and, in the
        rename, starts writing back the new file's pages (`auto_da_alloc`). Measured with
        10,000 files of 4 KiB replaced one by one: 168 us a file against 130 us exchanged and
        unlinked; a stage of 20,000 such files over an older version's: 2.86 s against
        3.08 s (means of four).
        """
        name = split(rel)[1]
        err = _rename2(dfd, tmp, name, _RENAME_EXCHANGE)
        if err:
            if err in _UNSUPPORTED:
                self._exchange = False
            elif err in (errno.EPERM, errno.EACCES):
                # An immutable file (`chattr +i`), or another user's in a directory with
                # the sticky bit: named with the hint, exit 7, as a directory's refusal is.
                raise denied(rel, OSError(err, os.strerror(err), rel))
            elif err != errno.ENOENT:
                raise OSError(err, os.strerror(err), rel)
            return False
        changed = False
        if replaces is not None:
            try:
                changed = _identity(os.lstat(tmp, dir_fd=dfd)) != replaces
            except FileNotFoundError:
                return True  # removed meanwhile: nothing left to keep
        try:
            if not changed:
                os.unlink(tmp, dir_fd=dfd)
                return True
        except IsADirectoryError:
            pass
        # What took the name since `make_way` looked (a directory, a user's newer file):
        # swap back, move it to the trash as `make_way` would have, and rename the file
        # into its place.
        err = _rename2(dfd, tmp, name, _RENAME_EXCHANGE)
        if err:
            raise OSError(err, os.strerror(err), rel)
        self.trash(rel)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        return True

    def make_way(self, rel: str, dfd: int, replaces: tuple[int, int, int] | None) -> None:
        """Just before a rename over `rel` (in directory `dfd`), which the plan saw as a
        file or symlink datamover wrote, `replaces` its `(inode, size, mtime)`: if what is
        there now is not that (a user saved into it since the walk), it is moved to the
        trash, as a file the walk found changed is. One `fstatat`, only for a replacement."""
        if replaces is None:
            return
        try:
            st = os.lstat(split(rel)[1], dir_fd=dfd)
        except FileNotFoundError:
            return
        if replaces is _NOTHING or _identity(st) != replaces:
            self.trash(rel)

    def trash(self, rel: str) -> None:
        """Move `rel` (any kind, a whole directory included) into the trash, never delete it.

        It goes to `trash_dir/rel` unless something is there already (`_trash_dest`): an
        earlier move never loses what it moved, and nothing is moved through a symlink the
        trash holds. The trash's directories are made and opened one below the other, and
        the move is a rename between two directory descriptors: a path deeper than
        PATH_MAX goes to the trash as a short one does. A message shows a long path cut
        (`clipped`).

        Raises a one-line `PermanentError` when it cannot be moved (a `DatamoverError`, exit
        1, where the trash is full or read-only); then `rel` is where it was (a partial copy
        into the trash is removed again), and the caller must not write over it.
        """
        if self.trash_dir is None:
            raise ValueError("this TreeWriter has no trash directory")
        parent, name = split(rel)
        self._refuse_mounts(rel)
        self._forget(rel)
        dest = str(self.trash_dir / rel)
        out = -1
        try:
            out, to, dest = self._trash_dest(self.trash_dir, rel)
            dfd = self.dir_fd(parent)
            for attempt in range(3):
                try:
                    os.rename(name, to, src_dir_fd=dfd, dst_dir_fd=out)
                    break
                except FileNotFoundError:
                    return
                except PermissionError as exc:
                    # First the parent; then `rel` itself (a directory moved to another
                    # parent must be writable, for its `..`).
                    if attempt == 2 or (attempt == 1 and not self._is_dir(dfd, name)):
                        raise
                    self._unlock(rel if attempt else parent, exc, rel)
                    self._forget(rel)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    # Another file system (state on local disk, data on a parallel file
                    # system): copied, then removed, through descriptors only
                    # (`crossfs.move_across`), so a symlink swapped into the path, or for
                    # the entry or a directory inside it, meanwhile cannot send the copy or
                    # the removal elsewhere. A failed copy is removed again and the original
                    # left whole; so is a copy of a file that changed while it was copied;
                    # of a directory, only what did not change is removed. A parent this
                    # user may not change is unlocked first, as for a rename: the copy
                    # had been made, then the original could not be removed, at every
                    # stage, each leaving one more copy in the trash.
                    if not os.access(".", os.W_OK | os.X_OK, dir_fd=dfd):
                        refused = PermissionError(errno.EACCES, "Permission denied")
                        self._unlock(parent, refused, rel)
                        if not os.access(".", os.W_OK | os.X_OK, dir_fd=dfd):
                            raise refused from None  # another user's: unlocking cannot help
                    crossfs.move_across(dfd, name, out, to)
                    break
            if self.unlocked:
                # Its mode goes with it; nothing below it is ours to restore any more.
                mode = self.unlocked.pop(rel, None)
                if mode is not None:
                    with contextlib.suppress(OSError):
                        _chmod_at(out, to, mode)
                for key in [k for k in self.unlocked if k.startswith(rel + "/")]:
                    del self.unlocked[key]
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            # A full or read-only trash is the system refusing (exit 1, as the README gives
            # "no space left"), not a refusal to this user (exit 7): a script or hook tells
            # "free some space" from "fix the permissions" by it.
            system = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
            raise (DatamoverError if system else PermanentError)(
                f"cannot move {clipped(rel)!r} to the trash ({clipped(dest)}): {reason}; it "
                "was left in place and nothing was written over it",
                [rel],
            ) from None
        finally:
            if out >= 0:
                os.close(out)
        if self.trash_run is not None:
            with contextlib.suppress(OSError):  # made by `_trash_dest`, 0o700, ours
                os.utime(self.trash_run)
        self.note_trashed([rel])

    @staticmethod
    def _trash_dest(trash_dir: Path, rel: str) -> tuple[int, str, str]:
        """A free place for `rel` in `trash_dir`, its directories made: `trash_dir/rel`, or
        where that is taken, the first name with a `~N` suffix that is free (the last
        component) or a real directory (one above it). Returns `(fd, name, path)`: the
        descriptor of its directory (the caller closes it), its name there, and its whole
        path (for messages). Below `trash_dir`, each directory is made and opened in the one
        above it, without following a symlink, so no path is longer than `trash_dir`'s.

        One run may trash a path twice (a user saves a file again after its first move, and
        the stage's rename then finds it there), or trash a symlink where the version has a
        directory and later something below that directory: a rename to `trash_dir/rel`
        replaced the first move's file, and went through the trashed symlink into whatever
        directory it points at."""
        _private_dirs(trash_dir)
        fd = os.open(trash_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            *dirs, last = rel.split("/")
            names = []
            for name in dirs:
                free = _free_name(fd, name, directory=True)
                inner = os.open(free, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
                names.append(free)
            to = _free_name(fd, last, directory=False)
        except BaseException:
            os.close(fd)
            raise
        return fd, to, os.path.join(trash_dir, *names, to)

    def note_trashed(self, rels: Sequence[str], count: int | None = None) -> None:
        """Count `count` paths (default: `len(rels)`) as trashed, by this writer or by a
        worker process's for it, and remember `rels`, the first of them (a worker sends
        only a sample of its names, `TRASHED_SAMPLE`, with their count), up to the sample."""
        self.trashed_count += len(rels) if count is None else count
        self.trashed.extend(rels[: TRASHED_SAMPLE - len(self.trashed)])

    @staticmethod
    def _is_dir(dfd: int, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode)
        except OSError:
            return False

    def write_file(
        self,
        entry: Entry,
        parts: Sequence[bytes | memoryview],
        replaces: tuple[int, int, int] | None = None,
    ) -> None:
        """Write a whole file under a temporary name, set mode and mtime, rename into place
        (over the file the plan saw as `replaces`: `make_way`). With `sparse`, all-zero parts
        (`is_hole`) are skipped over instead of written."""
        parent = split(entry.path)[0]
        dfd = self.dir_fd(parent)
        if replaces is None and self._unnamed and self._write_unnamed(entry, parts, dfd):
            return
        tmp = temp_name()
        try:
            fd = os.open(tmp, _NEW_FILE, 0o600, dir_fd=dfd)
        except (FileExistsError, PermissionError):  # the slow path: retried, unlocked
            fd, tmp = self._new_temp(
                parent, entry.path, lambda t: os.open(t, _NEW_FILE, 0o600, dir_fd=dfd)
            )
        try:
            try:
                self._fill(fd, entry, parts)
            finally:
                os.close(fd)
            self.rename_into_place(tmp, entry.path, dfd, replaces)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise

    def _fill(self, fd: int, entry: Entry, parts: Sequence[bytes | memoryview]) -> None:
        """Write `parts` to the new file `fd` and give it the entry's mode and mtime; an
        `OSError` is raised naming the file (`named`). The mode is set whatever the file
        was created with: the umask, or a directory's default ACL instead, may have taken
        bits from that."""
        try:
            size, holes = 0, False
            for part in parts:
                view = memoryview(part).cast("B")
                size += len(view)
                if self.sparse and is_hole(view):
                    os.lseek(fd, len(view), os.SEEK_CUR)
                    holes = True
                    continue
                while view:
                    view = view[os.write(fd, view) :]
            if holes:
                os.ftruncate(fd, size)  # a hole at the end, too, is part of the file
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        except OSError as exc:
            raise named(exc, self.root_path / entry.path) from None

    def _write_unnamed(self, entry: Entry, parts: Sequence[bytes | memoryview], dfd: int) -> bool:
        """Write a new file as an unnamed one in directory `dfd` (`O_TMPFILE`), complete
        with its mode and mtime, then give it its name (`linkat` of `/proc/self/fd/N`,
        which never replaces: what a user put there since the walk goes to the trash
        first). Until then no name shows it, and a stage killed before leaves nothing
        behind. False, with nothing written, where this cannot be done: the file system
        has no unnamed files (NFS, Lustre; this writer stops trying), the directory
        refuses a new file (the caller's path unlocks it), or the link is refused for a
        reason other than a full disk (the caller writes the file again, named)."""
        try:
            fd = os.open(".", _UNNAMED_FILE, 0o600, dir_fd=dfd)
        except PermissionError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_UNNAMED:
                raise named(exc, self.root_path / entry.path) from None
            self._unnamed = False
            return False
        try:
            self._fill(fd, entry, parts)
            return self._link_into_place(fd, entry.path, dfd)
        finally:
            os.close(fd)

    def _link_into_place(self, fd: int, rel: str, dfd: int) -> bool:
        """Name the unnamed file `fd` `rel` (in directory `dfd`), never over anything: what
        a user put there since the walk goes to the trash first. False where the link is
        refused (this writer stops trying)."""
        name = split(rel)[1]

        def link() -> int:
            try:
                os.link(f"{_PROC_FD}/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
            except OSError as exc:
                return exc.errno or errno.EIO
            return 0

        err = self._without_replacing(rel, link)
        if err in (0, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            if err:
                raise named(OSError(err, os.strerror(err)), self.root_path / rel)
            return True
        why = os.strerror(err)
        log.info("cannot name unnamed files here (%s); writing under temporary names", why)
        self._unnamed = False
        return False

    def _without_replacing(self, rel: str, place: Callable[[], int]) -> int:
        """`place()` (0 or an errno) until what it puts at `rel` goes in: each time it
        finds something there (EEXIST), what a user put there since the walk goes to the
        trash first. Its first other answer; `Conflict` when something is there again at
        each of `_PLACE_ATTEMPTS` tries."""
        for _ in range(_PLACE_ATTEMPTS):
            err = place()
            if err != errno.EEXIST:
                return err
            self.trash(rel)
        raise _saved_again(rel)

    def open_partial(self, entry: Entry) -> tuple[int, int]:
        """Open the stable partial file of a large entry; return `(fd, valid_chunks)`; the
        caller owns the fd (`finish_partial` closes it).

        Chunks already in the partial file from an interrupted run are checked against their
        digests; the file is cut after the last good one, and only the rest is fetched. A
        partial name that is not a regular file of ours with one link (its name is
        predictable: a hard link to a file elsewhere, planted) is removed and created anew,
        never cut or written through; so is one of another user that may not be opened.
        One of ours that may not be written any more (a run stopped after `finish_partial`
        gave it a read-only mode, before its rename) is given its owner's read and write
        bits back (`_writable_partial`), and resumed.

        A file is cut only when it is longer than its good chunks: ext4 takes any cut to
        size 0, even of a new file, as the sign of a file being rewritten, and starts writing
        back all its dirty pages when it is closed (`auto_da_alloc`), which cost 0.25-0.33 s
        in the close of each GiB staged.
        """
        parent, _ = split(entry.path)
        dfd = self.dir_fd(parent)
        name = partial_name(entry)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

        def open_rw() -> int:
            try:
                return os.open(name, flags, 0o600, dir_fd=dfd)
            except PermissionError:
                if not _writable_partial(dfd, name):
                    raise  # the directory's refusal: `_unlocking` makes it writable
                return os.open(name, flags, 0o600, dir_fd=dfd)

        fd = self._unlocking(parent, entry.path, open_rw)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
                os.close(fd)
                fd = -1
                os.unlink(name, dir_fd=dfd)
                fd = os.open(name, flags | os.O_EXCL, 0o600, dir_fd=dfd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        try:
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
            if size != offset:  # never on a new file: see the docstring
                os.ftruncate(fd, offset)
        except BaseException:
            os.close(fd)
            raise
        return fd, good

    def open_seed(self, path: str, seen: tuple[int, int, int]) -> int | None:
        """A read-only descriptor of the file at `path` if it is still the regular file
        `seen` = `(inode, size, mtime)` the plan saw there, else None: the old copy a large
        file's new version takes the chunks it shares with it from (every one verified by
        its digest as it is copied). Never follows a symlink, never waits on a FIFO."""
        parent, name = split(path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=self.dir_fd(parent))
        except OSError:
            return None  # gone, a symlink now, or unreadable: everything is fetched
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_ino, st.st_size, st.st_mtime_ns) != seen:
            os.close(fd)
            return None
        return fd

    def partial_missing(self, entry: Entry) -> tuple[int, int] | None:
        """The access and modification times (ns) of the directory of `entry`'s partial
        file while there is none (creating it moves them: `drop_partial` gives them back),
        else None."""
        dfd = self.dir_fd(split(entry.path)[0])
        try:
            os.stat(partial_name(entry), dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = os.fstat(dfd)
            return st.st_atime_ns, st.st_mtime_ns
        return None

    def fresh_partial(self, entry: Entry, fd: int, before: tuple[int, int]) -> FreshPartial:
        """What `drop_partial` needs of the partial file `fd` of `entry` just made: its
        directory's times `before` and its mtime now, and the file's identity."""
        st = os.fstat(fd)
        after = os.fstat(self.dir_fd(split(entry.path)[0])).st_mtime_ns
        return FreshPartial(before, after, (st.st_dev, st.st_ino))

    def drop_partial(self, entry: Entry, fresh: FreshPartial) -> bool:
        """Remove `entry`'s partial file, made by this run and never written (`fresh`), and
        give its directory back the times it had before: the tree is then as it was.
        Returns False, removing nothing, unless the name holds that same empty file (or
        nothing) and the directory's mtime has not moved since the file was made (another
        change in it would be hidden)."""
        dfd = self.dir_fd(split(entry.path)[0])
        name = partial_name(entry)
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and (
            not stat.S_ISREG(st.st_mode)
            or st.st_size != 0
            or st.st_nlink != 1
            or (fresh.ident is not None and (st.st_dev, st.st_ino) != fresh.ident)
        ):
            return False
        if fresh.after is not None and os.fstat(dfd).st_mtime_ns != fresh.after:
            return False
        if st is not None:
            os.unlink(name, dir_fd=dfd)
        os.utime(dfd, ns=fresh.before)
        return True

    def finish_partial(
        self, entry: Entry, fd: int, replaces: tuple[int, int, int] | None = None
    ) -> None:
        """Give a completed large file its size (a hole its last chunks were left as,
        `is_hole`, does not extend it), mode and mtime, and rename it into place (over the
        file the plan saw as `replaces`: `make_way`). Always closes `fd`, even when it
        raises."""
        parent = split(entry.path)[0]
        try:
            dfd = self.dir_fd(parent)
            if self.sparse and os.fstat(fd).st_size < entry.size:
                os.ftruncate(fd, entry.size)
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)
        self.rename_into_place(partial_name(entry), entry.path, dfd, replaces)

    def symlink(
        self, entry: Entry, target: str, replaces: tuple[int, int, int] | None = None
    ) -> None:
        """Create (or atomically replace) the symlink of `entry`, pointing at `target` (the
        entry's target as this site writes it), over what the plan saw as `replaces`
        (`make_way`)."""
        parent = split(entry.path)[0]
        dfd = self.dir_fd(parent)
        _, tmp = self._new_temp(parent, entry.path, lambda t: os.symlink(target, t, dir_fd=dfd))
        try:
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dfd, follow_symlinks=False)
            self.rename_into_place(tmp, entry.path, dfd, replaces)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise

    def set_attrs(self, entry: Entry, seen: tuple[int, int, int] | None = None) -> None:
        """Set mode and mtime of an existing file or directory without following symlinks;
        each only where it differs (one `fstat` for two system calls saved in the usual
        case; a file or directory of another user that is as the entry says is left be).
        An mtime differs where it is not the entry's as this file system stores it
        (`stored_mtime`: a file system of whole seconds never holds the nanoseconds of a
        version pushed from another). One of another user that differs is a
        `PermanentError` naming it (`denied`).

        A file its owner made unreadable (mode 000) is reached through an `O_PATH`
        descriptor instead; a directory this writer unlocked is no longer in `unlocked`.
        With `seen`, the file's `(inode, size, mtime)` as the plan saw it, a file that is
        not that any more (a user saved into it since) is left as it is: given the entry's
        mtime, the user's bytes would pass for datamover's, and the next stage would
        replace them instead of moving them to the trash.
        """
        parent, name = split(entry.path)
        dfd = self.dir_fd(parent)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except FileNotFoundError:
            return
        except PermissionError as exc:
            self._set_attrs_by_path(entry, dfd, exc, seen)
            return
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise Conflict(
                f"{entry.path!r} was replaced by a symlink while stage ran; not changing what "
                "it points to (run stage again)",
                [entry.path],
            ) from None
        try:
            st = os.fstat(fd)
            if seen is not None and _identity(st) != seen:
                return
            if stat.S_IMODE(st.st_mode) != entry.mode:
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    self._unshare(fd, st, entry, dfd)
                    return
                os.fchmod(fd, entry.mode)
            if self._mtime_differs(fd, st, entry):
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        except PermissionError as exc:
            # Another user's (a group-shared directory this process may write into, but
            # not give a mode or mtime): named, not a bare "Operation not permitted".
            raise denied(entry.path, exc) from None
        finally:
            os.close(fd)
        self.unlocked.pop(entry.path, None)

    def _unshare(self, fd: int, st: os.stat_result, entry: Entry, dfd: int) -> None:
        """Give the file `fd` (`st` its stat), one of several names of its inode, the entry's
        mode and mtime on a copy of it renamed over it, never on the inode: a change there
        would show at every other name, and two names of one inode in the tree that the
        version gives different modes would never both be right. The copy is local, keeps
        the file's holes (`crossfs.copy_data`), its extended attributes and, as root, its
        owner; another user's file is refused as a change in place would be (`denied`).
        One the user saved into while it was copied is dropped and the file left as it is,
        and what a user saved there after goes to the trash (`make_way`)."""
        euid = os.geteuid()
        if st.st_uid != euid and euid != 0:
            raise denied(entry.path, PermissionError(errno.EPERM, os.strerror(errno.EPERM)))
        parent = split(entry.path)[0]
        out, tmp = self._new_temp(
            parent, entry.path, lambda t: os.open(t, _NEW_FILE, 0o600, dir_fd=dfd)
        )
        placed = False
        try:
            try:
                crossfs.copy_data(fd, out, st.st_size)
                if _identity(os.fstat(fd)) != _identity(st):
                    return  # saved into while copied: the user's, left as it is
                # An ACL among them, before the mode; and none the directory's default
                # gave the copy that the file did not have.
                crossfs.copy_xattrs(fd, out)
                _drop_inherited_acl(fd, out)
                made = os.fstat(out)
                if (made.st_uid, made.st_gid) != (st.st_uid, st.st_gid):
                    try:  # as root, both; else the group only (the owner is this user)
                        os.fchown(out, st.st_uid if euid == 0 else -1, st.st_gid)
                    except PermissionError as exc:
                        raise denied(entry.path, exc) from None
                os.fchmod(out, entry.mode)
                os.utime(out, ns=(entry.mtime_ns, entry.mtime_ns))
            except OSError as exc:
                raise named(exc, self.root_path / entry.path) from None
            finally:
                os.close(out)
            self.rename_into_place(tmp, entry.path, dfd, _identity(st))
            placed = True
        finally:
            if not placed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dfd)
        self.unlocked.pop(entry.path, None)

    def _mtime_differs(self, fd: int, st: os.stat_result, entry: Entry) -> bool:
        """Whether the mtime of `fd` (`st` its stat) is not `entry`'s as this file system
        stores it (`same_mtime`). The model probes on first use, with a temporary file in
        the root, which changes the root's mtime where there is no `O_TMPFILE`: where it
        could have, the mtime is looked at once more."""
        if st.st_mtime_ns == entry.mtime_ns:
            return False
        stored = self.stored_mtime(entry.mtime_ns)
        return stored == entry.mtime_ns or os.fstat(fd).st_mtime_ns != stored

    def _set_attrs_by_path(
        self, entry: Entry, dfd: int, exc: OSError, seen: tuple[int, int, int] | None = None
    ) -> None:
        """`set_attrs` for an entry that cannot be opened for reading: through an `O_PATH`
        descriptor (no read permission needed), never following a symlink."""
        name = split(entry.path)[1]
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            raise denied(entry.path, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise Conflict(f"{entry.path!r} is not a file or directory; not changing it")
            if seen is not None and _identity(st) != seen:
                return
            via = f"/proc/self/fd/{fd}"
            mode_differs = stat.S_IMODE(st.st_mode) != entry.mode
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and mode_differs:
                # Its other names would take the mode too (`_unshare`), and it cannot be
                # read to be copied.
                raise PermanentError(
                    f"{entry.path!r} shares its file with {st.st_nlink - 1} other name(s) and "
                    f"cannot be read: its mode cannot become {entry.mode:o} without theirs "
                    "changing too; make it readable, or remove its other links"
                )
            try:
                if stat.S_IMODE(st.st_mode) != entry.mode:
                    os.chmod(via, entry.mode)
                if self._mtime_differs(fd, st, entry):
                    os.utime(via, ns=(entry.mtime_ns, entry.mtime_ns))
            except PermissionError as again:
                raise denied(entry.path, again) from None
        finally:
            os.close(fd)
        self.unlocked.pop(entry.path, None)


_ACL = "system.posix_acl_access"


def _drop_inherited_acl(src: int, dst: int) -> None:
    """Remove from new file `dst` the access ACL a directory's default ACL gave it, where
    `src`, the file it copies, has none (a change of mode in place grants nothing new)."""
    try:
        os.getxattr(src, _ACL)
        return
    except OSError:
        pass
    with contextlib.suppress(OSError):
        os.removexattr(dst, _ACL)


def content_matches(root: str, entry: Entry) -> bool:
    """True when the file at `root/entry.path` holds exactly the entry's chunks (by digest);
    False when it does not, is no regular file or cannot be read (`content_problem`)."""
    return content_problem(root, entry) is None


def content_problem(root: str, entry: Entry) -> str | None:
    """None when the file at `root/entry.path` holds exactly the entry's chunks (by digest);
    else what is wrong, as a phrase to follow its path: the content differs, it is no
    longer a regular file, or it cannot be opened or read (the reason).

    Reads by the manifest's chunk boundaries, so no chunker is needed. Read-only (a file
    the version makes unreadable to its owner: `_locked_problem`). Every
    directory on the way is opened below the last without following a symlink, so a path
    longer than PATH_MAX is read as well as a short one and a link swapped in for a
    directory is not followed out of the tree. Opened without blocking: a FIFO put where
    the walk saw a file would wait for a writer forever.
    """
    try:
        fd = _open_beneath(root, entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except PermissionError as exc:
        return _locked_problem(root, entry, exc)
    except OSError as exc:
        return _unreadable(exc)
    return _compare(fd, entry)


def _compare(fd: int, entry: Entry) -> str | None:
    """`content_problem` of the file open as `fd`, which this closes."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "is no longer a regular file"
        offset = 0
        for chunk in entry.chunks:
            data = os.pread(fd, chunk.raw_length, offset)
            if len(data) != chunk.raw_length or blake3.blake3(data).digest() != chunk.digest:
                return "content differs from the version (digest mismatch)"
            offset += chunk.raw_length
        if os.pread(fd, 1, offset):
            return "content differs from the version (digest mismatch)"
        return None
    except OSError as exc:
        return _unreadable(exc)
    finally:
        os.close(fd)


def _locked_problem(root: str, entry: Entry, refused: PermissionError) -> str | None:
    """`content_problem` of a file its owner may not read. A version may hold one (mode
    0o000 or 0o200, pushed by root): staged by its owner, it is as the version says, and
    refusing to read it had verify fail, and every `stage --checksum` move it to the trash
    and fetch it again, for good. A regular file this process owns whose permission bits
    are the version's, which lack the owner's read bit, is opened with that bit given for
    the moment of the open (through its `O_PATH` descriptor, so no link is followed) and
    then its mode back; any other is reported as unreadable (a user's chmod is theirs)."""
    if entry.mode & stat.S_IRUSR:
        return _unreadable(refused)
    try:
        path_fd = _open_beneath(root, entry.path, os.O_PATH | os.O_NOFOLLOW)
    except OSError as exc:
        return _unreadable(exc)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            return "is no longer a regular file"
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != os.geteuid() or mode != entry.mode:
            # All the bits: a chmod by an owner outside the file's group clears its
            # set-group-ID bit, which could then not be put back.
            return _unreadable(refused)
        link = f"/proc/self/fd/{path_fd}"
        try:
            os.chmod(link, mode | stat.S_IRUSR)
            try:
                fd = os.open(link, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            finally:
                if stat.S_IMODE(os.fstat(path_fd).st_mode) == mode | stat.S_IRUSR:
                    os.chmod(link, mode)
        except OSError as exc:
            return _unreadable(exc)
        return _compare(fd, entry)
    finally:
        os.close(path_fd)


def _unreadable(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return "is not a regular file below a directory of the tree (a symlink is in the way)"
    if exc.errno == errno.ENOENT:
        return "is missing (removed while it was checked)"
    return f"cannot be read to compare it: {(exc.strerror or type(exc).__name__).lower()}"


def _open_beneath(root: str, rel: str, flags: int) -> int:
    """Open `rel` below directory `root`, one component at a time, following no symlink on
    the way (`flags` decide for the last component)."""
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        *dirs, name = rel.split("/")
        for part in dirs:
            inner = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            os.close(dfd)
            dfd = inner
        return os.open(name, flags | os.O_CLOEXEC, dir_fd=dfd)
    finally:
        os.close(dfd)
