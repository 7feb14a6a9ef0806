"""Manifest segments and lists: round trips, tree rules, and fuzzed hostile input."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import Corrupt, InvalidInput
from datamover.repo import manifest as manifest_module
from datamover.repo.manifest import (
    EntryChecker,
    SegmentRef,
    decode_list,
    decode_segment,
    encode_list,
    encode_segment,
)

D = bytes(range(32))
P = bytes(range(1, 33))


def tree() -> list[Entry]:
    return [
        Entry("a", Kind.DIR, 0o755, 1),
        Entry("a/f", Kind.FILE, 0o644, 2, 10, None, (ChunkRef(D, P, 0, 10, 10, 0),)),
        Entry("a/l", Kind.SYMLINK, 0o777, 3, 1, "f"),
        Entry("a.b", Kind.FILE, 0o600, 4, 0),
    ]


def check_all(entries: list[Entry]) -> None:
    checker = EntryChecker()
    for e in entries:
        checker.check(e)


def test_segment_round_trip() -> None:
    entries = tree()
    decoded = list(decode_segment(encode_segment(entries)))
    assert decoded == entries
    check_all(decoded)


def test_list_round_trip() -> None:
    refs = [SegmentRef(D, 100, 4, "a", "a.b", 10)]
    assert list(decode_list(encode_list(refs))) == refs


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry("../etc", Kind.FILE, 0o644, 0)], "'..'"),
        ([Entry("/etc", Kind.FILE, 0o644, 0)], "absolute"),
        ([Entry("x/y", Kind.FILE, 0o644, 0)], "no parent directory"),
        ([Entry("b", Kind.FILE, 0o644, 0), Entry("a", Kind.FILE, 0o644, 0)], "out of order"),
        ([Entry("a", Kind.FILE, 0o644, 0), Entry("a", Kind.FILE, 0o644, 0)], "out of order"),
        (
            [Entry("l", Kind.SYMLINK, 0o777, 0, 1, "d"), Entry("l/x", Kind.FILE, 0o644, 0)],
            "no parent directory",
        ),
        ([Entry("l", Kind.SYMLINK, 0o777, 0, 6, "../etc")], "outside"),
        ([Entry("l", Kind.SYMLINK, 0o777, 0, 4, "/\x7fetc")], "control character"),
        ([Entry("l", Kind.SYMLINK, 0o777, 0, 4096, "/" + "x" * 4095)], "longer than 4095"),
        (
            [Entry("e\u0301", Kind.FILE, 0o644, 0), Entry("\u00e9", Kind.FILE, 0o644, 0)],
            "Unicode normalisation",
        ),
        ([Entry("bad\nname", Kind.FILE, 0o644, 0)], "control character"),
    ],
)
def test_tree_rules(entries: list[Entry], message: str) -> None:
    with pytest.raises(Corrupt, match=message):
        check_all(entries)


BAD_ENTRIES = [
    Entry("f", Kind.FILE, 0o644, 0, 11, None, (ChunkRef(D, P, 0, 10, 10, 0),)),  # size
    Entry("d", Kind.DIR, 0o755, 0, 5),  # dir with a size
    Entry("f", Kind.FILE, 0o644, 0, 10, None, (ChunkRef(D[:5], P, 0, 10, 10, 0),)),
    Entry("f", Kind.FILE, 0o644, 0, 10, None, (ChunkRef(D, P, 0, 9, 10, 0),)),  # raw != stored
    Entry("f", Kind.FILE, 0o7777 + 1, 0),
    Entry("f", Kind.FILE, 0o644, 1 << 63),  # after 2262-04-11T23:47:16Z
    Entry("f", Kind.FILE, 0o644, -(1 << 63) - 1),  # before 1677-09-21T00:12:43Z
    Entry("d", Kind.DIR, 0o755, 1 << 63),
    Entry("l", Kind.SYMLINK, 0o777, 1 << 63, 1, "f"),
    Entry("f", Kind.FILE, -1, 0),
    Entry("f", Kind.FILE, 0o644, 0, -1),
    Entry("f", Kind.FILE, 0o644, 0, 1 << 63),
    Entry("l", Kind.SYMLINK, 0o777, 0, 2, "f"),  # size is not the target's length
    Entry("x" * (1 << 16) + "x", Kind.FILE, 0o644, 0),  # a path longer than a reader takes
    Entry("f", Kind.FILE, 0o644, 0, 10, None, (ChunkRef(D, P, 0, 10, 10, 2),)),  # codec
    Entry("f", Kind.FILE, 0o644, 0, 10, None, (ChunkRef(D, P, -1, 10, 10, 0),)),  # offset
    Entry("f", Kind.FILE, 0o644, 0, 0, None, (ChunkRef(D, P, 0, 0, 0, 0),)),  # empty chunk
]


def _unchecked(entry: Entry) -> list[object]:
    """The wire form of `entry`, whatever it holds (the encoder refuses bad ones)."""
    return [
        entry.path,
        int(entry.kind),
        entry.mode,
        entry.mtime_ns,
        entry.size,
        entry.target,
        [list(c) for c in entry.chunks],
    ]


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_type_rules_are_enforced_on_decode(entry: Entry) -> None:
    try:
        data = _wire(_unchecked(entry))
    except OverflowError:  # below -2^63: msgpack cannot write it at all
        assert entry.mtime_ns < -(1 << 63)
        return
    with pytest.raises(Corrupt, match=r"entry 0 is invalid|exceeds max_str_len"):
        list(decode_segment(data))


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_the_encoder_refuses_what_the_decoder_would(entry: Entry) -> None:
    # A push stored an mtime of 2500 as written, then no reader took the version, nor
    # any later push of the dataset (its parent): what is written must be readable.
    with pytest.raises(InvalidInput, match=r"cannot be written into a manifest: \w") as caught:
        encode_segment([tree()[0], entry])
    assert len(caught.value.message.splitlines()) == 1
    assert caught.value.paths == [entry.path]


def test_the_encoder_names_the_field_out_of_range() -> None:
    with pytest.raises(InvalidInput) as caught:
        encode_segment([Entry("a/f", Kind.FILE, 0o644, 1 << 63)])
    assert caught.value.message == (
        "'a/f' cannot be written into a manifest: mtime 9223372036854775808 ns is not "
        "within a signed 64-bit integer"
    )


def test_the_encoder_takes_every_bound_the_decoder_takes() -> None:
    last = ChunkRef(D, P, (1 << 63) - 1, (16 << 20) + 1023, 16 << 20, 1)
    edge = [
        Entry("a", Kind.DIR, 0o7777, -(1 << 63)),
        Entry("a/f", Kind.FILE, 0, (1 << 63) - 1, 16 << 20, None, (last,)),
        Entry("a/l", Kind.SYMLINK, 0o777, 0, 3, "/é"),
        Entry("x" * (1 << 16), Kind.FILE, 0o644, 0),
    ]
    assert list(decode_segment(encode_segment(edge))) == edge


def test_a_file_of_the_most_chunks_a_reader_takes_does_not_fit_in_a_segment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/format.md: a chunk reference is 73 to 89 bytes decoded, so the 1 GiB a reader
    takes of a segment, not `MAX_CHUNKS`, is what limits one file (to 12-14.7 million)."""

    def wire_size(ref: ChunkRef) -> int:
        return len(msgpack.packb(list(ref), use_bin_type=True))

    narrowest = wire_size(ChunkRef(D, P, 0, 1, 1, 0))
    typical = wire_size(ChunkRef(D, P, 20 << 20, 900 << 10, 1 << 20, 1))
    widest = wire_size(ChunkRef(D, P, (1 << 63) - 1, (16 << 20) + 1023, 16 << 20, 1))
    assert (narrowest, typical, widest) == (73, 85, 89)
    limit = manifest_module.MAX_DECODED
    assert narrowest * manifest_module.MAX_CHUNKS > limit
    assert 12_000_000 < limit // widest < limit // typical < 12_700_000 < limit // narrowest
    # Encoding refuses such a file as it refuses any segment a reader would not take.
    monkeypatch.setattr(manifest_module, "MAX_DECODED", 4 * narrowest)
    many = tuple(ChunkRef(D, P, i, 1, 1, 0) for i in range(4))
    with pytest.raises(InvalidInput, match="more than a reader takes"):
        encode_segment([Entry("f", Kind.FILE, 0o644, 0, 4, None, many)])


