"""Push at one site, stage at another: two catalogs, one real SeaweedFS bucket."""

from __future__ import annotations

import asyncio
import errno
import functools
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from datamover.errors import DatamoverError, TransientError
from datamover.repo.manifest import SegmentRef
from datamover.transfer import procpool
from datamover.transfer import stage as stage_module
from datamover.transfer.manifest_writer import SegmentCuts
from datamover.transfer.push import _reusable, push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree, snapshot


async def test_push_then_stage_at_another_site_is_identical(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src)
    site_a, site_b = await a.open(), await b.open()
    try:
        pushed = await push(site_a, "/proj/run1")
        assert pushed.files == 34 and pushed.symlinks == 2 and not pushed.unchanged
        assert pushed.files_read == 34
        assert pushed.uploaded_bytes > 0
        staged = await stage(site_b, "/proj/run1")
        assert staged.version == pushed.version
        assert staged.fetched_files == 34
        assert snapshot(b.data / "run1") == snapshot(src)
        checked = await verify(site_b, "/proj/run1")
        assert checked.ok, checked.problems
        assert checked.files_checked == 34

        again = await stage(site_b, "/proj/run1")  # nothing missing: nothing fetched
        assert again.fetched_files == 0 and again.downloaded_bytes == 0
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.parametrize("kept", [True, False], ids=["manifest-kept", "manifest-decoded-again"])
async def test_incremental_push_reads_and_uploads_only_changes(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    if not kept:  # as for a manifest too large to hold: the planner decodes it again
        monkeypatch.setattr(stage_module, "_KEEP_CHECKED", 0)
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src, files=40)
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/run1")
        await stage(site_b, "/proj/run1")

        noop = await push(site_a, "/proj/run1")
        assert noop.unchanged and noop.version == first.version
        assert noop.files_read == 0 and noop.uploaded_bytes == 0

        (src / "d01" / "lig0011.pdbqt").write_text("changed\n")
        (src / "d02" / "new.pdbqt").write_text("new file\n")
        (src / "d03" / "lig0030.pdbqt").unlink()
        second = await push(site_a, "/proj/run1")
        assert second.parent == first.version and second.version > first.version
        assert second.files_read == 2 and second.new_chunks == 2
        assert second.uploaded_bytes < first.uploaded_bytes / 4

        staged = await stage(site_b, "/proj/run1")
        assert staged.fetched_files == 2
        # Without --delete a file the new version lacks stays; with it, it goes.
        assert (b.data / "run1" / "d03" / "lig0030.pdbqt").exists()
        await stage(site_b, "/proj/run1", delete=True)
        assert snapshot(b.data / "run1") == snapshot(src)

        old = await stage(site_b, "/proj/run1", version=first.version)
        assert old.version == first.version
        assert (b.data / "run1" / "d03" / "lig0030.pdbqt").exists()
    finally:
        await site_a.close()
        await site_b.close()


