"""Manifest segments and manifest lists (docs/format.md, "Manifests"): encode, decode, check.

Encoding refuses, with `InvalidInput`, an entry that decoding would (`entry_problem`): what
one site writes, every site must be able to read. Decoding is strict because the store is not
trusted: a segment is parsed with bounded msgpack limits, every entry is type-checked, and
`EntryChecker` enforces the cross-segment rules (strict component order, parents are earlier
directories, names valid and not colliding under Unicode normalisation, symlinks stay inside
the tree). All decoding failures raise `Corrupt`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard

from datamover.domain.manifest import ChunkRef, Codec, Entry, Kind
from datamover.domain.paths import (
    PARTIAL_RE,
    check_relpath,
    check_symlink_target,
    nfc,
    sort_key,
)
from datamover.errors import Corrupt, InvalidInput

FORMAT_VERSION = 1
MAX_RAW_CHUNK = 16 << 20
MAX_DECODED = 1 << 30  # a segment or list larger than this decoded is refused
#: The most bytes a segment or list takes stored: zstd's bound for compressing
#: `MAX_DECODED` bytes (`ZSTD_COMPRESSBOUND`). A reference to a larger object is refused
#: before anything is fetched, since a reader holds the whole object to check its digest.
MAX_STORED = MAX_DECODED + (MAX_DECODED >> 8)
MAX_STR = 1 << 16  # the most bytes of a path or symlink target a reader takes
MAX_CHUNKS = 1 << 24  # the most chunks of one file a reader takes
#: The most bytes a chunk reference of datamover's packs takes encoded: its offset and
#: lengths are below 2^32 (a pack is at most 1 GiB and one chunk), 5 bytes each.
REF_BYTES = 85
#: The most chunks of one file datamover writes into a manifest: an entry of that many
#: references, with the longest path a reader takes, alone in a segment stays within
#: `MAX_DECODED` (docs/format.md: 2^24 chunks, `MAX_CHUNKS`, would not fit).
MAX_FILE_CHUNKS = (MAX_DECODED - MAX_STR - 256) // REF_BYTES
_I64 = 1 << 63
#: The mtimes a reader takes: nanoseconds in a signed 64-bit integer, 1677-09-21..2262-04-11.
MTIME_MIN, MTIME_MAX = -_I64, _I64 - 1


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One line of a manifest list."""

    digest: bytes
    stored_size: int
    entries: int
    first_path: str
    last_path: str
    bytes: int


def _frame(
    header: dict[str, Any],
    items: Iterable[Any],
    level: int = 3,
    too_large: Callable[[int], InvalidInput] | None = None,
) -> bytes:
    """The stored form of a manifest object; one larger decoded than a reader takes is
    `InvalidInput` (`too_large(decoded size)`, if given)."""
    packer = msgpack.Packer(use_bin_type=True)
    body = b"".join([packer.pack(header), *(packer.pack(item) for item in items)])
    if len(body) > MAX_DECODED:
        if too_large is not None:
            raise too_large(len(body))
        raise InvalidInput(
            f"a manifest {header['t']} of {header['n']} items would be {len(body)} bytes "
            f"decoded, more than a reader takes ({MAX_DECODED})"
        )
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)


def encode_entry(entry: Entry) -> list[Any]:
    """The wire array of one entry. One that `decode_entry` would refuse (`entry_problem`:
    an mtime beyond 64 bits, a path longer than a reader takes) is `InvalidInput` naming
    it: a version whose manifest no reader accepts cannot be staged, nor pushed on from.
    The common case is one expression, as in `decode_entry` (this runs for every entry
    written); `entry_problem` says what is wrong only once something is."""
    path, kind, mode, mtime, size, target, chunks = wire = [
        entry.path,
        int(entry.kind),
        entry.mode,
        entry.mtime_ns,
        entry.size,
        entry.target,
        [list(c) for c in entry.chunks],
    ]
    if (
        type(path) is str
        and (len(path) <= _SURELY_SHORT or _strlen_ok(path))
        and type(mode) is int
        and type(mtime) is int
        and type(size) is int
        and 0 <= mode < 0o10000
        and MTIME_MIN <= mtime <= MTIME_MAX
        and 0 <= size < _I64
        and (
            (kind == Kind.FILE and target is None and _chunks_fit(chunks, size))
            or (kind == Kind.DIR and size == 0 and target is None and not chunks)
            or (
                kind == Kind.SYMLINK
                and not chunks
                and type(target) is str
                and _strlen_ok(target)
                and size == len(target.encode("utf-8", "surrogatepass"))
            )
        )
    ):
        return wire
    raise InvalidInput(
        f"{_shown(entry.path)} cannot be written into a manifest: {entry_problem(entry)}",
        [entry.path] if type(entry.path) is str else [],
    )