def test_a_file_of_max_file_chunks_fits_a_segment_of_its_own() -> None:
    """docs/format.md: datamover's chunk references take at most 85 bytes (offsets and
    lengths below 2^32), so a file of `MAX_FILE_CHUNKS` of them, under the longest path a
    reader takes, fits a segment of its own (computed, not built: that is 1 GiB)."""
    widest_offset = (1 << 30) + (16 << 20) + 1024  # a full pack of the largest size, one chunk
    widest = ChunkRef(D, P, widest_offset, (16 << 20) + 1024, 16 << 20, 1)
    assert len(msgpack.packb(list(widest), use_bin_type=True)) == manifest_module.REF_BYTES
    assert widest_offset < 1 << 32
    header = msgpack.packb({"t": "segment", "v": 1, "n": 1})
    path = "p" * manifest_module.MAX_STR
    bare = [path, 0, 0o7777, -(1 << 63), (1 << 63) - 1, None, []]
    # An array of more than 65,535 chunks has a 5-byte header where an empty one has 1.
    entry = len(msgpack.packb(bare)) + 4
    fits = manifest_module.MAX_FILE_CHUNKS
    assert len(header) + entry + fits * manifest_module.REF_BYTES <= manifest_module.MAX_DECODED
    assert 12_600_000 < fits < 12_700_000 < manifest_module.MAX_CHUNKS