async def test_same_tree_under_another_path_uploads_no_chunks(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    make_tree(a.data / "one")
    shutil.copytree(a.data / "one", a.data / "two", symlinks=True)
    site = await a.open()
    try:
        first = await push(site, "/proj/one")
        second = await push(site, "/proj/two")
        assert second.new_chunks == 0 and second.files_read == second.files
        assert second.uploaded_bytes < first.uploaded_bytes * 0.05
    finally:
        await site.close()


async def test_unchanged_segments_are_reused_not_encoded(
    make_site: MakeSite, segment_encodes: list[int]
) -> None:
    encoded = segment_encodes
    a, b = await make_site("site-a", segment_entries=8), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src, files=200)  # 227 entries in 20 directories
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/run1")
        assert sum(encoded) == 227 and max(encoded) <= 8 and len(encoded) >= 40
        segments = len(encoded)

        encoded.clear()
        noop = await push(site_a, "/proj/run1")
        assert noop.unchanged and noop.version == first.version
        assert encoded == []  # every segment reused as it was

        # A changed file, a changed mode and a touched directory: only their segments
        # are encoded again, and the published tree carries all three changes.
        (src / "d01" / "lig0011.pdbqt").write_text("changed\n")
        os.chmod(src / "d03" / "lig0031.pdbqt", 0o600)
        os.utime(src / "d02", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
        encoded.clear()
        second = await push(site_a, "/proj/run1")
        assert not second.unchanged and 1 <= len(encoded) <= 3
        await stage(site_b, "/proj/run1")
        assert snapshot(b.data / "run1") == snapshot(src)

        # Cuts depend on paths, not on counts: a file added near the start and one removed
        # shift no later boundary, so only the segments holding them and their (touched)
        # directories are encoded (now and then a neighbour), not the ~40 that follow.
        (src / "d00" / "lig0000b.pdbqt").write_text("inserted\n")
        (src / "d02" / "lig0025.pdbqt").unlink()
        encoded.clear()
        third = await push(site_a, "/proj/run1")
        assert not third.unchanged and 2 <= len(encoded) <= 7 < segments // 5
        assert sum(encoded) <= 7 * 8
        await stage(site_b, "/proj/run1", delete=True)
        assert snapshot(b.data / "run1") == snapshot(src)
    finally:
        await site_a.close()
        await site_b.close()


async def test_reused_segments_are_checkpointed_with_the_next_new_one(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=200)  # 227 entries, >= 40 segments
    site_a = await a.open()
    calls: list[list[int]] = []
    record = site_a.catalog.add_checkpoint_segments

    async def spy(
        dataset: str, rows: list[tuple[int, SegmentRef]], owner: str | None = None
    ) -> None:
        calls.append([seq for seq, _ in rows])
        await record(dataset, rows, owner)

    monkeypatch.setattr(site_a.catalog, "add_checkpoint_segments", spy)
    try:
        await push(site_a, "/proj/run1")
        flat = [seq for call in calls for seq in call]
        assert len(flat) >= 40 and flat == list(range(len(flat)))
        assert all(len(call) == 1 for call in calls)  # every segment new: a row each, at once

        calls.clear()
        assert (await push(site_a, "/proj/run1")).unchanged
        assert calls == []  # nothing uploaded, nothing to checkpoint

        # A change late in the tree: the reused segments before it get their rows in the
        # new segment's transaction, so the checkpoint is always a prefix of the list.
        (src / "d19" / "lig0195.pdbqt").write_text("changed\n")
        calls.clear()
        await push(site_a, "/proj/run1")
        flat = [seq for call in calls for seq in call]
        assert flat == list(range(len(flat))) and len(flat) >= 35
        assert len(calls) <= 3

        # ... or in batches, so a rerun after a crash compares few of them again.
        monkeypatch.setattr("datamover.transfer.push._CHECKPOINT_BATCH", 5)
        (src / "d19" / "lig0195.pdbqt").write_text("changed again\n")
        calls.clear()
        await push(site_a, "/proj/run1")
        flat = [seq for call in calls for seq in call]
        assert flat == list(range(len(flat))) and len(flat) >= 35
        assert max(len(call) for call in calls) <= 5 and len(calls) >= 7
    finally:
        await site_a.close()


async def test_packs_stay_open_across_segment_cuts(make_site: MakeSite) -> None:
    a, b = await make_site("site-a", segment_entries=8), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src, files=200, big=0)  # ~50 segments, 13 KiB of compressed files
    site_a, site_b = await a.open(), await b.open()
    try:
        # More segments wait for the one open pack than there are slots in flight, which must
        # seal it rather than wait for ever (hence the time limits).
        first = await asyncio.wait_for(push(site_a, "/proj/run1"), 120)
        assert first.packs == 1  # not one per segment cut
        # The same with new data in segments between reused ones.
        for d in range(0, 20, 2):
            (src / f"d{d:02d}" / f"lig{d * 10 + 3:04d}.pdbqt").write_text(f"changed {d}\n")
        second = await asyncio.wait_for(push(site_a, "/proj/run1"), 120)
        assert second.new_chunks == 10 and 1 <= second.packs <= 3
        await stage(site_b, "/proj/run1")
        assert snapshot(b.data / "run1") == snapshot(src)
    finally:
        await site_a.close()
        await site_b.close()


