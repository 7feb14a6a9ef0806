"""Stage planning: a three-way merge of the local tree, the target version and the base.

Pure decisions over sorted streams (the local walk is the only I/O, and it is read-only):

- *target*: the version being staged; afterwards the tree must equal it.
- *base*: the version this site last completed here, i.e. what datamover itself wrote;
  and the version of an interrupted stage since (it may have written some of its files).
- *local*: what is on disk now.

A local file that differs from the target is replaced directly when it still equals the base
(datamover wrote it and nobody touched it since); otherwise somebody changed it, and it is
moved to the trash, never destroyed (DESIGN.md, "Stage has sync semantics"). Local entries the
target lacks are left alone unless `delete` is set. Memory stays bounded by the walk.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.domain.paths import sort_key
from datamover.transfer import ctimes
from datamover.transfer.fsops import same_mtime
from datamover.transfer.walk import OWNER_RX, PARTIAL_RE, LocalEntry, Walker


class Op(enum.Enum):
    """What to do with one path."""

    MKDIR = "mkdir"  # create a directory
    FETCH = "fetch"  # write a file's content (replacing whatever is there)
    LINK = "link"  # create or replace a symlink
    ATTR = "attr"  # content is right; fix mode/mtime
    TRASH = "trash"  # move a user's data out of the way, into the trash
    REMOVE = "remove"  # unlink a file or symlink datamover wrote
    STALE = "stale"  # a leftover temporary file of an interrupted stage
    KEEP = "keep"  # already right


@dataclass(slots=True)
class Action:
    """One step of a stage, in tree order."""

    op: Op
    path: str
    entry: Entry | None = None
    #: For REMOVE: the local entry as the walk saw it (is a symlink, size, mtime), so one
    #: changed since is moved to the trash instead (`TreeWriter.remove`).
    seen: tuple[bool, int, int] | None = None
    #: For FETCH and LINK over a local file or symlink datamover wrote: its identity as the
    #: walk saw it (inode, size, mtime), so one a user changed since is moved to the trash
    #: before the rename over it (`TreeWriter.make_way`). For ATTR: the file's identity as
    #: the walk saw it, so one a user changed since keeps its mode and mtime
    #: (`TreeWriter.set_attrs`).
    replaces: tuple[int, int, int] | None = None
    #: For FETCH of a file over one datamover wrote: the chunks that file holds (the base's
    #: or the interrupted version's entry); a large file's stage copies the target's chunks
    #: it has from it, verified, instead of fetching them (`_Stager._large`).
    seed: tuple[ChunkRef, ...] | None = None


class _Cursor:
    """Advances a sorted entry stream to a key (for the base version)."""

    def __init__(self, entries: Iterator[Entry] | None) -> None:
        self._it = entries
        self._cur: Entry | None = None
        self._key: tuple[str, ...] = ()

    def at(self, key: tuple[str, ...]) -> Entry | None:
        while self._it is not None:
            if self._cur is None:
                self._cur = next(self._it, None)
                if self._cur is None:
                    self._it = None
                    return None
                self._key = sort_key(self._cur.path)
            if self._key < key:
                self._cur = None
                continue
            return self._cur if self._key == key else None
        return None


def _same_stat(
    local: LocalEntry,
    entry: Entry | None,
    same_link: Callable[[str, str], bool],
    stored_mtime: Callable[[int], int],
) -> bool:
    if entry is None or local.kind != entry.kind:
        return False
    if local.kind == Kind.SYMLINK:
        return same_link(local.target or "", entry.target or "")
    if local.kind == Kind.FILE:
        return local.size == entry.size and same_mtime(local.mtime_ns, entry.mtime_ns, stored_mtime)
    return True


def children_first(dirs: Iterable[Entry]) -> Iterator[Entry]:
    """Directory entries given in tree order, each after every directory below it (deepest
    first), holding only the chain of directories above the current one.

    Stage sets directories' modes and mtimes in this order, as tar does with delayed
    directory attributes: a mode without its owner's search bit (0o600) set on a parent
    first would keep the stage from reaching the directories below it.
    """
    above: list[Entry] = []
    for entry in dirs:
        while above and not entry.path.startswith(above[-1].path + "/"):
            yield above.pop()  # tree order: nothing below it is still to come
        above.append(entry)
    yield from reversed(above)


class StagePlanner:
    """Yields `Action`s; see the module docstring.

    `content_ok(local, entry)`, when given, is consulted for files whose size and mtime match
    (the `--checksum` mode) and must return True only if the bytes match the entry's digests;
    a file that does not hold the base's (or the interrupted version's) bytes then is a
    user's, trashed rather than replaced or removed.
    `same_link(local_target, stored_target)` says whether a link on disk already is the
    stored one (`Namespace.same_link`; default: equal strings). `interrupted`, when given,
    is the version a stage since the base was bringing the tree to when it stopped: a local
    entry equal to its entry was written by datamover too. `stored_mtime(mtime_ns)` is what
    the local file system stores for an mtime (`fsops.stored_mtime`; default: itself): a
    file with that mtime has the entry's. `changed_base` and `changed_interrupted`, when
    given, are the base's and the interrupted version's entries outside the segments they
    share with the target (whose entries are the target's): what `_ambiguous` must look at,
    decoded instead of the whole of each. `changed_since`, when given, is `(ns, read_ok)`:
    a file whose ctime is not before `ns` (changed since the tree was known to hold its
    base) is taken for an entry only if `read_ok(local, entry)` says its bytes are the
    entry's, as every file is with `content_ok`.
    """

    def __init__(
        self,
        walker: Walker,
        target: Iterator[Entry],
        base: Iterator[Entry] | None,
        delete: bool = False,
        content_ok: Callable[[LocalEntry, Entry], bool] | None = None,
        same_link: Callable[[str, str], bool] = str.__eq__,
        interrupted: Iterator[Entry] | None = None,
        stored_mtime: Callable[[int], int] = int,
        changed_base: Iterator[Entry] | None = None,
        changed_interrupted: Iterator[Entry] | None = None,
        changed_since: tuple[int, Callable[[LocalEntry, Entry], bool]] | None = None,
    ) -> None:
        self.walker = walker
        self.target = target
        self.base = _Cursor(base)
        self.interrupted = _Cursor(interrupted)
        # A cursor is asked for keys in order only: `_ambiguous` may share the full ones.
        self._alike = (
            self.base if changed_base is None else _Cursor(changed_base),
            self.interrupted if changed_interrupted is None else _Cursor(changed_interrupted),
        )
        self.delete = delete
        self.content_ok = content_ok
        self.same_link = same_link
        self.stored_mtime = stored_mtime
        self.changed_since = changed_since
        self._last: tuple[tuple[str, tuple[ChunkRef, ...]], bool] | None = None

    def _ours(self, local: LocalEntry, key: tuple[str, ...]) -> bool:
        """Whether `local` is what datamover wrote at `key` (the base's or the interrupted
        version's entry). With `content_ok` (`--checksum`), or changed since the tree was
        known to hold its base (`changed_since`), a file must also hold that entry's bytes:
        one a user edited keeping its size and mtime is theirs, for the trash."""
        return self._our_entry(local, key) is not None

    def _our_entry(self, local: LocalEntry, key: tuple[str, ...]) -> Entry | None:
        """The entry `local` is datamover's write of (`_ours`), else None."""
        for entry in (self.base.at(key), self.interrupted.at(key)):
            if self._written(local, entry):
                return entry
        return None

    def _written(self, local: LocalEntry, entry: Entry | None) -> bool:
        if not self._same(local, entry):
            return False
        assert entry is not None
        return local.kind != Kind.FILE or self._content(local, entry)

    def _reader(self, local: LocalEntry) -> Callable[[LocalEntry, Entry], bool] | None:
        """What tells whether file `local` holds an entry's bytes: `content_ok`, or for a
        file changed since the tree was known to hold its base `changed_since`'s; None
        where size and mtime tell."""
        if self.content_ok is not None:
            return self.content_ok
        if self.changed_since is not None and not ctimes.unchanged_since(
            local.ctime_ns, self.changed_since[0]
        ):
            return self.changed_since[1]
        return None

    def _content(self, local: LocalEntry, entry: Entry) -> bool:
        """Whether file `local` holds `entry`'s bytes, read only where `_reader` says so
        (True otherwise); the last answer is kept, so a file compared with the target and
        then with an equal base entry is read once."""
        reader = self._reader(local)
        if reader is None:
            return True
        asked = (local.path, entry.chunks)
        if self._last is None or self._last[0] != asked:
            self._last = (asked, reader(local, entry))
        return self._last[1]

    def _interrupted_dir(self, key: tuple[str, ...]) -> bool:
        """Whether the interrupted stage's version has a directory at `key`: that stage
        made it, and may have left partial files below it to remove."""
        entry = self.interrupted.at(key)
        return entry is not None and entry.kind == Kind.DIR

    def _ambiguous(self, local: LocalEntry, entry: Entry, key: tuple[str, ...]) -> bool:
        """Whether file `local`, which looks like the target's `entry` (size, stored mtime),
        looks as much like the base's or the interrupted version's entry at `key` with
        other bytes: the file may hold that older version's bytes, which datamover wrote,
        so it is fetched again rather than kept. Two versions of a file are alike so when
        the second kept the first's size and mtime (`cp -p` or `rsync -a` of another file,
        archives with fixed times: a push reads such a file by its ctime), or, on a file
        system with coarse timestamps (1 s: ext4 with 128-byte inodes, FAT, some Lustre
        and NFS servers), when it was rewritten within one second. Only the entries
        outside the segments the target shares are looked at (`changed_base`): a restage
        of many unchanged files decodes nothing more for it."""
        for e in (self._alike[0].at(key), self._alike[1].at(key)):
            if e is None or e.kind != Kind.FILE or e.chunks == entry.chunks:
                continue  # the common case, a restage of the base: nothing to tell apart
            if self._same(local, e) and [c.digest for c in e.chunks] != [
                c.digest for c in entry.chunks
            ]:
                return True
        return False

    def _same(self, local: LocalEntry, entry: Entry | None) -> bool:
        return _same_stat(local, entry, self.same_link, self.stored_mtime)

    def _clear(self, local: LocalEntry, key: tuple[str, ...]) -> Action | None:
        """Get `local` out of the way of a different kind of entry."""
        if local.kind == Kind.DIR:
            self.walker.prune()
            return Action(Op.TRASH, local.path)
        if self._ours(local, key):
            seen = (local.kind == Kind.SYMLINK, local.size, local.mtime_ns)
            return Action(Op.REMOVE, local.path, seen=seen)
        return Action(Op.TRASH, local.path)

    def _create(
        self, entry: Entry, replaces: LocalEntry | None = None, seed: Entry | None = None
    ) -> Action:
        if entry.kind == Kind.DIR:
            return Action(Op.MKDIR, entry.path, entry)
        seen = None if replaces is None else (replaces.ino, replaces.size, replaces.mtime_ns)
        if entry.kind == Kind.SYMLINK:
            return Action(Op.LINK, entry.path, entry, replaces=seen)
        chunks = seed.chunks if seed is not None and seed.kind == Kind.FILE else None
        return Action(Op.FETCH, entry.path, entry, replaces=seen, seed=chunks or None)

    def _mode_is_ours(self, local: LocalEntry, key: tuple[str, ...], entry: Entry | None) -> bool:
        """Whether directory `local` has a mode datamover gave it: the target's (`entry`),
        the base's or the interrupted version's, not a user's chmod."""
        return any(
            e is not None and e.kind == Kind.DIR and e.mode == local.mode
            for e in (entry, self.base.at(key), self.interrupted.at(key))
        )

    def _may_unlock(self, local: LocalEntry, key: tuple[str, ...], entry: Entry | None) -> None:
        """Let the walk into directory `local` give it its owner's read and search bits, if
        it lacks them and a version gave it that mode (0o600): a user's chmod is theirs to
        undo, and stops the stage with a one-line error."""
        if local.mode & OWNER_RX != OWNER_RX and self._mode_is_ours(local, key, entry):
            self.walker.allow_unlock()

    def _both(self, local: LocalEntry, entry: Entry, key: tuple[str, ...]) -> Iterator[Action]:
        if local.kind == entry.kind == Kind.DIR:
            self._may_unlock(local, key, entry)
            yield Action(Op.KEEP, entry.path, entry)
            return
        if local.kind == entry.kind == Kind.SYMLINK and self._same(local, entry):
            yield Action(Op.KEEP, entry.path, entry)
            return
        if (
            local.kind == entry.kind == Kind.FILE
            and self._same(local, entry)
            and self._content(local, entry)
        ):
            if self._reader(local) is None and self._ambiguous(local, entry, key):
                yield self._create(entry, local)  # maybe datamover's older write: fetched
                return
            if local.mode == entry.mode:
                yield Action(Op.KEEP, entry.path, entry)
            else:
                seen = (local.ino, local.size, local.mtime_ns)
                yield Action(Op.ATTR, entry.path, entry, replaces=seen)
            return
        # Different: replace in place when datamover wrote what is there, else trash it.
        ours = (
            self._our_entry(local, key)
            if local.kind in (Kind.FILE, Kind.SYMLINK) and entry.kind in (Kind.FILE, Kind.SYMLINK)
            else None
        )
        if ours is None:
            action = self._clear(local, key)
            if action is not None:
                yield action
            yield self._create(entry)
            return
        yield self._create(entry, local, ours if local.kind == Kind.FILE else None)

    def _local_only(self, local: LocalEntry, key: tuple[str, ...]) -> Iterator[Action]:
        name = local.path.rpartition("/")[2]
        # A killed stage's leftover: a partial file, or a symlink under its temporary name
        # (made there, then renamed over the entry's, or an old link swapped out).
        if local.kind in (Kind.FILE, Kind.SYMLINK) and PARTIAL_RE.match(name):
            yield Action(Op.STALE, local.path)
            return
        if not self.delete:
            if local.kind == Kind.DIR:
                if not self._interrupted_dir(key):
                    self.walker.prune()  # nothing of ours below it
                else:
                    self._may_unlock(local, key, None)
            return
        action = self._clear(local, key)
        if action is not None:
            yield action

    def __iter__(self) -> Iterator[Action]:
        local = next(self.walker, None)
        entry = next(self.target, None)
        lkey = sort_key(local.path) if local else ()
        ekey = sort_key(entry.path) if entry else ()
        while local is not None or entry is not None:
            if local is not None and entry is not None and local.path == entry.path:
                ekey = lkey  # equal paths: skip comparing keys (the common case on restage)
            if entry is not None and (local is None or ekey < lkey):
                yield self._create(entry)
                entry = next(self.target, None)
                ekey = sort_key(entry.path) if entry else ()
            elif local is not None and (entry is None or lkey < ekey):
                yield from self._local_only(local, lkey)
                local = next(self.walker, None)
                lkey = sort_key(local.path) if local else ()
            else:
                assert local is not None and entry is not None
                yield from self._both(local, entry, ekey)
                local = next(self.walker, None)
                lkey = sort_key(local.path) if local else ()
                entry = next(self.target, None)
                ekey = sort_key(entry.path) if entry else ()
