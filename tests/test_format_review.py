"""Hostile store contents against the format layer (docs/format.md): each test here once
failed on the code before its fix; see the commit that added it."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from typing import Any

import blake3
import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.chunking.codec import MAX_RAW_CHUNK, decode_verified
from datamover.chunking.pack import PackBuilder, parse_pack
from datamover.datasets import list_datasets
from datamover.domain.ids import check_site_name, check_version_id, new_version_id
from datamover.domain.manifest import ChunkRef, Codec, Entry, Kind
from datamover.errors import Corrupt, DatamoverError, InvalidInput, PermanentError
from datamover.repo.layout import VersionDoc, manifest_key, parse_version_key, version_key
from datamover.repo.manifest import (
    MAX_STORED,
    SegmentRef,
    decode_list,
    decode_segment,
    encode_list,
    encode_segment,
)
from datamover.repo.repository import Repository
from datamover.storage.memory import MemoryStore
from datamover.transfer.push import push
from tests.fixtures_sites import MakeSite

# -- chunker parameters from the repository config ---------------------------------------

GOOD_CHUNKER: dict[str, Any] = ChunkerParams().to_json()


@pytest.mark.parametrize(
    "change",
    [
        {"min_size": "262144"},  # a string: TypeError from a comparison
        {"min_size": 262144.0},  # a float is not an integer size
        {"avg_size": True},
        {"normalization": 9},  # FastCDC takes 0..3: ValueError when the chunker is built
        {"normalization": "1"},
        {"min_size": 64, "avg_size": 64, "max_size": 64},  # below FastCDC's bounds
        {"min_size": 2 << 20},  # FastCDC's min_size is at most 1 MiB
        {"small_file_limit": 32 << 20},  # one chunk per file above the 16 MiB chunk limit
        {"small_file_limit": -1},
        {"small_file_limit": "1048576"},
        {"algorithm": 1},
    ],
)
def test_unusable_chunker_parameters_are_corrupt(change: dict[str, Any]) -> None:
    with pytest.raises(Corrupt, match="chunker"):
        ChunkerParams.from_json({**GOOD_CHUNKER, **change})


@pytest.mark.parametrize("missing", sorted(GOOD_CHUNKER))
def test_chunker_parameters_must_all_be_present(missing: str) -> None:
    doc = {k: v for k, v in GOOD_CHUNKER.items() if k != missing}
    with pytest.raises(Corrupt, match="chunker"):
        ChunkerParams.from_json(doc)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "min_size": st.integers(-1, 20 << 20),
            "avg_size": st.integers(-1, 20 << 20),
            "max_size": st.integers(-1, 20 << 20),
            "normalization": st.integers(-2, 5),
            "small_file_limit": st.integers(-2, 40 << 20),
            "algorithm": st.just("fastcdc2020"),
        }
    )
)
def test_accepted_chunker_parameters_always_work(doc: dict[str, Any]) -> None:
    try:
        params = ChunkerParams.from_json(doc)
    except Corrupt:
        return
    Chunker(params)  # FastCDC accepts them
    assert 0 <= params.small_file_limit <= MAX_RAW_CHUNK  # a small file is a legal chunk


def test_default_chunker_parameters_round_trip() -> None:
    assert ChunkerParams.from_json(GOOD_CHUNKER) == ChunkerParams()


def _repo(tmp_path: Path) -> Repository:
    return Repository(MemoryStore(), tmp_path / "cache")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"format": True}, PermanentError),  # `True == 1`: no writer made this
        ({"hash": "sha256"}, PermanentError),  # every digest of the format is BLAKE3
        ({"chunker": {**GOOD_CHUNKER, "normalization": 7}}, Corrupt),
    ],
)
async def test_repository_config_is_checked(
    tmp_path: Path, change: dict[str, Any], error: type[Exception]
) -> None:
    repo = _repo(tmp_path)
    doc = {"format": 1, "hash": "blake3", "created": "x", "chunker": GOOD_CHUNKER, **change}
    await repo.store.put("config", json.dumps(doc).encode())
    with pytest.raises(error, match=r"config|format"):
        await repo.chunker_params(create=True)


async def test_push_refuses_a_small_file_limit_beyond_the_chunk_limit(
    make_site: MakeSite,
) -> None:
    """A config whose small files exceed 16 MiB used to publish versions with chunks no
    reader accepts: the push succeeded and every stage of it failed as corrupt."""
    a = await make_site("site-a")
    (a.data / "big").mkdir()
    (a.data / "big" / "f").write_bytes(bytes(17 << 20))
    site = await a.open()
    try:
        doc = {
            "format": 1,
            "hash": "blake3",
            "created": "2026-11-29T18:15:00.000000Z",
            "chunker": {**GOOD_CHUNKER, "small_file_limit": 32 << 20},
        }
        await site.store.put("config", json.dumps(doc).encode())
        with pytest.raises(Corrupt, match="chunker"):
            await push(site, "/proj/big")
        assert [i.key async for i in site.store.list("")] == ["config"]  # nothing written
    finally:
        await site.close()


# -- version ids --------------------------------------------------------------------------

GOOD_ID = "20261129T181500.123456Z-hpc-a-3f9a1c0b"


@pytest.mark.parametrize(
    "bad",
    [
        GOOD_ID + "\n",  # `$` matches before a final newline
        "٢٠٢٦١١٢٩" + GOOD_ID[8:],  # `\d` matches every Unicode digit
        "20261399T996099.000000Z-hpc-a-3f9a1c0b",  # no such month, hour or minute
        "20260230T000000.000000Z-hpc-a-3f9a1c0b",  # no 30 February
    ],
)
def test_hostile_version_ids_are_invalid(bad: str) -> None:
    with pytest.raises(InvalidInput):
        check_version_id(bad)
    assert parse_version_key(version_key("/proj/x", GOOD_ID)[: -len(GOOD_ID)] + bad) is None


def test_hostile_site_names_are_invalid() -> None:
    with pytest.raises(InvalidInput):
        check_site_name("hpc-a\n")


def test_a_parent_at_the_end_of_time_is_a_clear_error() -> None:
    with pytest.raises(DatamoverError, match="end of time"):
        new_version_id("hpc-a", after="99991231T235959.999999Z-hpc-a-3f9a1c0b")


@settings(max_examples=200, deadline=None)
@given(st.datetimes(), st.datetimes(), st.sampled_from(["a", "hpc-a", "z9"]))
def test_new_ids_follow_their_parent_whatever_the_clock(
    parent_time: Any, now: Any, site: str
) -> None:
    parent = new_version_id("hpc-b", now=parent_time.replace(tzinfo=UTC))
    try:
        child = new_version_id(site, after=parent, now=now.replace(tzinfo=UTC))
    except DatamoverError:
        assert parent.startswith("99991231T235959.999999Z")
        return
    assert check_version_id(child) == child and child > parent


async def test_push_ignores_a_version_key_with_an_impossible_time(make_site: MakeSite) -> None:
    """A key like `.../versions/20261399T996099.000000Z-x-00000000` (its document well
    formed) sorted as the latest version and every later push failed with an internal
    error (`strptime` refused the time)."""
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(b"one")
    site = await a.open()
    try:
        first = await push(site, "/proj/x")
        doc = await site.repo.read_version("/proj/x", first.version)
        bad = "20261399T996099.000000Z-site-a-00000000"
        raw = json.loads(doc.to_bytes())
        raw["version"] = bad
        await site.store.put(version_key("/proj/x", bad), json.dumps(raw).encode())
        (a.data / "x" / "f").write_bytes(b"two")
        second = await push(site, "/proj/x")
        assert second.parent == first.version and second.version > first.version
    finally:
        await site.close()


# -- version documents and dataset keys -------------------------------------------------


def _doc(**change: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": 1,
        "dataset": "/proj/x",
        "version": GOOD_ID,
        "parent": None,
        "site": "hpc-a",
        "created": "2026-11-29T18:15:00.123456Z",
        "manifest": "ab" * 32,
        "manifest_size": 100,
        "segments": 1,
        "files": 1,
        "dirs": 0,
        "symlinks": 0,
        "bytes": 3,
    }
    doc.update(change)
    return doc


def test_a_good_version_document_parses() -> None:
    doc = VersionDoc.from_bytes(json.dumps(_doc()).encode(), "doc")
    assert VersionDoc.from_bytes(doc.to_bytes(), "doc") == doc


@pytest.mark.parametrize(
    "change",
    [
        {"format": True},  # `True == 1`
        {"format": 1.0},
        {"manifest": "AB" * 32},  # the format's hex is lowercase
        {"manifest": " ".join(["ab"] * 32)},  # `bytes.fromhex` skips spaces
        {"bytes": 1 << 64},  # no 64-bit column holds it
        {"files": 1 << 63},
        {"created": "x" * 200},  # not a time, and longer than the catalog's column
        {"created": "2026-11-29 18:15:00"},
        {"parent": GOOD_ID},  # its own parent: a cycle
        {"parent": "20271129T181500.123456Z-hpc-a-3f9a1c0b"},  # a parent newer than itself
        {"site": "hpc-b"},  # the id says hpc-a
        {"segments": 0, "files": 1},  # an empty manifest cannot hold a file
        # More than a list can be stored as (it decodes to at most 1 GiB): a reader would
        # have fetched that many bytes to check the list's digest.
        {"manifest_size": MAX_STORED + 1},
        {"manifest_size": 3 << 30},
    ],
)
def test_hostile_version_documents_are_corrupt(change: dict[str, Any]) -> None:
    with pytest.raises(Corrupt, match=r"^doc is malformed"):
        VersionDoc.from_bytes(json.dumps(_doc(**change)).encode(), "doc")


async def test_listing_skips_keys_that_are_not_canonical(tmp_path: Path) -> None:
    """`datasets/%2fproj%2fx/...` (lowercase escapes) decoded to `/proj/x`, whose document
    lives under another key: `ls` then failed for every dataset with "no version"."""
    repo = _repo(tmp_path)
    strays = [
        f"datasets/%2fproj%2fx/versions/{GOOD_ID}",
        f"datasets/%2Fproj/x/versions/{GOOD_ID}",
        f"datasets/%2Fproj%2Fx%2F/versions/{GOOD_ID}",
    ]
    for key in (version_key("/proj/x", GOOD_ID), *strays):
        await repo.store.put(key, json.dumps(_doc()).encode())
        assert parse_version_key(key) in (None, ("/proj/x", GOOD_ID))
    assert [p async for p in repo.datasets()] == [("/proj/x", GOOD_ID)]
    for key in strays:
        assert parse_version_key(key) is None


@pytest.mark.parametrize(
    "change",
    [{"bytes": 1 << 64}, {"manifest": " ".join(["ab"] * 32)}, {"created": "x" * 200}],
)
async def test_ls_reports_a_hostile_version_document_as_corrupt(
    make_site: MakeSite, change: dict[str, Any]
) -> None:
    """Such documents reached the catalog's cache and `ls` failed with a database error
    (an internal error) instead of naming the document."""
    a = await make_site("site-a")
    site = await a.open()
    try:
        key = version_key("/proj/x", GOOD_ID)
        await site.store.put(key, json.dumps(_doc(**change)).encode())
        [info] = await list_datasets(site)  # named as corrupt, and not cached
        assert info.versions == [] and key in info.bad[0].error.message
        assert isinstance(info.bad[0].error, Corrupt)
        assert await site.catalog.cached_versions([GOOD_ID]) == {}
    finally:
        await site.close()


# -- manifest lists against their segments and their version ---------------------------

D1 = bytes(range(32))
P1 = bytes(range(1, 33))


def _entries() -> list[Entry]:
    return [
        Entry("a", Kind.DIR, 0o755, 1),
        Entry("a/f", Kind.FILE, 0o644, 2, 10, None, (ChunkRef(D1, P1, 0, 10, 10, 0),)),
        Entry("a/l", Kind.SYMLINK, 0o777, 3, 1, "f"),
    ]


async def _publish(repo: Repository, line: dict[str, Any], **doc: Any) -> VersionDoc:
    entries = _entries()
    data = encode_segment(entries)
    digest = await repo.put_manifest_object(data)
    fields = dict(
        digest=digest, stored_size=len(data), entries=3, first_path="a", last_path="a/l", bytes=10
    )
    listing = encode_list([SegmentRef(**{**fields, **line})])
    list_digest = await repo.put_manifest_object(listing)
    raw = _doc(manifest=list_digest.hex(), manifest_size=len(listing), files=1, dirs=1)
    raw["symlinks"], raw["bytes"] = 1, 10
    return VersionDoc.from_bytes(json.dumps({**raw, **doc}).encode(), "doc")


async def _read(repo: Repository, doc: VersionDoc) -> list[Entry]:
    refs = await repo.prefetch(doc)
    return list(repo.iter_cached(refs, check=True))


async def test_a_consistent_version_reads(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert await _read(repo, await _publish(repo, {})) == _entries()


@pytest.mark.parametrize(
    ("line", "doc", "message"),
    [
        ({"bytes": 0}, {"bytes": 0}, "list"),  # the line's bytes are not the files' sizes
        ({"stored_size": 1}, {}, "list"),  # stage keeps a manifest it thinks is small
        ({}, {"manifest_size": 5}, "bytes, its version"),
        ({}, {"files": 2}, "entries"),  # the version's totals are not the manifest's
        ({}, {"bytes": 99}, "bytes"),
    ],
)
async def test_lists_and_versions_must_match_their_manifest(
    tmp_path: Path, line: dict[str, Any], doc: dict[str, Any], message: str
) -> None:
    repo = _repo(tmp_path)
    version = await _publish(repo, line, **doc)
    with pytest.raises(Corrupt, match=message):
        await _read(repo, version)


# -- framing: one zstd frame, one exact header -------------------------------------------


def _frame(header: Any, items: list[Any], tail: bytes = b"") -> bytes:
    packer = msgpack.Packer(use_bin_type=True)
    body = b"".join([packer.pack(header), *(packer.pack(i) for i in items)])
    return zstandard.ZstdCompressor(write_content_size=True).compress(body) + tail


DIR_ITEM = ["a", 1, 0o755, 0, 0, None, []]
HEADER = {"t": "segment", "v": 1, "n": 1}


@pytest.mark.parametrize(
    "data",
    [
        _frame(HEADER, [DIR_ITEM], tail=b"junk"),  # bytes after the frame
        _frame(HEADER, [DIR_ITEM], tail=_frame(HEADER, [DIR_ITEM])),  # a second frame
        _frame({**HEADER, "v": True}, [DIR_ITEM]),  # `True == 1`
        _frame({**HEADER, "v": 1.0}, [DIR_ITEM]),
        _frame({**HEADER, "n": True}, [DIR_ITEM]),
        _frame({**HEADER, "x": 0}, [DIR_ITEM]),  # a field the format does not have
    ],
    ids=["junk", "two-frames", "v-true", "v-float", "n-true", "extra-field"],
)
def test_segments_are_one_frame_with_an_exact_header(data: bytes) -> None:
    assert list(decode_segment(_frame(HEADER, [DIR_ITEM])))  # the untouched form is fine
    with pytest.raises(Corrupt, match="malformed"):
        list(decode_segment(data))


def test_lists_are_one_frame_too() -> None:
    line = [bytes(32), 10, 1, "a", "a", 0]
    good = _frame({"t": "manifest", "v": 1, "n": 1}, [line])
    assert len(list(decode_list(good))) == 1
    with pytest.raises(Corrupt, match="malformed"):
        list(decode_list(good + b"\0"))
    # A segment larger stored than zstd makes of 1 GiB: it would be fetched whole.
    for stored in (MAX_STORED + 1, 3 << 30):
        huge = _frame({"t": "manifest", "v": 1, "n": 1}, [[bytes(32), stored, 1, "a", "a", 0]])
        with pytest.raises(Corrupt, match="segment reference 0 is invalid"):
            list(decode_list(huge))
    at_bound = _frame({"t": "manifest", "v": 1, "n": 1}, [[bytes(32), MAX_STORED, 1, "a", "a", 0]])
    assert next(decode_list(at_bound)).stored_size == MAX_STORED


@pytest.mark.parametrize("tail", [b"\x92\x01", b"\xdb\xff\xff", b"\xdb"])
def test_an_incomplete_item_after_the_counted_ones_is_corrupt(tail: bytes) -> None:
    """msgpack's iteration ended quietly on a half item, and the object was accepted."""
    packer = msgpack.Packer(use_bin_type=True)
    body = packer.pack(HEADER) + packer.pack(DIR_ITEM) + tail
    data = zstandard.ZstdCompressor(write_content_size=True).compress(body)
    with pytest.raises(Corrupt, match="bytes after its 1 items"):
        list(decode_segment(data))