def test_segment_cuts_follow_paths_not_counts() -> None:
    cuts = SegmentCuts(64)

    def segments(paths: list[str]) -> list[tuple[str, str, int]]:
        out, start = [], 0
        for i, path in enumerate(paths):
            if cuts.after(i - start + 1, i - start + 1, path, 1):  # one chunk a file
                out.append((paths[start], path, i - start + 1))
                start = i + 1
        if start < len(paths):
            out.append((paths[start], paths[-1], len(paths) - start))
        return out

    paths = [f"d{i // 100:03d}/f{i % 100:03d}" for i in range(20_000)]
    before = segments(paths)
    assert all(cuts.min_entries <= n <= 64 for _, _, n in before[:-1])
    full = sum(1 for _, _, n in before if n == 64)
    assert full < len(before) / 10  # few cuts are forced by the maximum
    assert 20_000 / 48 < len(before) < 20_000 / 24  # about half the maximum on average
    assert segments(paths) == before  # deterministic
    inserted, removed = [], []
    for where in range(7, 20_000, 397):
        grown = set(segments([*paths[: where + 1], paths[where] + "a", *paths[where + 1 :]]))
        inserted.append(len(set(before) - grown))
        shrunk = set(segments(paths[:where] + paths[where + 1 :]))
        removed.append(len(set(before) - shrunk))
    # One entry in or out replaces its own segment, now and then the next one or two; with
    # cuts every 64 entries each would replace all ~300 segments after it.
    assert max(inserted) <= 4 and sum(inserted) <= 1.5 * len(inserted)
    assert max(removed) <= 4 and sum(removed) <= 1.5 * len(removed)


def test_only_segments_the_previous_stream_holds_whole_are_reusable() -> None:
    def ref(first: str, last: str) -> SegmentRef:
        return SegmentRef(first.encode().ljust(32, b"."), 1, 2, first, last, 0)

    parent = [ref("a", "c"), ref("d", "k"), ref("m", "z")]
    assert _reusable([], parent) == parent
    resumed = [ref("a", "b"), ref("c", "f")]  # an interrupted run stopped after "f"
    # "d".."k" straddles the cut-off: the stream held the resumed "d".."f" and the parent's
    # "g".."k", so equal bounds would not mean equal entries.
    assert _reusable(resumed, parent) == [*resumed, parent[2]]


async def test_user_changes_are_trashed_not_destroyed(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "run1")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/run1")
        await stage(site_b, "/proj/run1")
        edited = b.data / "run1" / "d00" / "lig0001.pdbqt"
        edited.write_text("my analysis notes\n")
        staged = await stage(site_b, "/proj/run1")
        assert staged.trashed == ["d00/lig0001.pdbqt"]
        assert staged.trash_dir is not None
        kept = Path(staged.trash_dir) / "d00" / "lig0001.pdbqt"
        assert kept.read_text() == "my analysis notes\n"
        assert snapshot(b.data / "run1") == snapshot(a.data / "run1")
    finally:
        await site_a.close()
        await site_b.close()


