"""Streaming, sorted walk of a local tree: the local side of every merge.

Yields entries in path-component order (see `domain.paths`) by visiting each directory's
names sorted, depth first, so memory is bounded by depth times directory width, never by the
tree. A directory's children are listed only when the walk moves past it, which lets the
consumer `prune()` a directory it is about to replace or does not care about.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from datamover.domain.manifest import Kind
from datamover.domain.paths import check_name, nfc
from datamover.errors import InvalidInput

#: Temporary and partial files written by stage; never user data, never pushed.
PARTIAL_RE = re.compile(r"^\.dm-[0-9a-f]{16}\.part$")


UNKNOWN = -1  # a stat field not read yet (see `Walker(stat_files=False)`)


@dataclass(slots=True)
class LocalEntry:
    """A node found on disk. `mode`, `size` and `mtime_ns` come from `lstat`, or are
    `UNKNOWN` for a regular file walked with `stat_files=False` until `Walker.fill`."""

    path: str
    kind: Kind | None  # None: a special file (fifo, socket, device)
    mode: int
    mtime_ns: int
    size: int
    ino: int
    target: str | None = None


class Walker:
    """Iterator over a tree below `root`. Strict mode (push) rejects bad names.

    With `stat_files=False`, regular files are recognised from the directory listing alone
    (no `lstat` each): a first push opens and `fstat`s every file anyway, in parallel reader
    processes, and on a cold tree a serial `lstat` per file is what the walk would wait on.
    """

    def __init__(self, root: str, strict: bool, stat_files: bool = True) -> None:
        self.root = root
        self.strict = strict
        self.stat_files = stat_files
        self.skipped_special: list[str] = []
        self._stack: list[Iterator[LocalEntry]] = []
        self._pending_dir: str | None = None
        self._started = False

    def __iter__(self) -> Walker:
        return self

    def prune(self) -> None:
        """Do not descend into the directory yielded last."""
        self._pending_dir = None

    def _list(self, rel: str) -> Iterator[LocalEntry]:
        full = os.path.join(self.root, rel) if rel else self.root
        try:
            with os.scandir(full) as it:
                items = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            if self.strict and not rel:
                raise
            return iter(())  # vanished under us (non-strict) or replaced by stage
        except NotADirectoryError:
            return iter(())
        if self.strict:
            self._check_names(rel, [e.name for e in items])
        return self._entries(rel, items)

    def _check_names(self, rel: str, names: list[str]) -> None:
        where = rel or "."
        seen: dict[str, str] = {}
        for name in names:
            if PARTIAL_RE.match(name):
                continue
            check_name(name, where)
            folded = nfc(name)
            other = seen.get(folded)
            if other is not None:
                raise InvalidInput(
                    f"names {other!r} and {name!r} in {where!r} collide under Unicode "
                    "normalisation; rename one of them"
                )
            seen[folded] = name

    def _entries(self, rel: str, items: list[os.DirEntry[str]]) -> Iterator[LocalEntry]:
        prefix = rel + "/" if rel else ""
        for item in items:
            if PARTIAL_RE.match(item.name) and self.strict:
                continue
            if not self.stat_files and item.is_file(follow_symlinks=False):
                yield LocalEntry(prefix + item.name, Kind.FILE, UNKNOWN, UNKNOWN, UNKNOWN, 0)
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            target = None
            if stat.S_ISREG(mode):
                kind: Kind | None = Kind.FILE
            elif stat.S_ISDIR(mode):
                kind = Kind.DIR
            elif stat.S_ISLNK(mode):
                kind = Kind.SYMLINK
                try:
                    target = os.readlink(item.path)
                except FileNotFoundError:
                    continue
            else:
                kind = None
            path = prefix + item.name
            if kind is None and self.strict:
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
            )

    def fill(self, entry: LocalEntry) -> bool:
        """Read the stat fields of a file walked without them; False if it is gone or no
        longer a regular file (the reader will then report what happened)."""
        try:
            st = os.lstat(os.path.join(self.root, entry.path))
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        entry.mode, entry.mtime_ns, entry.size = (
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            st.st_size,
        )
        entry.ino = st.st_ino
        return True

    def __next__(self) -> LocalEntry:
        if not self._started:
            self._started = True
            self._stack.append(self._list(""))
        if self._pending_dir is not None:
            self._stack.append(self._list(self._pending_dir))
            self._pending_dir = None
        while self._stack:
            try:
                entry = next(self._stack[-1])
            except StopIteration:
                self._stack.pop()
                continue
            if entry.kind == Kind.DIR:
                self._pending_dir = entry.path
            return entry
        raise StopIteration