def _chunks_fit(chunks: list[list[Any]], size: int) -> bool:
    """Whether a file of `size` bytes may have these wire chunks (`_chunk`'s rules)."""
    if len(chunks) == 1:  # most files
        chunk = chunks[0]
        return _chunk_fits(chunk) and chunk[4] == size
    total = 0
    for chunk in chunks:
        if not _chunk_fits(chunk):
            return False
        total += chunk[4]
    return total == size and len(chunks) <= MAX_CHUNKS


def _shown(text: Any) -> str:
    """`text` quoted for a one-line message, cut if long."""
    if type(text) is str and len(text) > 200:
        return repr(text[:200]) + "..."
    return repr(text)


#: Strings of at most this many characters take at most `MAX_STR` bytes (4 a character).
_SURELY_SHORT = MAX_STR // 4


def _strlen_ok(text: str) -> bool:
    """Whether `text` takes at most `MAX_STR` bytes as UTF-8 (at most 4 bytes a character,
    so most strings need no encoding to tell)."""
    return len(text) <= _SURELY_SHORT or len(text.encode("utf-8", "surrogatepass")) <= MAX_STR


def entry_problem(entry: Entry) -> str | None:
    """Why `decode_entry` would refuse `entry` once encoded, or None: each rule it (and the
    reader's msgpack limits) applies to one entry, checked on the writer's side. Stricter
    where that costs nothing: an int-valued field must be an `int`, not a `bool`. An entry's
    place in the tree (order, parents, names, symlink targets) is `EntryChecker`'s."""
    path, kind, mode, mtime, size, target = (
        entry.path,
        entry.kind,
        entry.mode,
        entry.mtime_ns,
        entry.size,
        entry.target,
    )
    if type(path) is not str or not _strlen_ok(path):
        return f"its path is not a string of at most {MAX_STR} bytes"
    if kind not in (Kind.FILE, Kind.DIR, Kind.SYMLINK) or type(kind) is bool:
        return f"kind {kind!r} is not a file, directory or symlink"
    if type(mode) is not int or not 0 <= mode < 0o10000:
        return f"mode {mode!r} is not permission bits (0..0o7777)"
    if type(mtime) is not int or not MTIME_MIN <= mtime <= MTIME_MAX:
        return f"mtime {mtime!r} ns is not within a signed 64-bit integer"
    if type(size) is not int or not 0 <= size < _I64:
        return f"size {size!r} is not within 0..2^63-1"
    chunks = entry.chunks
    if kind == Kind.FILE:
        if target is not None:
            return "a file has a symlink target"
        if len(chunks) > MAX_CHUNKS:
            return f"{len(chunks)} chunks, more than a reader takes ({MAX_CHUNKS})"
        total = 0
        for index, chunk in enumerate(chunks):
            if not _chunk_fits(chunk):
                return f"chunk {index} is not a valid chunk reference"
            total += chunk[4]
        if total != size:
            return f"its chunks add up to {total} bytes, not its size {size}"
        return None
    if chunks:
        return "only a file has chunks"
    if kind == Kind.DIR:
        if size != 0 or target is not None:
            return "a directory has a size or a symlink target"
        return None
    if type(target) is not str or not _strlen_ok(target):
        return f"a symlink's target is not a string of at most {MAX_STR} bytes"
    if size != len(target.encode("utf-8", "surrogatepass")):
        return f"size {size} is not the length of its target"
    return None


def _chunk_fits(chunk: Any) -> bool:
    """Whether `_chunk` takes `chunk` once encoded (a codec may be a `Codec`, which is
    encoded as a plain integer)."""
    if len(chunk) != 6:
        return False
    digest, pack, offset, stored, length, codec = chunk
    return (
        type(digest) is bytes
        and len(digest) == 32
        and type(pack) is bytes
        and len(pack) == 32
        and type(offset) is int
        and type(stored) is int
        and type(length) is int
        and type(codec) is not bool
        and 0 <= offset < _I64
        and 0 < length <= MAX_RAW_CHUNK
        and (
            stored == length
            if codec == Codec.RAW
            else codec == Codec.ZSTD and 0 < stored < MAX_RAW_CHUNK + 1024
        )
    )


def encode_segment(entries: list[Entry]) -> bytes:
    """Encode a segment (the caller guarantees order; decoding checks it again). An entry
    a reader would refuse (`encode_entry`), or a segment larger decoded than a reader
    takes, is `InvalidInput`; a segment of one file, too large, names that file."""

    def one_file(size: int) -> InvalidInput:
        entry = entries[0]
        return InvalidInput(
            f"{_shown(entry.path)} has {len(entry.chunks)} chunks, {size} bytes decoded in a "
            f"manifest segment of its own, more than a reader takes ({MAX_DECODED}); split it "
            "into smaller files and push again",
            [entry.path],
        )

    return _frame(
        {"t": "segment", "v": FORMAT_VERSION, "n": len(entries)},
        map(encode_entry, entries),
        too_large=one_file if len(entries) == 1 and entries[0].chunks else None,
    )


