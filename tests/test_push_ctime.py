"""A file replaced by other bytes of its size under its old mtime is read by the next push,
and by the next stage before it is kept.

Size and mtime cannot tell such a file from the one the last push read (`cp -p`, `rsync -a`
and archives with fixed times keep a source's mtime); its ctime can: the site records since
when its tree held the version (`replicas.held_since`, set by push and stage), and a push
reads every file changed after that, as restic does by default; a stage reads such a file
before it takes it for the version's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from datamover.catalog.queries import ReplicaRow
from datamover.transfer.push import PushResult, push
from datamover.transfer.stage import StageResult, stage
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.test_push_resume import Killed, push_killed
from tests.test_stage_coarse_fs import coarse_ext4


def _replace_keeping_mtime(path: Path, data: bytes) -> None:
    """Give `path` other bytes of its size, under its old mtime, as `cp -p` of another file
    of that size and mtime would (a new inode renamed over it)."""
    st = path.stat()
    assert len(data) == st.st_size
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.replace(path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))}


async def _stage_at(env: SiteEnv, dataset: str = "/proj/x") -> dict[str, bytes]:
    site = await env.open()
    try:
        await stage(site, dataset)
    finally:
        await site.close()
    return _files(env.data / dataset.rpartition("/")[2])


async def test_a_file_replaced_under_its_old_mtime_is_read_by_the_next_push(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "x"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(f"first version of file {i}\n".encode())
    site = await a.open()
    try:
        first = await push(site, "/proj/x")
        again = await push(site, "/proj/x")
        assert again.unchanged and again.files_read == 0  # the tree's own files: not read
        _replace_keeping_mtime(root / "f2", b"OTHER VERSION OF FILE 2\n")
        (root / "f3").write_bytes(b"first version of file 3\n")  # same bytes, written again
        os.utime(
            root / "f3", ns=((root / "f3").stat().st_atime_ns, (root / "f0").stat().st_mtime_ns)
        )
        # A push takes its tree as holding what it publishes from a little before its walk
        # (`ctimes.SLACK`): files changed just before are read once more by the next.
        time.sleep(0.05)
        second = await push(site, "/proj/x")
        third = await push(site, "/proj/x")
    finally:
        await site.close()
    assert not second.unchanged and second.parent == first.version
    assert second.files_read == 2  # f2 and f3, changed since the last push
    assert third.unchanged and third.files_read == 0
    assert await _stage_at(b) == _files(root)


@pytest.mark.usefixtures("stages_end_after_a_tick")
async def test_a_push_after_a_stage_reads_only_what_changed_since(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    await _pushed_tree(a, 5)
    staged = await _stage_at(b)
    site = await b.open()
    try:
        untouched = await push(site, "/proj/x")
        assert untouched.unchanged and untouched.files_read == 0  # what the stage wrote
        _replace_keeping_mtime(b.data / "x" / "f1", b"file 1 AS SITE B WROTE IT\n")
        time.sleep(0.05)  # as in the test above
        changed = await push(site, "/proj/x")
        after = await push(site, "/proj/x")
    finally:
        await site.close()
    assert not changed.unchanged and changed.files_read == 1
    assert after.unchanged and after.files_read == 0
    assert await _stage_at(a) == {**staged, "f1": b"file 1 AS SITE B WROTE IT\n"}


async def test_a_stage_reads_a_file_changed_under_its_old_size_and_mtime(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    await _pushed_tree(a)
    staged = await _stage_at(b)
    edited = b"file 1 AS SITE B WROTE IT\n"
    _replace_keeping_mtime(b.data / "x" / "f1", edited)
    site = await b.open()
    try:
        again = await stage(site, "/proj/x")  # a restage of the version the tree holds
    finally:
        await site.close()
    # The user's file is moved aside, not taken for the version's (nor removed).
    assert again.trashed_count == 1 and again.fetched_files == 1
    assert _files(b.data / "x") == staged
    assert again.trash_dir is not None
    assert _trashed(Path(again.trash_dir), "f1") == [edited]


def _trashed(trash: Path, name: str) -> list[bytes]:
    return [p.read_bytes() for p in trash.rglob(name + "*") if p.is_file()]


async def test_a_rerun_reads_only_what_changed_since_the_interrupted_run_walked_it(
    make_site: MakeSite,
) -> None:
    # The checkpoint keeps when its run began to walk the tree: a rerun takes what that run
    # read from the checkpoint (not read again, as before the record of ctimes), and reads
    # a file replaced since under its old size and mtime, also in a first push, which has
    # no record of the tree to tell that by.
    a = await make_site("site-a", segment_entries=8)
    root = a.data / "x"
    root.mkdir()
    (root / "a").write_bytes(b"first\n")
    site = await a.open()
    try:
        await push(site, "/proj/x")
        time.sleep(0.05)
        for i in range(100):
            (root / f"f{i:03d}").write_bytes(f"new file {i}\n".encode())
        time.sleep(0.05)
        await push_killed(site, lambda rows: any(r.last_path >= "f080" for _, r in rows))
        _replace_keeping_mtime(root / "f010", b"NEW FILE 10\n")
        rerun = await push(site, "/proj/x")
    finally:
        await site.close()
    assert 1 <= rerun.files_read < 40  # f010, and what lies beyond the checkpoint
    assert await _stage_at(await make_site("site-b")) == _files(root)


async def test_a_first_push_rerun_reads_a_file_replaced_since_the_interrupted_run(
    make_site: MakeSite,
) -> None:
    a = await make_site("site-a", segment_entries=8)
    root = a.data / "x"
    root.mkdir()
    for i in range(100):
        (root / f"f{i:03d}").write_bytes(f"version 1 of file {i}\n".encode())
    time.sleep(0.05)
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f050" for _, r in rows))
        _replace_keeping_mtime(root / "f010", b"VERSION 1 OF FILE 10\n")
        rerun = await push(site, "/proj/x")
    finally:
        await site.close()
    assert rerun.files_read < 60  # the checkpoint spared the rest
    assert await _stage_at(await make_site("site-b")) == _files(root)


async def test_an_interrupted_stage_keeps_the_time_and_its_rerun_reads_what_it_wrote(
    make_site: MakeSite,
) -> None:
    # A stage killed after writing used to leave the record without its time: its rerun
    # took a user's edit (size and mtime kept) for the version's file, and recorded a new
    # time that every later push trusted.
    a, b = await make_site("site-a"), await make_site("site-b")
    root = await _pushed_tree(a)
    await _stage_at(b)
    (root / "f0").write_bytes(b"file 0 version two\n")
    await _push_at(a)  # a version where f0 differs
    record, again = await _killed_stage_rerun_after_an_edit(b)
    assert record.state == "staging" and record.held_since_ns  # as a killed stage leaves it
    assert again.trashed_count == 1 and again.fetched_files == 1  # f1: the user's, aside
    assert again.trash_dir is not None
    assert _trashed(Path(again.trash_dir), "f1") == [_EDITED]
    assert _files(b.data / "x") == _files(root)


async def _pushed_tree(env: SiteEnv, count: int = 4) -> Path:
    """`/proj/x` of `count` small files (`f0`...) at site `env`, pushed; its directory."""
    root = env.data / "x"
    root.mkdir()
    for i in range(count):
        (root / f"f{i}").write_bytes(f"file {i} as site a wrote it\n".encode())
    await _push_at(env)
    return root


async def _push_at(env: SiteEnv) -> PushResult:
    site = await env.open()
    try:
        return await push(site, "/proj/x")
    finally:
        await site.close()


_EDITED = b"file 1 AS SITE B WROTE IT\n"


async def _killed_stage_rerun_after_an_edit(env: SiteEnv) -> tuple[ReplicaRow, StageResult]:
    """A stage of `/proj/x` at `env` killed once its writes are over (before it records
    `ready`), a user's edit of f1 keeping its size and mtime, and the stage run again: the
    record the killed stage left, and the rerun's result."""
    site = await env.open()
    real = site.catalog.finish_replica

    async def dies_at_the_end(
        dataset: str, version: str, state: str, *rest: Any, **kw: Any
    ) -> None:
        if state == "ready":
            raise Killed("after its writes")
        await real(dataset, version, state, *rest, **kw)

    site.catalog.finish_replica = dies_at_the_end  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            await stage(site, "/proj/x")
        site.catalog.finish_replica = real  # type: ignore[method-assign]
        record = await site.catalog.replica("/proj/x")
        assert record is not None
        _replace_keeping_mtime(env.data / "x" / "f1", _EDITED)
        return record, await stage(site, "/proj/x")
    finally:
        await site.close()


