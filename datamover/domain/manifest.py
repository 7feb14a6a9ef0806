"""Manifest entries and chunk references: the values push writes and stage reads. Pure.

An `Entry` describes one node of a dataset tree (file, directory or symlink). A file's
content is the concatenation of its chunks; each `ChunkRef` says where the chunk lives in the
store (pack, offset, stored length), how it is encoded (codec), its raw length and its
BLAKE3 digest, so staging needs only the manifest. Wire encoding lives in `repo.manifest`.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

DIGEST_SIZE = 32


class Kind(enum.IntEnum):
    """Entry kinds, with their wire values."""

    FILE = 0
    DIR = 1
    SYMLINK = 2


class Codec(enum.IntEnum):
    """How a chunk is stored in a pack."""

    RAW = 0
    ZSTD = 1


class ChunkRef(NamedTuple):
    """Where one chunk of a file lives. `pack` is the pack's 32-byte id."""

    digest: bytes
    pack: bytes
    offset: int
    stored_length: int
    raw_length: int
    codec: int


@dataclass(slots=True)
class Entry:
    """One tree node. `path` is relative to the dataset root (see `domain.paths`).

    `mode` holds permission bits only (0..0o7777); `mtime_ns` is nanoseconds since the epoch;
    `size` is the file's length (0 for directories; the target's length for symlinks);
    `target` is set for symlinks only; `chunks` is empty for everything but non-empty files.
    """

    path: str
    kind: Kind
    mode: int
    mtime_ns: int
    size: int = 0
    target: str | None = None
    chunks: tuple[ChunkRef, ...] = ()

    def same_content_stat(self, other: Entry) -> bool:
        """True when `other` is the same kind, size and mtime (push's "unchanged" test)."""
        return (
            self.kind == other.kind
            and self.size == other.size
            and self.mtime_ns == other.mtime_ns
            and self.target == other.target
        )


#: Set-user-ID and set-group-ID: never restored on files by stage (`without_setid`).
SETID = stat.S_ISUID | stat.S_ISGID


def without_setid(entries: Iterable[Entry]) -> Iterator[Entry]:
    """`entries` with the set-user-ID and set-group-ID bits of files cleared (in place).

    A version is untrusted input: a stage run as root would otherwise create set-user-ID
    root programs from whatever a bucket holds. Stage writes, compares and verify checks
    modes through this, so a file that had the bits is staged, kept and verified without
    them. Directories keep theirs (a set-group-ID directory shares its group).
    """
    for entry in entries:
        if entry.mode & SETID and entry.kind == Kind.FILE:
            entry.mode &= ~SETID
        yield entry
