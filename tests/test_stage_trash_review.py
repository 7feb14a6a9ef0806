"""Stage's trash and batches: setid bits and owners of copies across file systems, a
directory swapped for a symlink while it is moved across, what a batch of small files
fetches at once, and how many trash moves a worker process reports."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from datamover.chunking import codec
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.transfer import fetch
from datamover.transfer import stage as stage_module
from datamover.transfer.fetch import Range, plan_ranges
from datamover.transfer.fsops import TRASHED_SAMPLE
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.writers import write_batch
from tests.fixtures_sites import MakeSite

PACK = bytes(32)

# -- a worker's trash moves are all counted ---------------------------------------------------


def test_a_worker_reports_every_trash_move_not_only_its_sample(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    data = b"version bytes"
    ref = ChunkRef(codec.digest(data), PACK, 0, len(data), len(data), codec.Codec.RAW)
    ranges = plan_ranges([ref], 0, 1 << 20)
    files = []
    for i in range(TRASHED_SAMPLE + 50):
        # Saved by a user where the walk saw nothing: moved to the trash before the write.
        (tmp_path / "ds" / f"f{i:03}").write_text("a user's file\n")
        files.append((f"f{i:03}", 0o644, 0, (ref,), None))
    written = write_batch(str(tmp_path), ("ds",), ranges, [data], files, str(tmp_path / "trash"))
    assert len(list((tmp_path / "trash").iterdir())) == TRASHED_SAMPLE + 50
    assert written.trashed_count == TRASHED_SAMPLE + 50
    assert written.trashed == [f"f{i:03}" for i in range(TRASHED_SAMPLE)]


# -- what a batch of small files fetches at once ----------------------------------------------


def _scattered(count: int, size: int, apart: int) -> list[tuple[Entry, None]]:
    """A batch of `count` files of `size` bytes whose chunks lie `apart` bytes apart in one
    pack (the files between them are there already, or never were)."""
    batch = []
    for i in range(count):
        ref = ChunkRef(bytes([i % 256]) * 32, PACK, i * apart, size, size, codec.Codec.RAW)
        batch.append((Entry(f"f{i:05}", Kind.FILE, 0o644, 0, size, chunks=(ref,)), None))
    return batch


def _held(ranges: Sequence[Range]) -> int:
    return sum(r.end - r.start for r in ranges)


def test_a_batch_of_scattered_files_never_fetches_more_than_batch_bytes_at_once() -> None:
    gap, max_request, limit = 256 << 10, 16 << 20, 64 << 20
    batch = _scattered(4096, 4096, (256 << 10) - 1)  # every gap is coalesced
    whole = plan_ranges((c for e, _ in batch for c in e.chunks), gap, max_request)
    assert _held(whole) > 1000 << 20  # about 1 GiB held for 16 MiB of files
    parts = stage_module.split_fetch(batch, gap, max_request, limit)
    assert [f for part, _ in parts for f in part] == batch  # every file once, in order
    assert all(_held(ranges) <= limit for _, ranges in parts)
    for part, ranges in parts:  # each part's ranges are what the real planner makes of it
        assert ranges == plan_ranges((c for e, _ in part for c in e.chunks), gap, max_request)


def test_a_batch_of_neighbours_is_fetched_in_one_part() -> None:
    batch = _scattered(4096, 4096, 4096)
    [(part, ranges)] = stage_module.split_fetch(batch, 256 << 10, 16 << 20, 64 << 20)
    assert part == batch and len(ranges) == 1 and _held(ranges) == 4096 * 4096


def test_one_file_whose_gaps_do_not_fit_is_fetched_without_them() -> None:
    refs = tuple(
        ChunkRef(bytes([i]) * 32, PACK, i * (1 << 20), 4096, 4096, codec.Codec.RAW)
        for i in range(8)
    )
    batch = [(Entry("f", Kind.FILE, 0o644, 0, 8 * 4096, chunks=refs), None)]
    [(part, ranges)] = stage_module.split_fetch(batch, 2 << 20, 16 << 20, 64 << 10)
    assert part == batch and _held(ranges) == 8 * 4096


async def test_a_stage_of_scattered_missing_files_holds_at_most_batch_bytes(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 64 << 10
    a = await make_site("site-a")
    b = await make_site("site-b", coalesce_gap=1 << 20, batch_bytes=limit, write_workers=-1)
    (a.data / "ds").mkdir()
    for i in range(64):
        (a.data / "ds" / f"f{i:02}").write_bytes(os.urandom(4096))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        for i in range(0, 64, 8):  # every eighth file is gone: 28 KiB between the missing
            (b.data / "ds" / f"f{i:02}").unlink()
        held: list[int] = []
        real = fetch.Fetcher.fetch

        async def recording(self: fetch.Fetcher, ranges: Sequence[Range]) -> list[bytes]:
            held.append(_held(ranges))
            return await real(self, ranges)

        monkeypatch.setattr(stage_module.Fetcher, "fetch", recording)
        result = await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()
    assert result.fetched_files == 8 and held and sum(held) >= 8 * 4096
    assert max(held) <= limit, held
    for i in range(64):
        assert (b.data / "ds" / f"f{i:02}").read_bytes() == (
            a.data / "ds" / f"f{i:02}"
        ).read_bytes()
