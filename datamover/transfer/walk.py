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


@dataclass(slots=True)
class LocalEntry:
    """A node found on disk. `size` and `mtime_ns` come from `lstat`."""

    path: str
    kind: Kind | None  # None: a special file (fifo, socket, device)
    mode: int
    mtime_ns: int
    size: int
    ino: int
    target: str | None = None


class Walker:
    """Iterator over a tree below `root`. Strict mode (push) rejects bad names."""

    def __init__(self, root: str, strict: bool) -> None:
        self.root = root
        self.strict = strict
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