def test_a_zstd_chunk_is_one_frame() -> None:
    raw = b"abc" * 1000
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(raw)
    assert decode_verified(stored, Codec.ZSTD, len(raw), blake3.blake3(raw).digest()) == raw
    with pytest.raises(Corrupt):
        decode_verified(stored + b"junk", Codec.ZSTD, len(raw), blake3.blake3(raw).digest())


# -- pack index entries ------------------------------------------------------------------


def _pack_with(stored: bytes, raw_length: int, codec: int) -> bytes:
    builder = PackBuilder()
    builder.add(bytes(32), stored, raw_length, codec)
    return bytes(builder.finish()[1])


@pytest.mark.parametrize(
    ("stored", "raw_length", "codec"),
    [
        (b"", 0, Codec.RAW),  # an empty chunk: an empty file has no chunks
        (b"x" * 100, MAX_RAW_CHUNK + 1, Codec.ZSTD),  # more than a chunk may hold
        (b"x" * 100, 0, Codec.ZSTD),
    ],
    ids=["empty", "too-large", "zstd-empty"],
)
def test_pack_entries_outside_the_chunk_limits_are_corrupt(
    stored: bytes, raw_length: int, codec: int
) -> None:
    data = _pack_with(stored, raw_length, codec)
    with pytest.raises(Corrupt, match="pack index entry"):
        parse_pack(data, blake3.blake3(data).digest())


