"""Where a push ends manifest segments: by path, by entry count, and by chunk references, so a
segment of large files stays far below what a reader takes (`MAX_DECODED`)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import cast

import blake3
import pytest
import zstandard

from datamover.chunking.chunker import ChunkerParams
from datamover.domain.manifest import ChunkRef, Codec, Entry, Kind
from datamover.repo import manifest
from datamover.repo.manifest import MAX_DECODED, MAX_RAW_CHUNK, SegmentRef, encode_segment
from datamover.repo.repository import Repository
from datamover.transfer import manifest_writer
from datamover.transfer.manifest_writer import SEGMENT_CHUNKS, ManifestWriter, SegmentCuts
from datamover.transfer.packer import Packer
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_sites import MakeSite
from tests.treegen import snapshot

#: (first path, last path, entries, chunk references) of one segment.
Segment = tuple[str, str, int, int]


def _segments(cuts: SegmentCuts, items: list[tuple[str, int]]) -> list[Segment]:
    """The segments of `(path, chunk count)` entries, cut as `ManifestWriter.append` cuts."""
    out: list[Segment] = []
    first = last = ""
    count = chunks = 0
    for path, k in items:
        if cuts.before(count, chunks, k):
            out.append((first, last, count, chunks))
            count = chunks = 0
        if count == 0:
            first = path
        count, chunks, last = count + 1, chunks + k, path
        if cuts.after(count, chunks, path, k):
            out.append((first, last, count, chunks))
            count = chunks = 0
    if count:
        out.append((first, last, count, chunks))
    return out


def _by_entries_alone(max_entries: int, paths: list[str]) -> list[tuple[str, str, int]]:
    """The segments of `paths` as push cut them when it counted entries only."""
    low = max(1, max_entries // 4)
    mask = (1 << (low.bit_length() - 1)) - 1
    out, start = [], 0
    for i, path in enumerate(paths):
        n = i - start + 1
        h = hashlib.blake2b(path.encode(), digest_size=8).digest()
        if n >= max_entries or (n >= low and int.from_bytes(h, "little") & mask == mask):
            out.append((paths[start], path, n))
            start = i + 1
    if start < len(paths):
        out.append((paths[start], paths[-1], len(paths) - start))
    return out


def _paths(n: int) -> list[str]:
    return [f"d{i // 100:04d}/f{i % 100:03d}" for i in range(n)]


def test_a_run_of_files_of_many_chunks_is_cut_at_the_chunk_bound() -> None:
    cuts = SegmentCuts(8192)  # the default entry bound, which such a run never reaches
    items = [(path, 300) for path in _paths(5000)]  # 300 MiB files at the default chunker
    out = _segments(cuts, items)
    assert sum(n for _, _, n, _ in out) == 5000
    assert all(c <= SEGMENT_CHUNKS for *_, c in out)
    assert all(n <= SEGMENT_CHUNKS // 300 for _, _, n, _ in out)
    assert all(c >= SEGMENT_CHUNKS // 4 for *_, c in out[:-1])  # none smaller than a quarter
    # Cut where the paths say, not mostly at the bound: ~half of it on average.
    assert 0.3 < sum(c for *_, c in out[:-1]) / (len(out) - 1) / SEGMENT_CHUNKS < 0.7
    forced = sum(1 for *_, c in out if c + 300 > SEGMENT_CHUNKS)
    assert forced < len(out) / 5
    assert _segments(cuts, items) == out  # deterministic


def test_a_file_of_more_chunks_than_the_bound_is_a_segment_by_itself() -> None:
    # Under 25 references (a quarter of the bound) no path is a cut point, so here only the
    # bound decides.
    cuts = SegmentCuts(8192, 100)
    items = [
        ("a", 1),
        ("b", 20),
        ("c", 101),  # more than the bound: "a".."b" ends before it, and it after itself
        ("d", 20),
        ("e", 4),
        ("f", 77),  # 101 with "d".."e": they end before it
        ("g", 100),  # exactly the bound: nothing fits with it
        ("h", 0),
        ("i", 2),
    ]
    assert _segments(cuts, items) == [
        ("a", "b", 2, 21),
        ("c", "c", 1, 101),
        ("d", "e", 2, 24),
        ("f", "f", 1, 77),
        ("g", "g", 1, 100),
        ("h", "i", 2, 2),
    ]
    assert not cuts.before(0, 0, 10**7)  # a first entry always goes in
    assert cuts.before(1, 1, 100) and not cuts.before(1, 1, 99)


@pytest.mark.parametrize("max_entries", [4, 8, 64, 1000, 8192])
def test_trees_of_small_files_are_cut_as_by_the_entry_count_alone(max_entries: int) -> None:
    rng = random.Random(max_entries)
    most = SEGMENT_CHUNKS // max_entries  # 2 chunks a file at the default 8192
    paths = _paths(60_000)
    for chunks in ([1] * len(paths), [rng.randint(0, most) for _ in paths]):
        new = _segments(SegmentCuts(max_entries), list(zip(paths, chunks, strict=True)))
        assert [s[:3] for s in new] == _by_entries_alone(max_entries, paths)


def test_trees_of_large_files_are_cut_by_their_paths() -> None:
    cuts = SegmentCuts(8192)
    rng = random.Random(3)
    # Files of 50 MiB to 1.5 GiB at the default chunker: ~3 million chunk references.
    items = [(path, rng.randint(50, 1500)) for path in _paths(20_000)]
    before = _segments(cuts, items)
    assert len(before) > 2000 and all(n < 8192 for _, _, n, _ in before)
    replaced: list[int] = []
    for where in range(7, len(items), 397):
        grown = [*items[: where + 1], (items[where][0] + "a", 700), *items[where + 1 :]]
        replaced.append(len(set(before) - set(_segments(cuts, grown))))
        shrunk = items[:where] + items[where + 1 :]
        replaced.append(len(set(before) - set(_segments(cuts, shrunk))))
    # One entry in or out replaces its own segment, now and then the next few; cut by the
    # chunk count alone, each would replace every one of the ~2,000 segments after it.
    assert max(replaced) <= 5 and sum(replaced) <= 1.5 * len(replaced)


def test_a_segment_at_the_bound_is_far_below_what_a_reader_takes() -> None:
    """The widest chunk references there are (89 bytes each), as many as the bound allows:
    under 1.5 MB decoded, where a reader takes 1 GiB."""
    size = MAX_RAW_CHUNK
    chunks = tuple(
        ChunkRef(bytes([i % 256]) * 32, b"p" * 32, (1 << 62) + i, size, size, Codec.RAW)
        for i in range(SEGMENT_CHUNKS)
    )
    entry = Entry("f" * 255, Kind.FILE, 0o644, -(1 << 63), size * SEGMENT_CHUNKS, None, chunks)
    decoded = len(zstandard.ZstdDecompressor().decompress(encode_segment([entry])))
    assert decoded <= 89 * SEGMENT_CHUNKS + 400 < 1_500_000 < MAX_DECODED // 700


class _Store:
    """What `ManifestWriter` needs of a repository: it keeps each segment it is given."""

    def __init__(self) -> None:
        self.objects: dict[bytes, bytes] = {}

    async def put_manifest_object(self, data: bytes) -> bytes:
        digest = blake3.blake3(data).digest()
        self.objects[digest] = data
        return digest


def _file(path: str, chunks: int) -> Entry:
    refs = tuple(ChunkRef(bytes(32), bytes(32), 0, 1, 1, Codec.RAW) for _ in range(chunks))
    return Entry(path, Kind.FILE, 0o644, 0, chunks, None, refs)


async def test_the_writer_ends_segments_where_the_rule_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manifest_writer, "SEGMENT_CHUNKS", 50)
    rng = random.Random(5)
    items = [(path, rng.choice([0, 1, 4, 9, 20, 49, 80])) for path in _paths(600)]
    recorded: list[SegmentRef] = []

    async def on_segment(seq: int, ref: SegmentRef, reused: bool) -> None:
        assert seq == len(recorded) and not reused
        recorded.append(ref)

    store = _Store()
    writer = ManifestWriter(cast(Repository, store), cast(Packer, None), 32, set(), [], on_segment)
    for path, k in items:
        await writer.append(_file(path, k))
    refs = await writer.finish()
    assert refs == recorded
    expected = _segments(SegmentCuts(32, 50), items)
    assert [(r.first_path, r.last_path, r.entries) for r in refs] == [s[:3] for s in expected]
    assert [r.bytes for r in refs] == [s[3] for s in expected]  # one byte a chunk
    assert all(s[3] <= 50 or s[2] == 1 for s in expected)
    assert len(store.objects) == len(refs)


def _many_chunk_tree(root: Path) -> None:
    """12 files of ~64 chunks and one of ~512 at `_SMALL_CHUNKS`, and a few small files."""
    rng = random.Random(7)
    (root / "big").mkdir(parents=True)
    for i in range(12):
        (root / "big" / f"f{i:02d}.bin").write_bytes(rng.randbytes(16 << 10))
    (root / "big" / "huge.bin").write_bytes(rng.randbytes(128 << 10))
    (root / "small").mkdir()
    for i in range(5):
        (root / "small" / f"s{i}.txt").write_text(f"small file {i}\n")


#: Chunks of 256 bytes on average, so a file of 16 KiB has about 64.
_SMALL_CHUNKS = ChunkerParams(
    min_size=64, avg_size=256, max_size=1024, normalization=1, small_file_limit=1024
)


async def test_a_tree_of_files_of_many_chunks_is_pushed_in_bounded_segments(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, segment_encodes: list[int]
) -> None:
    # The bound and what a reader takes, scaled down together: 256 references are ~22 KB
    # decoded, the tree's ~1,200 in one segment ~100 KB, which the push used to refuse.
    bound = 256
    monkeypatch.setattr(manifest_writer, "SEGMENT_CHUNKS", bound)
    monkeypatch.setattr(manifest, "MAX_DECODED", 64 << 10)
    encoded = segment_encodes
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "run1"
    _many_chunk_tree(src)
    site_a, site_b = await a.open(), await b.open()
    try:
        config = {
            "format": 1,
            "hash": "blake3",
            "created": "2026-11-29T18:15:00.000000Z",
            "chunker": _SMALL_CHUNKS.to_json(),
        }
        await site_a.store.put("config", json.dumps(config).encode())
        pushed = await push(site_a, "/proj/run1")
        assert pushed.files == 18 and pushed.new_chunks > 1000

        doc = await site_a.repo.resolve("/proj/run1", pushed.version)
        refs = await site_a.repo.prefetch(doc)
        sizes = [
            (ref.entries, sum(len(e.chunks) for e in site_a.repo.iter_cached([ref], check=False)))
            for ref in refs
        ]
        # The entry bound (8,192) alone made one segment of all 20 entries.
        assert len(refs) >= 5
        assert all(chunks <= bound or entries == 1 for entries, chunks in sizes)
        huge = [r for r in refs if r.first_path == r.last_path == "big/huge.bin"]
        assert len(huge) == 1 and huge[0].entries == 1
        assert sum(chunks for _, chunks in sizes) > 1000

        staged = await stage(site_b, "/proj/run1")
        assert staged.version == pushed.version and staged.fetched_files == 18
        assert snapshot(b.data / "run1") == snapshot(src)
        checked = await verify(site_b, "/proj/run1")
        assert checked.ok, checked.problems
        assert checked.files_checked == 18

        encoded.clear()
        again = await push(site_a, "/proj/run1")  # equal trees cut equally: all reused
        assert again.unchanged and again.version == pushed.version
        assert encoded == []
    finally:
        await site_a.close()
        await site_b.close()