async def test_stage_never_writes_through_a_planted_symlink(
    make_site: MakeSite, tmp_path: Path
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "run1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (b.data / "run1").mkdir()
    (b.data / "run1" / "d00").symlink_to(outside)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/run1")
        staged = await stage(site_b, "/proj/run1")
        assert list(outside.iterdir()) == []
        assert "d00" in staged.trashed
        assert snapshot(b.data / "run1") == snapshot(a.data / "run1")
    finally:
        await site_a.close()
        await site_b.close()


async def test_absolute_symlinks_follow_the_namespace(make_site: MakeSite) -> None:
    """A link into the namespace points at the same data at every site; others are verbatim."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "links"
    (src / "run5").mkdir(parents=True)
    (src / "run5" / "out.txt").write_text("result\n")
    (a.data / "ref").mkdir()
    (a.data / "ref" / "table.csv").write_text("1,2\n")
    (src / "latest").symlink_to(src / "run5")  # into this dataset
    (src / "table").symlink_to(a.data / "ref" / "table.csv")  # into another dataset
    (src / "python").symlink_to("/usr/bin/python3")  # outside the namespace: verbatim
    (src / "rel").symlink_to("run5/out.txt")
    (src / "logical").symlink_to("/proj/links/run5")  # the logical path itself
    site_a, site_b = await a.open(), await b.open()
    try:
        pushed = await push(site_a, "/proj/links")
        assert pushed.symlinks == 5
        await push(site_a, "/proj/ref")
        await stage(site_b, "/proj/ref")
        await stage(site_b, "/proj/links")
        dst = b.data / "links"
        assert os.readlink(dst / "latest") == str(dst / "run5")
        assert os.readlink(dst / "table") == str(b.data / "ref" / "table.csv")
        assert os.readlink(dst / "python") == "/usr/bin/python3"
        assert os.readlink(dst / "rel") == "run5/out.txt"
        assert os.readlink(dst / "logical") == str(dst / "run5")  # read as logical
        assert os.readlink(src / "logical") == "/proj/links/run5"
        assert (dst / "latest" / "out.txt").read_text() == "result\n"  # resolves at site B
        assert (dst / "table").read_text() == "1,2\n"
        for site in (site_a, site_b):
            checked = await verify(site, "/proj/links")
            assert checked.ok, checked.problems
        assert (await push(site_a, "/proj/links")).unchanged  # stored form is stable

        inode = os.lstat(dst / "latest").st_ino
        again = await stage(site_b, "/proj/links")
        assert again.trashed == [] and os.lstat(dst / "latest").st_ino == inode  # kept

        (dst / "latest").unlink()
        (dst / "latest").symlink_to(a.data / "links" / "run5")  # site A's path: wrong here
        checked = await verify(site_b, "/proj/links")
        assert not checked.ok
        assert any(p.startswith("latest: symlink points to") for p in checked.problems)
        fixed = await stage(site_b, "/proj/links")
        assert "latest" in fixed.trashed  # somebody changed it: kept in the trash
        assert os.readlink(dst / "latest") == str(dst / "run5")
        assert (await verify(site_b, "/proj/links")).ok
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.parametrize("size", [0, 1, 4096, (1 << 20) + 1, 9 << 20])
async def test_file_sizes_around_the_chunking_limits(make_site: MakeSite, size: int) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(os.urandom(size))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        await stage(site_b, "/proj/x")
        assert (b.data / "x" / "f").read_bytes() == (a.data / "x" / "f").read_bytes()
    finally:
        await site_a.close()
        await site_b.close()


def _many_files(src: Path, dirs: int = 12, per_dir: int = 180) -> None:
    for d in range(dirs):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(per_dir):
            (src / f"d{d}" / f"f{f}").write_text(f"{d}/{f}\n" * (f % 7))
        os.chmod(src / f"d{d}" / "f1", 0o600)


async def test_many_files_go_through_the_worker_processes(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    real_start = procpool.start

    def counting_start(workers: int) -> Any:
        started.append(workers)
        return real_start(workers)

    monkeypatch.setattr(procpool, "start", counting_start)
    a, b = await make_site("site-a"), await make_site("site-b", write_workers=2)
    src = a.data / "many"
    _many_files(src)
    # A multi-chunk file far into the walk reaches a reader process, which hands it back
    # to be streamed rather than reading it whole.
    (src / "d9" / "large.bin").write_bytes(os.urandom(5 << 20))
    site_a, site_b = await a.open(), await b.open()
    try:
        pushed = await push(site_a, "/proj/many")
        assert pushed.files == 2161 and pushed.files_read == 2161
        assert started, "push read without reader processes"
        doc = await site_a.repo.resolve("/proj/many", pushed.version)
        refs = await site_a.repo.prefetch(doc)
        [large] = [e for e in site_a.repo.iter_cached(refs) if e.path == "d9/large.bin"]
        assert len(large.chunks) > 1  # streamed and cut by FastCDC, not read whole
        started.clear()
        staged = await stage(site_b, "/proj/many")
        assert started == [2]  # written by two worker processes
        assert staged.fetched_files == 2161
        assert snapshot(b.data / "many") == snapshot(src)
        assert not [p for p in (b.data / "many").rglob(".dm-*")]
    finally:
        await site_a.close()
        await site_b.close()


async def test_stage_writes_in_process_when_workers_cannot_start(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "many"
    _many_files(src, dirs=3, per_dir=700)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/many")

        def refuse(workers: int) -> Any:
            raise PermissionError(13, "Permission denied", "/dev/shm")

        monkeypatch.setattr(procpool, "start", refuse)
        staged = await stage(site_b, "/proj/many")
        assert staged.fetched_files == 2100
        assert snapshot(b.data / "many") == snapshot(src)
        assert "cannot start writer processes" in caplog.text
    finally:
        await site_a.close()
        await site_b.close()


_dying_queues: list[Any] = []  # each pool's job queue (the pool drops it on shutdown)


def _dying_pool(workers: int) -> ProcessPoolExecutor:
    """A real pool whose worker process dies as it starts (as if killed, or OOM)."""
    ctx = multiprocessing.get_context("forkserver")
    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=functools.partial(os._exit, 9))
    _dying_queues.append(pool._call_queue)  # type: ignore[attr-defined]
    return pool


def _unblock(queues: list[Any]) -> None:
    """Close the read end of each dying pool's job pipe, as CPython's own teardown means to
    (cpython#94777) but skips when its race (below) hits: a job too large for the pipe would
    otherwise hold the queue's feeder thread, and the test process would hang at exit."""
    for queue in queues:
        queue._reader.close()
    queues.clear()


# CPython 3.11's executor manager thread can trip over its own process table while it tears
# down a pool whose workers die as they start ("dictionary changed size during iteration"
# in terminate_broken); the futures still fail with BrokenProcessPool, which is what this
# test is about, so that background-thread report is not a failure here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_dead_worker_process_is_a_clear_retryable_error(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "many"
    _many_files(src, dirs=3, per_dir=700)
    site_a, site_b = await a.open(), await b.open()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(procpool, "start", _dying_pool)
            with pytest.raises(TransientError, match="a reader process died"):
                await push(site_a, "/proj/many")
        assert await site_a.repo.latest("/proj/many") is None  # nothing was published
        await push(site_a, "/proj/many")

        with monkeypatch.context() as patch:
            patch.setattr(procpool, "start", _dying_pool)
            with pytest.raises(TransientError, match="a stage writer process died"):
                await stage(site_b, "/proj/many")
        staged = await stage(site_b, "/proj/many")  # run again: completes
        assert snapshot(b.data / "many") == snapshot(src)
        assert staged.fetched_files + staged.kept_files == 2100
    finally:
        _unblock(_dying_queues)
        await site_a.close()
        await site_b.close()


async def test_index_pointing_at_vanished_packs_is_not_trusted(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "one", files=5)
    shutil.copytree(a.data / "one", a.data / "two", symlinks=True)
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/one")
        for key in [o.key async for o in site_a.store.list("packs/")]:
            await site_a.store.delete(key)  # e.g. a bucket restored from an older copy
        second = await push(site_a, "/proj/two")
        assert second.new_chunks == first.new_chunks  # uploaded again, not assumed present
        await stage(site_b, "/proj/two")
        assert snapshot(b.data / "two") == snapshot(a.data / "two")
    finally:
        await site_a.close()
        await site_b.close()


def _change(path: Path, how: str) -> None:
    with open(path, "r+b") as f:
        if how == "edit":
            f.seek(12_345_678)
            f.write(b"hello world")
        else:  # frames appended to a trajectory
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(3 << 20))


@pytest.mark.parametrize("change", ["edit", "append"])
async def test_a_changed_large_file_fetches_only_its_changed_chunks(
    make_site: MakeSite, change: str
) -> None:
    # An 11-byte edit of a 30 MiB file uploaded 1.3 MiB and downloaded all 30 MiB again.
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "traj"
    src.mkdir()
    (src / "md.bin").write_bytes(os.urandom(30 << 20))
    (src / "small.txt").write_text("x\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/traj")
        first = await stage(site_b, "/proj/traj")
        assert first.reused_bytes == 0 and first.downloaded_bytes >= 30 << 20
        _change(src / "md.bin", change)
        await push(site_a, "/proj/traj")
        staged = await stage(site_b, "/proj/traj")
        assert staged.fetched_files == 1
        assert (b.data / "traj" / "md.bin").read_bytes() == (src / "md.bin").read_bytes()
        # What changed (a chunk or two around the edit, up to 4 MiB each; or the new tail
        # and the chunk it joins) and the manifests, not the 30 MiB.
        assert staged.downloaded_bytes < (12 << 20 if change == "append" else 9 << 20)
        assert staged.reused_bytes >= 21 << 20
        assert staged.fetched_bytes + staged.reused_bytes == (src / "md.bin").stat().st_size
        checked = await verify(site_b, "/proj/traj")
        assert checked.ok, checked.problems
    finally:
        await site_a.close()
        await site_b.close()


def test_only_chunks_the_old_copy_still_holds_are_copied_from_it(tmp_path: Path) -> None:
    # The old copy is datamover's by size, mtime and ctime; its bytes are checked anyway.
    import threading

    import blake3

    from datamover.domain.manifest import ChunkRef, Entry, Kind

    pieces = [os.urandom(1000), os.urandom(2000), bytes(3000), os.urandom(500)]

    def ref(data: bytes) -> ChunkRef:
        return ChunkRef(blake3.blake3(data).digest(), b"p" * 32, 0, len(data), len(data), 0)

    old = tmp_path / "old"
    damaged = bytearray(b"".join(pieces))
    damaged[1500] ^= 1  # the second chunk no longer holds what the old version said
    old.write_bytes(bytes(damaged))
    new_pieces = [pieces[3], pieces[1], os.urandom(700), pieces[0], pieces[2]]
    entry = Entry(
        "f", Kind.FILE, 0o644, 0, sum(map(len, new_pieces)), None, tuple(map(ref, new_pieces))
    )
    offsets = [sum(map(len, new_pieces[:i])) for i in range(len(new_pieces) + 1)]
    old_at = {ref(p).digest: sum(map(len, pieces[:i])) for i, p in enumerate(pieces)}
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    source = os.open(old, os.O_RDONLY)
    writes: list[int] = []
    try:

        def copy(start: int, end: int) -> tuple[set[int], int, bool]:
            return stage_module._copy_seeded(
                fd,
                source,
                entry,
                offsets,
                start,
                end,
                old_at,
                threading.Lock(),
                True,
                lambda: writes.append(1),
            )

        # The second chunk read fails its digest: the copy stops there, and says so (the
        # old copy is not the old version's: a user's, for the trash).
        assert copy(0, 5) == ({0}, 500, True) and writes
        assert os.pread(fd, offsets[1], 0) == pieces[3]
        # Past it, each chunk the old copy holds is copied at its own offset.
        assert copy(2, 5) == ({3, 4}, 1000 + 3000, False)
        got = os.pread(fd, offsets[-1], 0)
        assert got[offsets[3] : offsets[4]] == pieces[0]
        assert got[offsets[4] :] == bytes(3000)  # zeros under 64 KiB: written, no hole
        assert copy(2, 3) == (set(), 0, False)  # a window covers only its own chunks
    finally:
        os.close(fd)
        os.close(source)


async def test_a_file_named_as_a_partial_file_goes_to_the_trash(make_site: MakeSite) -> None:
    # A file of a user's named like stage's partial files was deleted, trash or not.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x" / "sub").mkdir(parents=True)
    (a.data / "x" / "sub" / "a").write_text("data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        await stage(site_b, "/proj/x")
        theirs = b.data / "x" / "sub" / ".dm-0123456789abcdef.part"
        theirs.write_text("my precious notes\n")
        again = await stage(site_b, "/proj/x")
        assert not theirs.exists()
        assert again.trashed == ["sub/.dm-0123456789abcdef.part"] and again.trash_dir
        kept = Path(again.trash_dir) / "sub" / ".dm-0123456789abcdef.part"
        assert kept.read_text() == "my precious notes\n"
        assert (b.data / "x" / "sub" / "a").read_text() == "data\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_large_partial_file_a_stopped_stage_left_is_removed_not_trashed(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It went to the trash as a stranger's file: a copy of GiBs on another file system,
    # kept until the trash was emptied, or a stage failing at its end on every rerun.
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "d"
    src.mkdir()
    first = os.urandom(20 << 20)
    (src / "big").write_bytes(first)
    site_a, site_b = await a.open(), await b.open()
    try:
        v1 = (await push(site_a, "/proj/d")).version
        await stage(site_b, "/proj/d")
        (src / "big").write_bytes(os.urandom(20 << 20))
        await push(site_a, "/proj/d")

        def stopped(self: Any, entry: Any, fd: int, replaces: Any) -> None:
            os.close(fd)
            raise OSError(5, "Input/output error")  # before the large file's rename

        with monkeypatch.context() as patch:
            patch.setattr(stage_module._Stager, "_finish", stopped)
            with pytest.raises(OSError):
                await stage(site_b, "/proj/d")
        [left] = (b.data / "d").glob(".dm-*.part")
        assert left.stat().st_size == 20 << 20
        back = await stage(site_b, "/proj/d", version=v1)
        assert back.trashed == [] and not left.exists()
        assert (b.data / "d" / "big").read_bytes() == first
    finally:
        await site_a.close()
        await site_b.close()


async def _left_by_a_stopped_stage(
    site_a: Any, site_b: Any, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage what site A pushed of `src` at site B, stopped before its large file's rename:
    the file's partial file stays, full."""

    def stopped(self: Any, entry: Any, fd: int, replaces: Any) -> None:
        os.close(fd)
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(stage_module._Stager, "_finish", stopped)
        with pytest.raises(OSError):
            await stage(site_b, "/proj/d")


async def test_an_earlier_versions_partial_file_is_removed_before_the_next_write(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage stopped (a full disk, say) while writing a large file the next version does
    not have: its partial file is removed when the plan meets it, before the new version's
    large file is opened, not at the end. At the end, a disk that partial file filled had
    the new file's write fail first, at every run."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "d"
    src.mkdir()
    (src / "old.bin").write_bytes(os.urandom(20 << 20))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/d")
        await _left_by_a_stopped_stage(site_a, site_b, src, monkeypatch)
        [left] = (b.data / "d").glob(".dm-*.part")
        (src / "old.bin").unlink()
        new = os.urandom(20 << 20)
        (src / "zz-new.bin").write_bytes(new)  # after the partial file in tree order
        await push(site_a, "/proj/d")
        real = stage_module._Stager._open_partial
        there_at_open: list[bool] = []

        def opening(self: Any, entry: Any) -> Any:
            there_at_open.append(left.exists())
            return real(self, entry)

        monkeypatch.setattr(stage_module._Stager, "_open_partial", opening)
        staged = await stage(site_b, "/proj/d")
        assert there_at_open == [False]
        assert staged.trashed == [] and not left.exists()
        assert (b.data / "d" / "zz-new.bin").read_bytes() == new
        assert sorted(p.name for p in (b.data / "d").iterdir()) == ["zz-new.bin"]
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_full_disk_names_the_leftover_files_it_cannot_remove(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files under a partial file's name that no version explains (left by a stage of a
    version before the interrupted one, or a user's): kept, but a stage that runs out of
    space names them and what they hold, instead of the file it was writing alone."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "d"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(20 << 20))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/d")
        dst = b.data / "d"
        dst.mkdir()
        (dst / ".dm-0123456789abcdef.part").write_bytes(os.urandom(3 << 20))

        def full(self: Any, entry: Any, fd: int, replaces: Any) -> None:
            os.close(fd)
            raise OSError(errno.ENOSPC, "No space left on device", str(dst / entry.path))

        monkeypatch.setattr(stage_module._Stager, "_finish", full)
        for _ in range(2):  # the second with big.bin's own partial file there, resumed
            with pytest.raises(DatamoverError) as caught:
                await stage(site_b, "/proj/d")
            message = str(caught.value)
            assert message.startswith(
                f"No space left on device: '{dst / 'big.bin'}'; 1 file(s) "
            ), message
            assert "hold 3.0 MiB: '.dm-0123456789abcdef.part'." in message
            assert message.endswith("remove them to make room")
        assert (dst / ".dm-0123456789abcdef.part").stat().st_size == 3 << 20
        assert len(list(dst.glob(".dm-*.part"))) == 2  # big.bin's kept to resume
    finally:
        await site_a.close()
        await site_b.close()