def test_a_segment_of_one_file_too_large_names_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last line, behind push's own check (`scan.Scanner._read_large`): a reference of
    # another writer's pack may be wider than datamover's 85 bytes.
    monkeypatch.setattr(manifest_module, "MAX_DECODED", 200)
    many = tuple(ChunkRef(D, P, i, 1, 1, 0) for i in range(4))
    entry = Entry("d/f", Kind.FILE, 0o644, 0, 4, None, many)
    with pytest.raises(InvalidInput) as caught:
        encode_segment([entry])
    header = msgpack.packb({"t": "segment", "v": 1, "n": 1})
    size = len(header) + len(msgpack.packb(manifest_module.encode_entry(entry)))
    assert caught.value.message == (
        f"'d/f' has 4 chunks, {size} bytes decoded in a manifest segment of its own, more than "
        "a reader takes (200); split it into smaller files and push again"
    )
    assert caught.value.paths == ["d/f"]


@settings(max_examples=500, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    mode=st.sampled_from([0, 0o644, 0o7777, 0o10000, -1]),
    mtime=st.sampled_from([0, -(1 << 63), (1 << 63) - 1, 1 << 63, -(1 << 63) - 1]),
    size=st.sampled_from([0, 1, 2, 10, (1 << 63) - 1, 1 << 63, -1]),
    target=st.sampled_from([None, "", "f", "ab"]),
    chunks=st.lists(
        st.tuples(
            st.sampled_from([D, D[:31]]),
            st.sampled_from([0, -1, (1 << 63) - 1, 1 << 63]),
            st.sampled_from([0, 1, 10, (16 << 20) + 1023, (16 << 20) + 1024]),
            st.sampled_from([0, 1, 10, 16 << 20, (16 << 20) + 1]),
            st.sampled_from([0, 1, 2]),
        ),
        max_size=2,
    ),
)
def test_the_encoder_refuses_exactly_what_the_decoder_refuses(
    kind: Kind, mode: int, mtime: int, size: int, target: str | None, chunks: list[tuple]
) -> None:
    refs = tuple(ChunkRef(d, P, o, s, r, c) for d, o, s, r, c in chunks)
    entry = Entry("f", kind, mode, mtime, size, target, refs)
    try:
        decoded = list(decode_segment(_wire(_unchecked(entry))))
    except (Corrupt, OverflowError):  # refused by the reader, or not even writable
        with pytest.raises(InvalidInput):
            encode_segment([entry])
        return
    assert list(decode_segment(encode_segment([entry]))) == decoded == [entry]


def _wire(entry: list[object]) -> bytes:
    return manifest_module._frame({"t": "segment", "v": 1, "n": 1}, [entry])


GOOD_CHUNK = [D, P, 0, 10, 10, 0]
GOOD_FILE = ["f", 0, 0o644, 5, 10, None, [GOOD_CHUNK]]


def _with(base: list[object], index: int, value: object) -> list[object]:
    changed = list(base)
    changed[index] = value
    return changed