def encode_list(segments: list[SegmentRef]) -> bytes:
    """Encode a manifest list."""
    return _frame(
        {"t": "manifest", "v": FORMAT_VERSION, "n": len(segments)},
        (
            [s.digest, s.stored_size, s.entries, s.first_path, s.last_path, s.bytes]
            for s in segments
        ),
    )


def _unframe(data: bytes | memoryview, kind: str, what: str) -> Iterator[Any]:
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0 or declared > MAX_DECODED:
            raise Corrupt(f"{what} is malformed: bad or missing zstd content size")
        # One frame and nothing after it: the format has no room for trailing bytes.
        body = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=declared, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise Corrupt(f"{what} is malformed: {exc}") from None
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=len(body) + 1,
        max_str_len=MAX_STR,
        max_bin_len=64,
        max_array_len=MAX_CHUNKS,
        max_map_len=16,
    )
    unpacker.feed(body)
    try:
        header = unpacker.unpack()
    except (msgpack.OutOfData, ValueError, TypeError) as exc:
        raise Corrupt(f"{what} is malformed: no header ({exc})") from None
    # Exactly the three fields, with exact types: `True == 1` and `1.0 == 1` in Python.
    if (
        type(header) is not dict
        or header.keys() != {"t", "v", "n"}
        or header["t"] != kind
        or type(header["v"]) is not int
        or header["v"] != FORMAT_VERSION
        or type(header["n"]) is not int
        or header["n"] < 0
    ):
        raise Corrupt(f"{what} is malformed: bad header {str(header)[:80]!r}")
    count = header["n"]
    seen = 0
    try:
        for item in unpacker:
            if seen == count:
                raise Corrupt(f"{what} is malformed: more items than its header says")
            seen += 1
            yield item
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise Corrupt(f"{what} is malformed: {exc}") from None
    if seen != count:
        raise Corrupt(f"{what} is truncated: {seen} of {count} items")
    # Iteration ends quietly on an incomplete item; msgpack tells it only here (reading
    # raw bytes is refused while an item is half-parsed).
    try:
        rest = unpacker.read_bytes(1)
    except ValueError:
        rest = b"?"
    if rest:
        raise Corrupt(f"{what} is malformed: bytes after its {count} items")


