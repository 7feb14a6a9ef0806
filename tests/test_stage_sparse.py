"""Stage leaves all-zero chunks as holes (`[transfer] sparse`), with the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datamover.domain.manifest import Entry, Kind
from datamover.transfer import fsops
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_sites import MakeSite

MiB = 1 << 20


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _holes_work(directory: Path) -> bool:
    probe = directory / "probe"
    with open(probe, "wb") as f:
        f.truncate(8 * MiB)
    try:
        return _allocated(probe) < MiB
    finally:
        probe.unlink()


def _sparse_file(path: Path, size: int, data_at: int, data: bytes) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(data_at)
        f.write(data)


def test_zero_parts_become_holes_and_read_back_the_same(tmp_path: Path) -> None:
    if not _holes_work(tmp_path):
        pytest.skip("this file system has no sparse files")
    root_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    parts = [bytes(4 * MiB), b"x" * 1000, bytes(fsops.MIN_HOLE - 1), bytes(4 * MiB)]
    try:
        for sparse in (True, False):
            writer = fsops.TreeWriter(root_fd, tmp_path, sparse=sparse)
            name = f"f-{sparse}"
            writer.write_file(Entry(name, Kind.FILE, 0o640, 10**18), parts)
            writer.close()
            path = tmp_path / name
            assert path.read_bytes() == b"".join(parts)
            assert os.stat(path).st_mode & 0o777 == 0o640
            if sparse:  # the short zero run next to the data is written, the long ones not
                assert _allocated(path) < 2 * fsops.MIN_HOLE
            else:
                assert _allocated(path) >= 8 * MiB
    finally:
        os.close(root_fd)


def test_only_long_zero_runs_are_holes() -> None:
    assert fsops.is_hole(bytes(fsops.MIN_HOLE))
    assert not fsops.is_hole(bytes(fsops.MIN_HOLE - 1))
    assert not fsops.is_hole(bytes(MiB) + b"\x01")
    assert not fsops.is_hole(b"\x01" + bytes(MiB))
    assert not fsops.is_hole(bytes(17 * MiB))  # longer than any chunk: written


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
async def test_a_sparse_file_is_staged_sparse(make_site: MakeSite, sparse: bool) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", sparse=sparse)
    src = a.data / "img"
    src.mkdir()
    if not _holes_work(src):
        pytest.skip("this file system has no sparse files")
    data = os.urandom(MiB)
    # Large (fetched by ranges into a partial file), ending in a hole; and one written whole.
    _sparse_file(src / "large.img", 48 * MiB, 20 * MiB, data)
    _sparse_file(src / "medium.img", 12 * MiB, 0, data)
    site_a, site_b = await a.open(), await b.open()
    try:
        pushed = await push(site_a, "/proj/img")
        staged = await stage(site_b, "/proj/img")
        assert staged.version == pushed.version and staged.fetched_files == 2
        for name in ("large.img", "medium.img"):
            there, here = src / name, b.data / "img" / name
            assert here.read_bytes() == there.read_bytes()
            allocated = _allocated(here)
            if sparse:  # the chunks around the data may hold zeros too: up to 4 MiB each side
                assert allocated <= 10 * MiB, (name, allocated)
            else:
                assert allocated >= there.stat().st_size, (name, allocated)
        checked = await verify(site_b, "/proj/img")
        assert checked.ok, checked.problems
    finally:
        await site_a.close()
        await site_b.close()


def _resumable(path: Path) -> bytes:
    """48 MiB, mostly zeros: one random MiB twice (one chunk at two places) and a short
    run of data near the end, so the file ends in holes."""
    block = os.urandom(MiB)
    data = bytearray(48 * MiB)
    data[20 * MiB : 21 * MiB] = block
    data[30 * MiB : 31 * MiB] = block
    data[44 * MiB : 44 * MiB + 100] = b"\x07" * 100
    path.write_bytes(data)
    return bytes(data)


@pytest.mark.parametrize("left", ["garbage-after-half", "garbage-in-first-hole", "cut-short"])
async def test_a_sparse_stage_resumes_from_any_partial_file(make_site: MakeSite, left: str) -> None:
    """A partial file a killed stage left (here planted, with what a crash or a user could
    leave in it) is checked chunk by chunk; the holes skipped after the good prefix read as
    zeros, whatever was in the file there before."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    want = _resumable(a.data / "ds" / "big")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        doc = await site_b.repo.resolve("/proj/ds", None)
        [entry] = site_b.repo.iter_cached(await site_b.repo.prefetch(doc), check=True)
        (b.data / "ds").mkdir()
        partial = b.data / "ds" / fsops.partial_name(entry)
        if left == "garbage-after-half":
            cut = 24 * MiB + 12345
            partial.write_bytes(want[:cut] + b"\xab" * (len(want) - cut))
        elif left == "garbage-in-first-hole":
            partial.write_bytes(b"\x01" + want[1:])
        else:
            partial.write_bytes(want[: 45 * MiB])
        await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "big").read_bytes() == want
        assert not partial.exists()
        checked = await verify(site_b, "/proj/ds")
        assert checked.ok, checked.problems
    finally:
        await site_a.close()
        await site_b.close()


async def test_worker_processes_write_holes_too(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", write_workers=2)
    src = a.data / "ds"
    src.mkdir()
    if not _holes_work(src):
        pytest.skip("this file system has no sparse files")
    # Enough files for the worker processes; every 50th all zeros (200 KB, one chunk).
    for i in range(2100):
        body = bytes(200_000) if i % 50 == 0 else b"x%d" % i
        (src / f"f{i:04d}").write_bytes(body)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        holes = 0
        for i in range(2100):
            here = b.data / "ds" / f"f{i:04d}"
            assert here.read_bytes() == (src / f"f{i:04d}").read_bytes()
            holes += _allocated(here) == 0
        assert holes == 42
        checked = await verify(site_b, "/proj/ds")
        assert checked.ok, checked.problems
    finally:
        await site_a.close()
        await site_b.close()