async def test_on_whole_second_ctimes_a_change_in_the_pushs_second_is_read_later(
    make_site: MakeSite,
) -> None:
    # ext4 of 128-byte inodes stamps ctimes in whole seconds: a change made after the walk
    # began, in the same second, got a ctime before the recorded time and was never pushed.
    a = await make_site("site-a")
    with coarse_ext4(a.data):
        root = a.data / "x"
        root.mkdir()
        for i in range(5):
            (root / f"f{i}").write_bytes(f"first version of file {i}\n".encode())
        site = await a.open()
        try:
            await push(site, "/proj/x")
            time.sleep(1.1)
            while not 0.05 < time.time() % 1 < 0.3:  # the push begins early in a second
                time.sleep(0.01)
            real = site.catalog.clear_checkpoint

            async def replaced_after_the_walk(*args: Any) -> None:
                _replace_keeping_mtime(root / "f2", b"OTHER VERSION OF FILE 2\n")
                await real(*args)

            site.catalog.clear_checkpoint = replaced_after_the_walk  # type: ignore[method-assign]
            second = await push(site, "/proj/x")
            site.catalog.clear_checkpoint = real  # type: ignore[method-assign]
            assert second.unchanged  # the walk was over before f2 was replaced
            record = await site.catalog.replica("/proj/x")
            assert record is not None and record.held_since_ns is not None
            # Its ctime is the whole second the push began in, before the recorded time:
            # compared with that time floored to its second, it is read.
            assert (root / "f2").stat().st_ctime_ns < record.held_since_ns
            time.sleep(1.1)
            third = await push(site, "/proj/x")
            staged = await _stage_at(await make_site("site-b"))
        finally:
            await site.close()
        assert not third.unchanged and third.files_read >= 1
        assert staged == _files(root)