# -- reads bounded by what the referring object says -------------------------------------


async def test_a_huge_object_at_a_manifest_key_is_not_read_whole(tmp_path: Path) -> None:
    """The list (and each segment) was fetched whole, whatever its size, before its digest
    was checked: a store answering 64 MiB at a key the version says holds 71 bytes made
    every reader allocate 64 MiB (any size, really)."""
    repo = _repo(tmp_path)
    doc = await _publish(repo, {})
    fresh = _repo(tmp_path / "other")  # an empty manifest cache: everything comes from the store
    fresh.store = repo.store
    await repo.store.put(manifest_key(doc.manifest_digest), bytes(64 << 20))
    with pytest.raises(Corrupt, match="bytes"):
        await fresh.segments(doc)
    assert fresh.fetched_bytes <= doc.manifest_size + 1


@pytest.mark.parametrize("key", ["config", f"datasets/%2Fproj%2Fx/versions/{GOOD_ID}"])
async def test_huge_small_documents_are_not_read_whole(tmp_path: Path, key: str) -> None:
    repo = _repo(tmp_path)
    await repo.store.put(key, b" " * (64 << 20))
    read = repo.store.get
    sizes: list[int] = []

    async def get(key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await read(key, offset, length)
        sizes.append(len(data))
        return data

    repo.store.get = get  # type: ignore[method-assign]
    with pytest.raises(Corrupt, match="larger than"):
        if key == "config":
            await repo.chunker_params(create=False)
        else:
            await repo.read_version("/proj/x", GOOD_ID)
    assert max(sizes) <= (1 << 20) + 1


# -- known, not fixed here (push.py and scan.py are outside the format layer) -----------