@pytest.mark.parametrize(
    "raw",
    [
        GOOD_FILE[:6],  # too short
        _with(GOOD_FILE, 0, b"f"),  # path not a str
        _with(GOOD_FILE, 1, 3),  # unknown kind
        _with(GOOD_FILE, 1, True),  # a bool is not an int here
        _with(GOOD_FILE, 2, -1),
        _with(GOOD_FILE, 2, 0o10000),
        _with(GOOD_FILE, 2, True),
        _with(GOOD_FILE, 3, 1 << 63),
        _with(GOOD_FILE, 3, 1.5),
        _with(GOOD_FILE, 4, -1),
        _with(GOOD_FILE, 4, 11),  # the chunks add up to 10
        _with(GOOD_FILE, 4, True),
        _with(GOOD_FILE, 5, "t"),  # a file with a target
        _with(GOOD_FILE, 6, [GOOD_CHUNK[:5]]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 1, P[:31])]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 2, -1)]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 2, 1 << 63)]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 2, False)]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 3, 9)]),  # raw: stored must equal raw length
        _with(GOOD_FILE, 6, [[D, P, 0, 0, 10, 1]]),  # an empty zstd frame
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 4, 0)]),
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 5, 2)]),  # unknown codec
        _with(GOOD_FILE, 6, [_with(GOOD_CHUNK, 5, False)]),
        _with(GOOD_FILE, 6, [[D, P, 0, (16 << 20) + 1024, 10, 1]]),  # zstd frame too large
        _with(GOOD_FILE, 6, [[D, P, 0, 11, (16 << 20) + 1, 1]]),  # chunk too large
        ["d", 1, 0o755, 5, 0, None, [GOOD_CHUNK]],  # a directory with chunks
        ["d", 1, 0o755, 5, 0, "x", []],  # a directory with a target
        ["l", 2, 0o777, 5, 2, "x", []],  # size is not the target's length
        ["l", 2, 0o777, 5, 0, None, []],  # a symlink without a target
    ],
)
def test_each_wire_field_is_checked(raw: list[object]) -> None:
    with pytest.raises(Corrupt, match="entry 0 is invalid"):
        list(decode_segment(_wire(raw)))


def test_good_wire_entries_decode() -> None:
    [f] = decode_segment(_wire(GOOD_FILE))
    assert f == Entry("f", Kind.FILE, 0o644, 5, 10, None, (ChunkRef(D, P, 0, 10, 10, 0),))
    assert type(f.chunks[0]) is ChunkRef and f.chunks[0].raw_length == 10
    [z] = decode_segment(_wire(_with(GOOD_FILE, 6, [[D, P, 0, 12, 10, 1]])))
    assert z.chunks[0].codec == 1
    [link] = decode_segment(_wire(["l", 2, 0o777, 5, 3, "/é", []]))
    assert link == Entry("l", Kind.SYMLINK, 0o777, 5, 3, "/é")


SAMPLE = encode_segment(tree())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_are_corrupt(blob: bytes) -> None:
    with pytest.raises(Corrupt):
        list(decode_segment(blob))
    with pytest.raises(Corrupt):
        list(decode_list(blob))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255), st.integers(0, len(SAMPLE) - 1))
def test_mutated_or_truncated_segments(pos: int, flip: int, cut: int) -> None:
    mutated = bytearray(SAMPLE)
    mutated[pos] ^= flip
    for candidate in (bytes(mutated), SAMPLE[:cut]):
        try:
            entries = list(decode_segment(candidate))
            check_all(entries)
        except Corrupt:
            continue


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=0, max_size=8),
            st.integers(-1, 3),
            st.integers(-5, 0o20000),
            st.one_of(st.none(), st.text(max_size=5)),
        ),
        max_size=6,
    )
)
def test_structured_garbage_is_corrupt_or_valid(items: list[tuple]) -> None:
    import msgpack
    import zstandard

    body = msgpack.packb({"t": "segment", "v": 1, "n": len(items)}) + b"".join(
        msgpack.packb([path, kind, mode, 0, 0, target, []]) for path, kind, mode, target in items
    )
    blob = zstandard.ZstdCompressor().compress(body)
    with contextlib.suppress(Corrupt):
        check_all(list(decode_segment(blob)))


_PATHISH = st.text(alphabet=st.sampled_from("ab./\x00\x1f\x7f \t"), max_size=12) | st.builds(
    lambda n, tail: "x" * n + tail, st.integers(250, 260), st.sampled_from(["", "/y", "/.."])
)


@given(_PATHISH)
@settings(max_examples=500)
def test_manifest_fast_path_check_accepts_exactly_what_check_relpath_accepts(path: str) -> None:
    # The checker's one-regex test for ASCII paths must not let through anything the
    # per-component check refuses (nor refuse a valid path: that would be slower only).
    from datamover.domain.paths import check_relpath
    from datamover.repo.manifest import _CLEAN_ASCII

    try:
        check_relpath(path)
        valid = True
    except InvalidInput:
        valid = False
    assert bool(_CLEAN_ASCII.match(path)) == valid
