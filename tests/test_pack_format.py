"""The pack format: round trips, and hostile input only ever raises Corrupt."""

from __future__ import annotations

import contextlib
import os

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamover.chunking import codec
from datamover.chunking.pack import (
    TRAILER_SIZE,
    PackBuilder,
    least_sizes,
    parse_pack,
)
from datamover.domain.manifest import ChunkRef, Codec
from datamover.errors import Corrupt


def build(chunks: list[bytes], level: int | None = 3) -> tuple[bytes, bytes]:
    builder = PackBuilder()
    for raw in chunks:
        c, stored = codec.encode(raw, level)
        builder.add(blake3.blake3(raw).digest(), stored, len(raw), c)
    pack_id, data = builder.finish()
    return pack_id, bytes(data)


def test_round_trip_and_verified_decoding() -> None:
    chunks = [b"A" * 4096, os.urandom(5000), b"text " * 300]
    pack_id, data = build(chunks)
    assert pack_id == blake3.blake3(data).digest()
    entries = parse_pack(data, pack_id)
    assert [e.raw_length for e in entries] == [len(c) for c in chunks]
    assert entries[0].codec == Codec.ZSTD  # compressible: stored compressed
    assert entries[1].codec == Codec.RAW  # random: compression does not pay
    for entry, raw in zip(entries, chunks, strict=True):
        stored = data[entry.offset : entry.offset + entry.stored_length]
        assert codec.decode_verified(stored, entry.codec, entry.raw_length, entry.digest) == raw


def test_a_reused_buffer_gives_the_same_pack() -> None:
    packs = [[b"A" * 4096, os.urandom(5000)], [os.urandom(70_000)], [b"z" * 10]]
    buffer = bytearray(b"\xee" * 50)  # too small at first, then larger than needed: stale bytes
    for chunks in packs:
        joined = PackBuilder()
        reused = PackBuilder()
        for raw in chunks:
            c, stored = codec.encode(raw, 3)
            for b in (joined, reused):
                b.add(blake3.blake3(raw).digest(), stored, len(raw), c)
        want_id, want = joined.finish()
        got_id, got = reused.finish(buffer)
        assert isinstance(got, memoryview) and got.obj is buffer
        assert (got_id, bytes(got)) == (want_id, want)
        assert len(parse_pack(got, got_id)) == len(chunks)
        got.release()
    assert len(buffer) >= 70_000  # grown once, kept


def test_wrong_name_and_bad_chunk_are_corrupt() -> None:
    _pack_id, data = build([b"hello world" * 100])
    with pytest.raises(Corrupt, match="does not match its name"):
        parse_pack(data, bytes(32))
    entry = parse_pack(data)[0]
    stored = bytearray(data[entry.offset : entry.offset + entry.stored_length])
    stored[-1] ^= 0xFF
    with pytest.raises(Corrupt):
        codec.decode_verified(bytes(stored), entry.codec, entry.raw_length, entry.digest)


def test_large_chunks_are_sampled_before_compressing() -> None:
    text = b"ATOM      1  C   LIG     1      10.000  20.000  30.000 " * 20_000
    noise = os.urandom(codec.SAMPLE)
    assert codec.encode(text, 3)[0] == Codec.ZSTD
    assert codec.encode(noise + text, 3)[0] == Codec.RAW  # the sample decides for the chunk
    assert codec.encode(text[:10_000] + noise, 3)[0] == Codec.ZSTD  # too small to sample
    assert codec.encode(os.urandom(1 << 20), 3)[0] == Codec.RAW
    c, stored = codec.encode(text, 3)
    assert codec.decode(stored, c, len(text)) == text


def test_zstd_frame_declaring_a_huge_size_is_refused() -> None:
    frame = codec.encode(b"x" * 10_000, 3)[1]
    with pytest.raises(Corrupt, match="declares"):
        codec.decode(frame, Codec.ZSTD, 100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_parser(blob: bytes) -> None:
    with contextlib.suppress(Corrupt):
        parse_pack(blob)


_, SAMPLE = build([b"alpha" * 50, os.urandom(300), b"gamma" * 70])


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255), st.integers(0, len(SAMPLE)))
def test_mutated_or_truncated_packs_are_corrupt(pos: int, flip: int, cut: int) -> None:
    mutated = bytearray(SAMPLE)
    mutated[pos] ^= flip
    for candidate in (bytes(mutated), SAMPLE[:cut]):
        if candidate == SAMPLE:
            continue
        try:
            entries = parse_pack(candidate)
        except Corrupt:
            continue
        # The trailer and index survived (the flip hit a blob): the chunk digest must catch it.
        data_end = len(candidate) - TRAILER_SIZE - 49 * len(entries)
        assert pos < data_end
        with pytest.raises(Corrupt):
            for e in entries:
                codec.decode_verified(
                    candidate[e.offset : e.offset + e.stored_length],
                    e.codec,
                    e.raw_length,
                    e.digest,
                )


@given(
    st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=20, unique=True), st.data()
)
@settings(max_examples=200, deadline=None)
def test_a_whole_pack_is_never_below_its_least_size(
    chunks: list[bytes], data: st.DataObject
) -> None:
    """`least_sizes` (what a push asks of a pack's HEAD size before it reuses chunks in it)
    never takes a whole pack for one cut short, and asks for every byte of the chunks named
    and for the trailer after them: a pack missing any of those is taken as cut short."""
    pack_id, whole = build(chunks, level=None)
    refs = [
        ChunkRef(e.digest, pack_id, e.offset, e.stored_length, e.raw_length, e.codec)
        for e in parse_pack(whole, pack_id)
    ]
    some = data.draw(st.lists(st.sampled_from(refs), min_size=1))
    [(named, least)] = least_sizes(some).items()
    furthest = max(r.offset + r.stored_length for r in some)
    assert named == pack_id
    assert furthest + TRAILER_SIZE < least <= len(whole)