def _int(value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:
        raise ValueError
    return value


# The two functions below run once per entry and chunk of every manifest read (a no-op push
# of 20,000 files decodes 20,000 entries), so their checks are single expressions and a
# chunk's validated list becomes its `ChunkRef` without another call: about 30% faster than
# a helper call per field. They check exactly what docs/format.md says about each field.

_tuple_new = tuple.__new__


def _chunk(raw: Any) -> ChunkRef:
    if type(raw) is not list or len(raw) != 6:
        raise ValueError
    digest, pack, offset, stored, length, codec = raw
    if (
        type(digest) is not bytes
        or len(digest) != 32
        or type(pack) is not bytes
        or len(pack) != 32
        or type(offset) is not int
        or type(stored) is not int
        or type(length) is not int
        or type(codec) is not int
        or not 0 <= offset < _I64
        or not 0 < length <= MAX_RAW_CHUNK
        # raw chunks are stored as they are; zstd frames may be a little larger
        or not (
            stored == length
            if codec == Codec.RAW
            else codec == Codec.ZSTD and 0 < stored < MAX_RAW_CHUNK + 1024
        )
    ):
        raise ValueError
    return _tuple_new(ChunkRef, raw)


def decode_entry(raw: Any) -> Entry:
    """Type-check one wire entry (not its place in the tree); raise `ValueError` if bad."""
    if type(raw) is not list or len(raw) != 7:
        raise ValueError
    path, kind, mode, mtime, size, target, chunks = raw
    if (
        type(path) is not str
        or type(chunks) is not list
        or type(kind) is not int
        or type(mode) is not int
        or type(mtime) is not int
        or type(size) is not int
        or not 0 <= kind < 3
        or not 0 <= mode < 0o10000
        or not -_I64 <= mtime < _I64
        or not 0 <= size < _I64
    ):
        raise ValueError
    if kind == Kind.FILE:
        if target is not None:
            raise ValueError
        if len(chunks) == 1:  # most files: no generator for the sum
            ref = _chunk(chunks[0])
            if ref[4] != size:  # raw_length
                raise ValueError
            return Entry(path, Kind.FILE, mode, mtime, size, None, (ref,))
        refs = tuple(map(_chunk, chunks))
        if sum(c.raw_length for c in refs) != size:
            raise ValueError
        return Entry(path, Kind.FILE, mode, mtime, size, None, refs)
    if chunks:
        raise ValueError
    if kind == Kind.DIR:
        if size != 0 or target is not None:
            raise ValueError
        return Entry(path, Kind.DIR, mode, mtime)
    if type(target) is not str or size != len(target.encode("utf-8")):
        raise ValueError
    return Entry(path, Kind.SYMLINK, mode, mtime, size, target)


def decode_segment(data: bytes | memoryview, what: str = "manifest segment") -> Iterator[Entry]:
    """Yield the type-checked entries of a stored segment; raise `Corrupt` on any defect."""
    for index, raw in enumerate(_unframe(data, "segment", what)):
        try:
            yield decode_entry(raw)
        except ValueError:
            raise Corrupt(f"{what} is malformed: entry {index} is invalid") from None


def decode_list(data: bytes | memoryview, what: str = "manifest list") -> Iterator[SegmentRef]:
    """Yield the segment references of a stored manifest list; raise `Corrupt` if bad."""
    for index, raw in enumerate(_unframe(data, "manifest", what)):
        try:
            if type(raw) is not list or len(raw) != 6:
                raise ValueError
            digest, stored, entries, first, last, size = raw
            if type(digest) is not bytes or len(digest) != 32:
                raise ValueError
            if type(first) is not str or type(last) is not str:
                raise ValueError
            yield SegmentRef(
                digest,
                _int(stored, 1, MAX_STORED + 1),
                _int(entries, 1, _I64),
                first,
                last,
                _int(size, 0, _I64),
            )
        except ValueError:
            raise Corrupt(f"{what} is malformed: segment reference {index} is invalid") from None


#: An ASCII relative path every component of which is a valid name (`domain.paths.check_name`:
#: 1-255 bytes, no `/`, no control character, not `.` or `..`), in one C-level match.
_CLEAN_ASCII = re.compile(
    r"(?!\.\.?(?:/|\Z))[^/\x00-\x1f\x7f]{1,255}(?:/(?!\.\.?(?:/|\Z))[^/\x00-\x1f\x7f]{1,255})*\Z"
)


class EntryChecker:
    """Enforces the tree rules of docs/format.md over a stream of entries, in bounded memory.

    Keeps the chain of open directories (the current entry's ancestors) and, for each, the
    NFC forms of names seen in it, so memory is bounded by depth times directory width.
    """

    def __init__(self, what: str = "manifest") -> None:
        self.what = what
        self._last: tuple[str, ...] = ()
        self._dirs: list[tuple[tuple[str, ...], set[str]]] = [((), set())]

    def check(self, entry: Entry) -> tuple[str, ...]:
        """Check `entry` follows the previous ones; return its sort key or raise `Corrupt`
        (also for a name stage keeps for its partial files, `PARTIAL_RE`).

        Runs once per entry of every manifest a stage or verify reads: an ASCII path the
        one-regex test (`_CLEAN_ASCII`) accepts skips the per-component checks, which give
        the error message for any other path; a name in the directory of the previous
        entry skips the walk up the chain of open directories.
        """
        path = entry.path
        try:
            if not (path.isascii() and _CLEAN_ASCII.match(path)):
                check_relpath(path)
            if entry.kind == Kind.SYMLINK:
                check_symlink_target(path, entry.target or "")
        except InvalidInput as exc:
            raise Corrupt(f"{self.what} is malformed: {exc}") from None
        key = sort_key(path)
        if key <= self._last:
            raise Corrupt(f"{self.what} is malformed: {path!r} is out of order or repeated")
        self._last = key
        parent = key[:-1]
        dirs = self._dirs
        if dirs[-1][0] != parent:
            while dirs[-1][0] != parent[: len(dirs[-1][0])] or len(dirs[-1][0]) > len(parent):
                dirs.pop()
            if dirs[-1][0] != parent:
                raise Corrupt(f"{self.what} is malformed: {path!r} has no parent directory entry")
        name = key[-1]
        if name.startswith(".dm-") and PARTIAL_RE.match(name):
            raise Corrupt(
                f"{self.what} is malformed: {path!r} has a name stage keeps for its partial "
                "files (.dm-<16 hex>.part), which no push writes"
            )
        folded = name if name.isascii() else nfc(name)
        names = dirs[-1][1]
        if folded in names:
            raise Corrupt(
                f"{self.what} is malformed: {path!r} collides with another name "
                "under Unicode normalisation"
            )
        names.add(folded)
        if entry.kind == Kind.DIR:
            dirs.append((key, set()))
        return key