async def test_a_first_stage_killed_keeps_its_start_and_its_rerun_reads_what_it_wrote(
    make_site: MakeSite,
) -> None:
    # The tree had no record: a killed first stage left none with a time, and its rerun
    # kept a user's edit (size and mtime kept) as the version's file.
    a, b = await make_site("site-a"), await make_site("site-b")
    root = await _pushed_tree(a)
    record, again = await _killed_stage_rerun_after_an_edit(b)
    assert record.held_since_ns is not None
    assert again.trashed_count == 1 and again.fetched_files == 1
    assert _files(b.data / "x") == _files(root)


def _regular(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "lost+found" not in p.parts and p.suffix != ".img"
    }


async def test_whole_second_ctimes_of_a_mount_below_the_root_are_noticed(
    make_site: MakeSite,
) -> None:
    # The tree's root keeps nanoseconds; a file system of whole-second ctimes is mounted
    # below it. A change there, in the second the push began, was never pushed.
    a = await make_site("site-a")
    root = a.data / "x"
    root.mkdir()
    (root / "top").write_bytes(b"top file\n")
    with coarse_ext4(root / "sub"):
        for i in range(3):
            (root / "sub" / f"f{i}").write_bytes(f"first version of file {i}\n".encode())
        site = await a.open()
        try:
            await push(site, "/proj/x")
            time.sleep(1.1)
            while not 0.05 < time.time() % 1 < 0.3:  # the push begins early in a second
                time.sleep(0.01)
            real = site.catalog.clear_checkpoint

            async def replaced_after_the_walk(*args: Any) -> None:
                _replace_keeping_mtime(root / "sub" / "f1", b"OTHER version of file 1\n")
                await real(*args)

            site.catalog.clear_checkpoint = replaced_after_the_walk  # type: ignore[method-assign]
            await push(site, "/proj/x")
            site.catalog.clear_checkpoint = real  # type: ignore[method-assign]
            record = await site.catalog.replica("/proj/x")
            assert record is not None and record.held_since_ns is not None
            assert (root / "sub" / "f1").stat().st_ctime_ns < record.held_since_ns
            time.sleep(1.1)
            third = await push(site, "/proj/x")
            b = await make_site("site-b")
            site_b = await b.open()
            try:
                await stage(site_b, "/proj/x")
            finally:
                await site_b.close()
            staged, local = _regular(b.data / "x"), _regular(root)
        finally:
            await site.close()
    assert not third.unchanged
    assert staged["sub/f1"] == b"OTHER version of file 1\n" and staged == local


async def test_on_whole_second_ctimes_a_push_after_a_stage_reads_nothing_it_wrote(
    make_site: MakeSite,
) -> None:
    # Floored to the second, the stage's time came no later than its own last writes: a
    # push after a short stage read every file again. The stage now lets the second pass.
    a, b = await make_site("site-a"), await make_site("site-b")
    root = await _pushed_tree(a, 50)
    with coarse_ext4(b.data):
        staged = await _stage_at(b)
        site = await b.open()
        try:
            after = await push(site, "/proj/x")
        finally:
            await site.close()
    assert staged == _files(root)
    assert after.unchanged and after.files_read == 0
