"""Streaming, sorted walk of a local tree: the local side of every merge.

Yields entries in path-component order (see `domain.paths`) by visiting each directory's
names sorted, depth first, so memory is bounded by depth times directory width, never by the
tree. A directory's children are listed only when the walk moves past it, which lets the
consumer `prune()` a directory it is about to replace or does not care about.

Directories are opened relative to their parent's descriptor with `O_NOFOLLOW`, never by
path: a directory replaced by a symlink after the walk saw it (`sub -> /etc`) is not listed
through the link. One descriptor is held per level of the directory being walked.

Stage and verify walk a tree whose modes came from a version: a directory of 0o600 is its
owner's, yet its owner cannot look below it. A directory the consumer vouches for
(`allow_unlock`: its mode is the version's, not a user's chmod) gets its owner's read and
search bits when the walk is refused in it (only then: no extra system call otherwise),
and its mode back when the walk leaves it (or fails to open or list it), unless its mode
changed meanwhile, or `keep_unlocked` (stage, which sets every directory's mode at its end)
hands that to the caller in `unlocked`. The mode the walk
reports is the one it found.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from datamover.domain.manifest import Kind
from datamover.domain.paths import PARTIAL_RE, check_name, nfc, plain_names, sort_key
from datamover.errors import Conflict, DatamoverError, InvalidInput
from datamover.transfer.fsops import denied
from datamover.transfer.statahead import THREADS, Ahead, Lookups

log = logging.getLogger(__name__)


#: How many skipped special files a walk names (the rest are only counted).
SKIPPED_SAMPLE = 100
UNKNOWN = -1  # a stat field not read yet (see `Walker(stat_files=False)`)

#: Time an entry of a typed listing takes, above which its kind was not in the listing but
#: an `lstat` (`Walker._typed_timed`): a few hundred nanoseconds where it is. `PROBE`: the
#: entries timed.
UNTYPED_NS = 10_000
PROBE = 32

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Owner read and search: what the walk needs to list a directory and look at its entries.
OWNER_RX = stat.S_IRUSR | stat.S_IXUSR


@dataclass(slots=True)
class LocalEntry:
    """A node found on disk. `mode`, `size`, `mtime_ns` and `ctime_ns` come from `lstat`,
    or are `UNKNOWN` for a regular file walked with `stat_files=False` until `Walker.fill`."""

    path: str
    kind: Kind | None  # None: a special file (fifo, socket, device)
    mode: int
    mtime_ns: int
    size: int
    ino: int
    target: str | None = None
    ctime_ns: int = UNKNOWN


class Walker:
    """Iterator over a tree below `root`. Strict mode (push) rejects bad names, and raises
    `Conflict` for an entry that vanishes between its parent's listing and the walk's look at
    it (`lstat`, `readlink`, its own listing); otherwise such an entry is left out.

    With `stat_files=False`, regular files are recognised from the directory listing alone
    (no `lstat` each): a first push opens and `fstat`s every file anyway, in parallel reader
    processes, and on a cold tree a serial `lstat` per file is what the walk would wait on.

    `unlocked` maps each directory the walk gave its owner's read and search bits
    (`allow_unlock`) to its mode before, until the walk gives it back: when it leaves the
    directory, or, with `keep_unlocked`, never.

    `open_root`, if given, opens `root` (a new descriptor each call) instead of opening it
    by path: push's opens it as the directory the push started with, or raises `Conflict`.

    Where `lstat` proves slow (a network or parallel file system), the next names of each
    directory are looked up ahead on `lookup_threads` threads (`statahead`; 1: never); the
    entries are the same.
    """

    def __init__(
        self,
        root: str,
        strict: bool,
        stat_files: bool = True,
        keep_unlocked: bool = False,
        open_root: Callable[[], int] | None = None,
        lookup_threads: int = THREADS,
    ) -> None:
        self.root = root
        self.open_root = open_root
        self.strict = strict
        self.stat_files = stat_files
        self.keep_unlocked = keep_unlocked
        self.unlocked: dict[str, int] = {}
        #: Special files a strict walk skipped: the first `SKIPPED_SAMPLE` by path, and all
        #: counted.
        self.skipped_special: list[str] = []
        self.skipped_special_count = 0
        #: Names of stage's partial files (`PARTIAL_RE`) a strict walk passed over.
        self.skipped_partial: list[str] = []
        self.skipped_partial_count = 0
        # One (entries, directory descriptor, directory path) per level being walked.
        self._stack: list[tuple[Iterator[LocalEntry], int, str]] = []
        self._pending_dir: str | None = None
        self._unlockable = False  # `allow_unlock` was called for `_pending_dir`
        self._started = False
        self._lookups = Lookups(threads=lookup_threads)
        self._ahead: dict[int, Ahead] = {}  # by directory descriptor, once `_lookups.on`
        self._filling = False  # `fill` was called: regular files are looked up ahead too
        self._typed_listings = True  # listings carry file types (`_typed_timed`)
        self._skip: tuple[str, ...] | None = None  # `skip`: the bound of the entries passed
        self._skip_last = False  # whether the entry at that bound is passed too
        self._stop: tuple[str, ...] | None = None  # `stop_after`

    def close(self, wait_lookups: bool = True) -> None:
        """Close the directory descriptors still held (the walk was not finished), giving
        the directories it unlocked their modes back (unless `keep_unlocked`), and stop
        the lookups ahead (`wait_lookups`: see `statahead.Ahead.close`)."""
        while self._stack:
            _, fd, rel = self._stack.pop()
            self._leave(rel, fd, wait_lookups)
        self._lookups.close(wait_lookups)

    def _leave(self, rel: str, fd: int, wait_lookups: bool = True) -> None:
        """Done with directory `rel`: end its lookups ahead, give its mode back, close it."""
        try:
            self._drop_ahead(fd, wait_lookups)  # before the descriptor they use is closed
        finally:
            self._relock(rel, fd)
            os.close(fd)

    def _drop_ahead(self, fd: int, wait_lookups: bool = True) -> None:
        ahead = self._ahead.pop(fd, None)
        if ahead is not None:
            ahead.close(wait_lookups)

    def _typed_timed(
        self, entries: Iterator[os.DirEntry[str]]
    ) -> tuple[list[str], dict[str, str] | None]:
        """`_typed`, for stage's and verify's walks once names are looked up ahead (which
        stop at directories), or the names alone (kinds None). Where a listing leaves the
        kinds out (NFS without READDIRPLUS, some FUSE file systems), each is a slow
        `lstat` on the walk's own thread: once more than half of the first `PROBE` entries
        (or of all, in a listing of 8 or more but fewer) took over `UNTYPED_NS` each, no
        listing of this walk is typed again. Each is timed alone, and the median decides:
        one that waited for the GIL takes milliseconds where types are in the listing."""
        names: list[str] = []
        kinds: dict[str, str] | None = {}
        slow = 0
        for item in entries:
            names.append(item.name)
            if kinds is None:
                continue
            start = time.perf_counter_ns()
            kind = _kind(item)
            if len(names) <= PROBE:
                slow += time.perf_counter_ns() - start > UNTYPED_NS
            if kind is not None:
                kinds[item.name] = kind
            if len(names) == PROBE and slow > PROBE // 2:
                self._untyped()
                kinds = None
        if kinds is not None and 8 <= len(names) < PROBE and slow > len(names) // 2:
            self._untyped()
            kinds = None
        names.sort()
        return names, kinds

    def _untyped(self) -> None:
        """This walk's listings carry no file types: stop reading them (`_typed_timed`)."""
        log.debug("%s: listings here carry no file types; not reading them", self.root)
        self._typed_listings = False

    def _stat(self, name: str, fd: int) -> os.stat_result:
        """`lstat` of `name` in directory `fd`: looked up ahead, if it was."""
        ahead = self._ahead.get(fd)
        if ahead is not None:
            return ahead.stat(name)
        return self._lookups.stat(name, fd)

    def __del__(self) -> None:
        # Maybe on a lookup thread of this walk (a collection run there): it must not wait
        # for itself. Answers of a walk thrown away are never taken.
        self.close(wait_lookups=False)

    def __iter__(self) -> Walker:
        return self

    def prune(self) -> None:
        """Do not descend into the directory yielded last."""
        self._pending_dir = None

    def skip(self, key: tuple[str, ...], inclusive: bool) -> None:
        """Pass over the entries not yet yielded that sort before `key` (a sort key; with
        `inclusive`, the one at `key` too) without looking at them: none is yielded, and a
        directory among them is listed only if `key` is its own or lies below it. The
        entries after `key` come as usual. `key` must not sort before the entry yielded last."""
        self._skip, self._skip_last = key, inclusive
        pending = self._pending_dir
        if pending is not None and key[: pending.count("/") + 1] != sort_key(pending):
            self._pending_dir = None  # all of it sorts before `key`: not listed

    def stop_after(self, key: tuple[str, ...]) -> None:
        """End the walk at the first entry that sorts after `key` (a sort key), which is
        not yielded."""
        self._stop = key

    def _skipping(self, key: tuple[str, ...], is_dir: Callable[[], bool]) -> int:
        """Whether the entry at sort key `key` is walked (`_WALK`, which ends the skip),
        passed (`_PASS`) or, a directory at or above the skip's bound, entered unseen
        (`_ENTER`); `is_dir` tells whether it is a directory."""
        bound = self._skip
        assert bound is not None
        if key < bound or (self._skip_last and key == bound):
            if bound[: len(key)] == key and is_dir():  # its entries may follow the bound
                return _ENTER
            return _PASS
        self._skip = None
        return _WALK

    def allow_unlock(self) -> None:
        """Should the walk be refused in the directory yielded last, give it its owner's
        read and search bits (the caller knows its mode for the version's, one datamover
        set, not a user's chmod, which is the user's to undo)."""
        self._unlockable = self._pending_dir is not None

    def _open(self, rel: str, unlock: bool) -> int | None:
        """A descriptor of directory `rel`, opened from its parent's (still on the stack)
        without following a symlink; None if it is gone or no longer a directory. With
        `unlock`, a directory its owner may not read is given its owner's read and search
        bits first."""
        try:
            try:
                return self._open_once(rel, _DIR_FLAGS)
            except PermissionError:
                if not (unlock and self._unlock_closed(rel)):
                    raise
            try:
                return self._open_once(rel, _DIR_FLAGS)
            except OSError:
                self._relock_closed(rel)  # unlocking did not help (or it changed): as it was
                raise
        except FileNotFoundError:
            if self.strict:  # its entry went out already: it would be published empty
                if not rel:
                    raise
                raise _vanished(rel) from None
            return None  # vanished under us (non-strict) or replaced by stage
        except PermissionError as exc:
            raise self._unreadable(rel, exc) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if self.strict and rel:
                raise Conflict(
                    f"{rel!r} changed from a directory to something else while push read "
                    "the tree; nothing was published (run push again once the tree is quiet)",
                    [rel],
                ) from None
            return None

    def _open_once(self, rel: str, flags: int) -> int:
        if not rel:
            if self.open_root is not None:
                return self.open_root()
            return os.open(self.root, flags & ~os.O_NOFOLLOW)
        return os.open(rel.rpartition("/")[2], flags, dir_fd=self._stack[-1][1])

    def _unlock_closed(self, rel: str) -> bool:
        """Give directory `rel`, which could not be opened, its owner's read and search
        bits; False where that cannot help (not a directory, those bits already set, not
        the owner)."""
        try:
            fd = self._open_once(rel, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:  # an O_PATH descriptor takes no fchmod: through /proc, as fsops does
            return self._give_rx(rel, fd, lambda mode: os.chmod(f"/proc/self/fd/{fd}", mode))
        finally:
            os.close(fd)

    def _relock_closed(self, rel: str) -> None:
        """`_relock` for directory `rel`, which the walk unlocked but could not open."""
        if self.keep_unlocked or rel not in self.unlocked:
            return
        try:
            fd = self._open_once(rel, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            self.unlocked.pop(rel)
            return  # gone or replaced: nothing of the walk's to give back
        try:
            self._give_back(rel, fd, lambda mode: os.chmod(f"/proc/self/fd/{fd}", mode))
        finally:
            os.close(fd)

    def _unlock_open(self, rel: str, fd: int) -> bool:
        """Give directory `rel` (open as `fd`, whose entries could not be looked at) its
        owner's read and search bits; False where that cannot help."""
        return self._give_rx(rel, fd, lambda mode: os.fchmod(fd, mode))

    def _give_rx(self, rel: str, fd: int, chmod: Callable[[int], None]) -> bool:
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            if mode & OWNER_RX == OWNER_RX:
                return False
            chmod(mode | OWNER_RX)
        except OSError:
            return False
        self.unlocked.setdefault(rel, mode)
        return True

    def _relock(self, rel: str, fd: int) -> None:
        """Give directory `rel` (open as `fd`), which the walk leaves, its mode back if the
        walk unlocked it (unless `keep_unlocked`)."""
        if self.keep_unlocked or rel not in self.unlocked:
            return
        self._give_back(rel, fd, lambda mode: os.fchmod(fd, mode))

    def _give_back(self, rel: str, fd: int, chmod: Callable[[int], None]) -> None:
        """Give directory `rel` (open as `fd`) the mode it had before the walk unlocked it,
        if it still has the mode the walk gave it: one changed meanwhile (a stage setting a
        new version's mode as a verify walks) is not put back to an old one."""
        before = self.unlocked.pop(rel)
        try:
            # Permission bits only: a chmod by an owner outside its group drops set-group-ID.
            if os.fstat(fd).st_mode & 0o777 == (before | OWNER_RX) & 0o777:
                chmod(before)
        except OSError as exc:
            log.warning("cannot give %s its mode back: %s", Path(self.root, rel), exc.strerror)

    def _unreadable(self, rel: str, exc: PermissionError) -> DatamoverError:
        """The user's to fix, named, not an internal error: for push (strict) as for an
        unreadable file (`scan._problem`); for stage and verify, a directory in the tree
        they cannot read or search."""
        if not self.strict:
            return denied(rel or ".", exc)
        full = os.path.join(self.root, rel) if rel else self.root
        return InvalidInput(f"cannot read {full!r}: permission denied", [rel])

    def _list(self, rel: str, unlock: bool = False) -> None:
        """Open directory `rel` and push its sorted entries on the stack (`unlock`: see
        `allow_unlock`)."""
        fd = self._open(rel, unlock)
        if fd is None:
            return
        try:
            with os.scandir(fd) as it:
                # The type is read only where it is used: where a file system leaves it
                # unknown in the listing, each `is_*` is an `lstat` of its own.
                if self.strict or not self.stat_files:
                    names, kinds = _typed(it)
                elif self._lookups.on and self._typed_listings:
                    names, kinds = self._typed_timed(it)  # lookups stop at directories
                else:
                    names, kinds = sorted(e.name for e in it), None
            if self.strict:
                _check_names(rel, names, kinds or {})
        except BaseException:
            self._relock(rel, fd)
            os.close(fd)
            raise
        self._stack.append((self._entries(rel, fd, names, kinds, unlock), fd, rel))

    def _entries(
        self, rel: str, fd: int, names: list[str], kinds: dict[str, str] | None, unlock: bool
    ) -> Iterator[LocalEntry]:
        """The entries of directory `rel` (open as `fd`) from its sorted `names` and the
        `kinds` of those that are not regular files (`_typed`; None: not read), which it
        empties as it goes: each `lstat` result lives only until its entry is yielded."""
        prefix = rel + "/" if rel else ""
        base = sort_key(rel) if rel else ()
        names.reverse()

        def wanted(name: str) -> bool:  # whether the walk (or `fill`) will `lstat` `name`
            if self.strict and PARTIAL_RE.match(name):
                return False
            return kinds is None or self.stat_files or self._filling or name in kinds

        def is_dir(name: str) -> bool:
            return kinds is not None and kinds.get(name) == _DIR

        while names:
            name = names.pop()
            ahead = self._ahead.get(fd)  # dropped while the walk was below a subdirectory
            if ahead is None and self._lookups.on:
                if kinds is None and self._typed_listings:
                    # Listed before the lookups began: where they are to stop.
                    with os.scandir(fd) as again:
                        kinds = self._typed_timed(again)[1]
                ahead = self._ahead[fd] = self._lookups.ahead(
                    fd, names, wanted, is_dir, at_dir=is_dir(name)
                )
            if ahead is not None:
                ahead.advance()
            if PARTIAL_RE.match(name) and self.strict:
                self.skipped_partial_count += 1
                if len(self.skipped_partial) < SKIPPED_SAMPLE:
                    self.skipped_partial.append(prefix + name)
                continue
            if self._skip is not None:
                how = self._skipping((*base, name), lambda n=name, k=kinds: self._is_dir(n, fd, k))
                if how == _PASS:
                    continue
                if how == _ENTER:
                    self._pending_dir, self._unlockable = prefix + name, False
                    yield _UNSEEN
                    continue
            if kinds is not None and not self.stat_files and name not in kinds:
                yield LocalEntry(prefix + name, Kind.FILE, UNKNOWN, UNKNOWN, UNKNOWN, 0)
                continue
            try:
                try:
                    st = self._stat(name, fd)
                except PermissionError:  # a directory that can be listed, not searched
                    if not (unlock and self._unlock_open(rel, fd)):
                        raise
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if self.strict:  # listed, so in the tree: the version would lack it
                    raise _vanished(prefix + name) from None
                continue
            except PermissionError as exc:
                raise self._unreadable(rel, exc) from None
            mode = st.st_mode
            target = None
            if stat.S_ISREG(mode):
                kind: Kind | None = Kind.FILE
            elif stat.S_ISDIR(mode):
                kind = Kind.DIR
            elif stat.S_ISLNK(mode):
                kind = Kind.SYMLINK
                try:
                    target = os.readlink(name, dir_fd=fd)
                except (FileNotFoundError, NotADirectoryError):
                    if self.strict:
                        raise _vanished(prefix + name) from None
                    continue
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # EINVAL: no symlink there any more
                        raise
                    if self.strict:
                        raise _vanished(prefix + name) from None
                    continue
            else:
                kind = None
            path = prefix + name
            if kind is None and self.strict:
                self.skipped_special_count += 1
                if len(self.skipped_special) < SKIPPED_SAMPLE:
                    self.skipped_special.append(path)
                continue
            yield LocalEntry(
                path,
                kind,
                stat.S_IMODE(mode),
                st.st_mtime_ns,
                0 if kind == Kind.DIR else st.st_size,
                st.st_ino,
                target,
                st.st_ctime_ns,
            )

    @staticmethod
    def _is_dir(name: str, fd: int, kinds: dict[str, str] | None) -> bool:
        """Whether `name` in directory `fd` is a directory: from its listing's `kinds`,
        else by `lstat`."""
        if kinds is not None:
            return kinds.get(name) == _DIR
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def fill(self, entry: LocalEntry) -> bool:
        """Read the stat fields of a file walked without them; False if it is gone or no
        longer a regular file (the reader will then report what happened)."""
        parent, _, name = entry.path.rpartition("/")
        if not self._stack or self._stack[-1][2] != parent:
            return False  # the walk has left its directory: only the last entry can be filled
        self._filling = True
        try:
            st = self._stat(name, self._stack[-1][1])
        except FileNotFoundError:
            return False
        except PermissionError as exc:  # a directory that may be read but not searched
            raise self._unreadable(entry.path, exc) from None
        if not stat.S_ISREG(st.st_mode):
            return False
        entry.mode, entry.mtime_ns, entry.size = (
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            st.st_size,
        )
        entry.ino, entry.ctime_ns = st.st_ino, st.st_ctime_ns
        return True

    def _descend(self) -> None:
        """List the pending directory, below the one on top of the stack."""
        pending, self._pending_dir = self._pending_dir, None
        assert pending is not None
        # Answers asked before the walk goes down would be as old as the subtree's walk
        # when taken: the parent's lookups begin again when the walk comes back up.
        self._drop_ahead(self._stack[-1][1])
        self._list(pending, self._unlockable)

    def __next__(self) -> LocalEntry:
        if not self._started:
            self._started = True
            self._list("")
        if self._pending_dir is not None:
            self._descend()
        while self._stack:
            try:
                entry = next(self._stack[-1][0])
            except StopIteration:
                _, fd, rel = self._stack.pop()
                self._leave(rel, fd)
                continue
            if entry is _UNSEEN:  # a directory at or above the skip's bound
                self._descend()
                continue
            if self._stop is not None and sort_key(entry.path) > self._stop:
                self.close()
                break
            if entry.kind == Kind.DIR:
                self._pending_dir = entry.path
            self._unlockable = False
            return entry
        self._lookups.close()
        raise StopIteration


def _vanished(path: str) -> Conflict:
    """The error of a strict walk (push) for entry `path`, listed in its parent but gone
    before the walk could look at it (`lstat`, `readlink`) or list it: published without it
    (or empty), the version would not be the tree, which has it, maybe under another name."""
    return Conflict(
        f"{path!r} vanished while push read the tree (renamed or removed); "
        "nothing was published (run push again once the tree is quiet)",
        [path],
    )


#: The kind a listing keeps of a name that is not a regular file (`_typed`): from the
#: directory entry, with no `lstat` unless the file system leaves it unknown. `_OTHER`: a
#: socket, FIFO or device, or an entry gone before its kind could be read.
_DIR, _LINK, _OTHER = "d", "l", "s"

#: What `Walker._skipping` says of an entry. `_UNSEEN`: the marker an entries generator
#: yields for a directory the walk enters without yielding it.
_WALK, _PASS, _ENTER = 0, 1, 2
_UNSEEN = LocalEntry("", Kind.DIR, 0, 0, 0, 0)


def _typed(entries: Iterator[os.DirEntry[str]]) -> tuple[list[str], dict[str, str]]:
    """The sorted names of a directory listing, and the kinds of those that are not regular
    files. A listing of a million files holds a million short strings (and an empty dict),
    not a million `DirEntry` objects, each with its `lstat` result once looked at."""
    names: list[str] = []
    kinds: dict[str, str] = {}
    for item in entries:
        names.append(item.name)
        kind = _kind(item)
        if kind is not None:
            kinds[item.name] = kind
    names.sort()
    return names, kinds


def _kind(item: os.DirEntry[str]) -> str | None:
    """The kind of a listed entry that is not a regular file (None for one that is)."""
    try:
        if item.is_file(follow_symlinks=False):
            return None
        if item.is_dir(follow_symlinks=False):
            return _DIR
        return _LINK if item.is_symlink() else _OTHER
    except OSError:
        return _OTHER


def _check_names(rel: str, names: list[str], kinds: dict[str, str]) -> None:
    """Refuse a name a version cannot hold (`check_name`) or two that collide under Unicode
    normalisation, among the sorted `names` a strict walk yields (`kinds`: `_typed`'s): a
    socket, FIFO or device is skipped whatever its name.

    Two distinct names collide only if one of them is not in NFC form (two NFC names that
    normalise alike are equal), so only names not in NFC form are looked up, their NFC form
    in the listing and among each other: memory grows with those, not with the directory.
    """
    if plain_names(names):
        return  # the common case, in one pass
    where = rel or "."
    odd: dict[str, str] = {}  # NFC form -> the name not in NFC form that had it
    for name in names:
        special = kinds.get(name) == _OTHER
        if PARTIAL_RE.match(name):
            continue
        try:
            check_name(name, where)
        except InvalidInput:
            if special:
                continue
            raise
        if special:
            continue
        folded = nfc(name)
        if folded == name:
            continue  # a name not in NFC form that collides with it finds it
        other = odd.get(folded)
        if other is None and not PARTIAL_RE.match(folded):
            i = bisect.bisect_left(names, folded)
            found = i < len(names) and names[i] == folded and kinds.get(folded) != _OTHER
            other = folded if found else None
        if other is not None:
            first, second = sorted((other, name))
            raise InvalidInput(
                f"names {first!r} and {second!r} in {where!r} collide under "
                "Unicode normalisation; rename one of them"
            )
        odd[folded] = name
