"""Stage against planted and swapped local files, slow or coarse file systems, failed and
interrupted runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datamover.domain.manifest import Entry, Kind
from datamover.errors import Conflict, Corrupt, PermanentError
from datamover.transfer import crossfs, fsops
from datamover.transfer import stage as stage_module
from datamover.transfer.fsops import TreeWriter
from datamover.transfer.plan import Action, StagePlanner
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from datamover.transfer.walk import Walker
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged
from tests.locking import Gate, a_cli_stage_waits, dataset_lock, held_lock
from tests.test_bad_input import flip_pack_byte, publish_manifest
from tests.test_stage_hardening import _shm_trash


async def test_a_partial_file_hard_linked_elsewhere_is_not_written_through(
    make_site: MakeSite, tmp_path: Path
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ds").mkdir()
    content = os.urandom(3 << 20)  # above batch_bytes / 4: a large file, resumable
    (a.data / "ds" / "big").write_bytes(content)
    victim = tmp_path / "victim"  # a file outside the tree, on the same file system
    victim.write_bytes(b"somebody else's data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        doc = await site_b.repo.resolve("/proj/ds", None)
        [entry] = site_b.repo.iter_cached(await site_b.repo.prefetch(doc), check=True)
        (b.data / "ds").mkdir()
        os.link(victim, b.data / "ds" / fsops.partial_name(entry))  # planted by a user
        await stage(site_b, "/proj/ds")
        assert victim.read_bytes() == b"somebody else's data\n"
        assert (b.data / "ds" / "big").read_bytes() == content
        assert os.stat(b.data / "ds" / "big").st_ino != os.stat(victim).st_ino
    finally:
        await site_a.close()
        await site_b.close()


async def test_operations_queued_for_the_writer_thread_are_bounded(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", write_workers=-1)
    (a.data / "ds").mkdir()
    for i in range(600):
        (a.data / "ds" / f"f{i:03d}").write_text(f"{i}\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        for i in range(600):  # every file needs its mode set again: 600 operations
            os.chmod(b.data / "ds" / f"f{i:03d}", 0o600)
        planned, done, ahead = [0], [0], [0]

        class Counting(StagePlanner):
            def __iter__(self) -> Iterator[Action]:
                for action in super().__iter__():
                    planned[0] += 1
                    yield action

        real = TreeWriter.set_attrs

        def slow(self: TreeWriter, entry: Entry, *args: Any) -> None:  # a slow file system
            ahead[0] = max(ahead[0], planned[0] - done[0])
            time.sleep(0.002)
            real(self, entry, *args)
            done[0] += 1

        monkeypatch.setattr(stage_module, "StagePlanner", Counting)
        monkeypatch.setattr(stage_module, "_PLAN_BATCH", 8)
        monkeypatch.setattr(TreeWriter, "set_attrs", slow)
        await stage(site_b, "/proj/ds")
        assert stat.S_IMODE(os.stat(b.data / "ds" / "f000").st_mode) != 0o600
        assert ahead[0] <= 8 * 16, ahead[0]  # not the whole plan
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_failed_batch_stops_the_fetching_of_the_rest(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", write_workers=-1, batch_bytes=512 << 10)
    (a.data / "ds").mkdir()
    for i in range(60):
        (a.data / "ds" / f"f{i:02d}").write_bytes(os.urandom(100 << 10))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await flip_pack_byte(a, 100)  # the first file's chunk: the first batch fails
        gets: list[str] = []
        real_get = site_b.store.get

        async def counting_get(key: str, *args: Any, **kwargs: Any) -> bytes:
            if key.startswith("packs/"):
                gets.append(key)
            return await real_get(key, *args, **kwargs)

        site_b.store.get = counting_get  # type: ignore[method-assign]
        with pytest.raises(Corrupt, match="'f00'"):
            await stage(site_b, "/proj/ds")
        assert len(gets) <= 4, len(gets)  # of 12 batches: not fetched on after the failure
    finally:
        await site_a.close()
        await site_b.close()


async def test_files_an_interrupted_stage_wrote_are_not_taken_for_the_users(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "ds"
    src.mkdir()
    (src / "result.csv").write_text("v1\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        (src / "result.csv").write_text("v2, rewritten\n")
        (src / "scratch.tmp").write_text("v2 only\n")
        await push(site_a, "/proj/ds")

        def killed(self: object) -> None:  # every file of v2 written, then the run dies
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as patch:
            patch.setattr(stage_module._Stager, "_finish_tree", killed)
            with pytest.raises(OSError):
                await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "result.csv").read_text() == "v2, rewritten\n"
        (src / "result.csv").write_text("v3\n")
        (src / "scratch.tmp").unlink()
        await push(site_a, "/proj/ds")
        staged = await stage(site_b, "/proj/ds", delete=True)
        assert staged.trashed == [] and staged.removed == 1  # datamover wrote both
        assert sorted(p.name for p in (b.data / "ds").iterdir()) == ["result.csv"]
        assert (b.data / "ds" / "result.csv").read_text() == "v3\n"
    finally:
        await site_a.close()
        await site_b.close()


async def _one_file_pushed(make_site: MakeSite) -> SiteEnv:
    """Site B, with `/proj/ds` (one file) pushed at site A."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ds")
    finally:
        await site_a.close()
    return b


async def test_of_two_local_stages_of_one_dataset_one_runs(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = await _one_file_pushed(make_site)
    arrived: list[int] = []
    both = threading.Event()
    real_base = stage_module._base

    async def together(*args: Any) -> Any:  # both past the check before either is recorded
        arrived.append(1)
        if len(arrived) == 2:
            both.set()
        await asyncio.to_thread(both.wait, 10)
        return await real_base(*args)

    monkeypatch.setattr(stage_module, "_base", together)

    def one() -> str:  # a `stage --local` of its own: a thread, a loop and a site
        async def run() -> str:
            site = await b.open()
            try:
                await stage(site, "/proj/ds")
                return "staged"
            except Conflict as exc:
                return exc.message
            finally:
                both.set()  # one that stopped is not waited for
                await site.close()

        return asyncio.run(run())

    outcomes = sorted(await asyncio.gather(asyncio.to_thread(one), asyncio.to_thread(one)))
    assert outcomes[1] == "staged", outcomes
    assert outcomes[0].startswith("a stage of '/proj/ds' is already running ("), outcomes
    assert (b.data / "ds" / "f").read_text() == "data\n"


async def test_a_symlink_at_the_stage_lock_is_not_written_through(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # In a state directory others may write to, a link planted at a dataset's lock path
    # had the next stage of it cut and overwrite whatever file the link leads to.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    victim = tmp_path / "victim"
    victim.write_text("somebody else's data\n")
    lock = dataset_lock(b, "/proj/ds")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.symlink_to(victim)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        with pytest.raises(PermanentError, match=r"the lock of '/proj/ds'.*symlink"):
            await stage(site_b, "/proj/ds")
        assert victim.read_text() == "somebody else's data\n"
        assert not (b.data / "ds" / "f").exists()
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_stage_runs_where_the_state_dir_keeps_no_flock(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Lustre mounted `noflock` answers ENOSYS, NFS without a lock manager ENOLCK, and an
    # exclusive lock on a read-only descriptor over NFS EBADF: every stage failed there.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    real = fcntl.flock

    def no_flock(fd: int, op: int) -> None:
        if "/locks/stage-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        real(fd, op)

    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        monkeypatch.setattr(fcntl, "flock", no_flock)
        await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "f").read_text() == "data\n"
        assert "stages of /proj/ds are not kept apart" in caplog.text
        assert (await verify(site_b, "/proj/ds")).ok  # and so does a verify
        assert "a verify of /proj/ds is not kept apart from stages" in caplog.text
        assert (await push(site_b, "/proj/ds")).unchanged  # and a push
        assert "a push of /proj/ds is not kept apart from stages" in caplog.text
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_stage_lock_that_cannot_be_made_is_a_one_line_error(make_site: MakeSite) -> None:
    b = await _one_file_pushed(make_site)
    locks = b.state / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    locks.chmod(0o555)  # a state directory another user made, say
    try:
        r = cli_unprivileged(b, "stage", "/proj/ds")
    finally:
        locks.chmod(0o755)
    assert r.returncode == 7, r.stderr
    [line] = r.stderr.strip().splitlines()
    assert "the lock of '/proj/ds'" in line and "permission denied" in line, line


async def test_a_verify_while_a_stage_runs_is_a_conflict(make_site: MakeSite) -> None:
    # A verify walking beside a stage of its dataset gives 0o600 directories their owner's
    # bits for a moment: the stage got EACCES or took them for the directory's mode.
    b = await _one_file_pushed(make_site)
    site_b = await b.open()
    try:
        await stage(site_b, "/proj/ds")
        lock = dataset_lock(b, "/proj/ds")
        with held_lock(lock, fcntl.LOCK_EX, b"node7:4242"):
            with pytest.raises(Conflict) as caught:
                await verify(site_b, "/proj/ds")
            r = b.cli("verify", "/proj/ds")
        assert caught.value.message == (
            "a stage of '/proj/ds' is running (node7:4242); verify after it ends"
        )
        assert r.returncode == Conflict.exit_code, r.stderr
        assert r.stderr.strip().splitlines() == [f"datamover: error: {caught.value.message}"]
        found = await verify(site_b, "/proj/ds")  # held by no one: verifies as before
        assert found.ok and found.files_checked == 1, found.problems
        with held_lock(lock, fcntl.LOCK_SH):  # nor do verifies exclude each other
            assert (await verify(site_b, "/proj/ds")).ok
    finally:
        await site_b.close()


async def test_a_stage_while_a_verify_walks_waits_for_it(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job's staging hook must not fail because someone checks the tree: a stage that
    # finds a verify walking waits for it to end, in the process and in the CLI, and a
    # stage cancelled while it waits lets go of everything.
    from datamover.transfer import verify as verify_module

    b = await _one_file_pushed(make_site)
    gate = Gate()
    real = verify_module._merge

    def held_merge(*args: Any) -> None:
        gate.hold()
        real(*args)

    site_b = await b.open()
    try:
        await stage(site_b, "/proj/ds")  # the lock file names this, finished, stage
        lock = dataset_lock(b, "/proj/ds")
        named = lock.read_bytes()
        monkeypatch.setattr(verify_module, "_merge", held_merge)

        checking = await gate.start(verify(site_b, "/proj/ds"))
        waiting = asyncio.create_task(stage(site_b, "/proj/ds"))
        await asyncio.sleep(0.6)
        assert not waiting.done(), "the stage ran while the verify walked"
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiting, 5)  # a cancel does not wait for the verify
        staging = asyncio.create_task(stage(site_b, "/proj/ds"))
        await asyncio.sleep(0.6)
        assert not staging.done()
        assert lock.read_bytes() == named  # a verify does not write itself into the file
        gate.release()
        assert (await checking).ok
        assert (await asyncio.wait_for(staging, 20)).files == 1

        checking = await gate.start(verify(site_b, "/proj/ds"))
        assert (await a_cli_stage_waits(b, gate, checking)).ok
    finally:
        gate.release()
        await site_b.close()


async def test_a_cancelled_verify_keeps_stages_out_until_its_walk_ends(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamover.transfer import verify as verify_module

    b = await _one_file_pushed(make_site)
    walking, go, walked = threading.Event(), threading.Event(), threading.Event()
    real = verify_module._merge

    def slow_merge(*args: Any) -> None:
        walking.set()
        go.wait(10)
        real(*args)
        walked.set()

    site_b = await b.open()
    try:
        await stage(site_b, "/proj/ds")
        monkeypatch.setattr(verify_module, "_merge", slow_merge)
        checking = asyncio.create_task(verify(site_b, "/proj/ds"))
        assert await asyncio.to_thread(walking.wait, 10)
        checking.cancel()
        asyncio.get_running_loop().call_later(0.3, go.set)
        with pytest.raises(asyncio.CancelledError):
            await checking
        assert walked.is_set(), "the verify let its lock go while its walk went on"
        with held_lock(dataset_lock(b, "/proj/ds"), fcntl.LOCK_EX):
            pass  # and let it go once the walk ended
    finally:
        go.set()
        await site_b.close()


async def test_a_stage_cancelled_while_its_lock_file_hangs_leaks_no_descriptor(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lock was taken on the event loop: a state directory on a hung network mount held
    # up every transfer of the daemon. In a thread, a cancel must not leak what it opens.
    b = await _one_file_pushed(make_site)
    lock = dataset_lock(b, "/proj/ds")
    opening, go, opened = threading.Event(), threading.Event(), threading.Event()
    real_open = os.open

    def hung_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path) != str(lock):
            return real_open(path, flags, *args, **kwargs)
        opening.set()
        go.wait(20)
        try:
            return real_open(path, flags, *args, **kwargs)
        finally:
            opened.set()

    def lock_fds() -> list[Path]:
        """This process's descriptors of the lock file."""
        found = []
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):  # the listing's own, closed since
                if fd.readlink() == lock:
                    found.append(fd)
        return found

    site_b = await b.open()
    try:
        monkeypatch.setattr(os, "open", hung_open)
        started = time.monotonic()
        task = asyncio.create_task(stage(site_b, "/proj/ds"))
        assert await asyncio.to_thread(opening.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 10, "the stage waited for its lock file's open"
        assert not go.is_set()
        go.set()  # the mount answers: the descriptor opened for no one is closed
        assert await asyncio.to_thread(opened.wait, 10)
        deadline = time.monotonic() + 10
        while lock_fds() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert lock_fds() == []
        with held_lock(lock, fcntl.LOCK_EX):
            pass  # nobody holds it
        await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "f").read_text() == "data\n"
    finally:
        go.set()
        await site_b.close()


async def _five_files_pushed(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv]:
    """Sites A and B, with `/proj/ds` (five small files) pushed from A."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    for i in range(5):
        (a.data / "ds" / f"f{i}").write_text(f"{i}\n")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ds")
    finally:
        await site_a.close()
    return a, b


def _planning_held(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event, threading.Event]:
    """Stages plan (walk) only once `go` is set: `(planning, go, walked)`, `planning` set
    when a stage's walk, in its thread, waits for `go`; `walked` once it planned an action."""
    planning, go, walked = threading.Event(), threading.Event(), threading.Event()
    real = stage_module._Stager._planner

    def slow_planner(self: Any, stored_mtime: Any) -> Iterator[Any]:
        actions = real(self, stored_mtime)

        def slowly() -> Iterator[Any]:
            planning.set()
            # Long enough for any machine: on a loaded one, 10 s ran out before the test set
            # `go`, and the walk went on as though it had (a close then looked premature).
            go.wait(120)
            for action in actions:
                walked.set()
                yield action

        return slowly()

    monkeypatch.setattr(stage_module._Stager, "_planner", slow_planner)
    return planning, go, walked


async def test_a_stage_cancelled_while_it_plans_ends_after_its_walk(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The walk runs in a thread and may give a directory its owner's read and search bits
    # (Walker.allow_unlock); a cancel while the stage waited for it gave modes back while
    # the walk went on, so what it unlocked after that kept those bits.
    _, b = await _five_files_pushed(make_site)
    planning, go, walked = _planning_held(monkeypatch)
    site_b = await b.open()
    try:
        task = asyncio.create_task(stage(site_b, "/proj/ds"))
        assert await asyncio.to_thread(planning.wait, 10)
        task.cancel()
        asyncio.get_running_loop().call_later(0.3, go.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        ended_after_walk = walked.is_set()
        go.set()
        assert await asyncio.to_thread(walked.wait, 10)
        assert ended_after_walk, "the stage ended while its walk went on"
    finally:
        await site_b.close()


async def test_a_stage_cancelled_twice_leaves_the_walk_running_in_its_thread_alone(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second cancel ends the stage's wait for its walk, which goes on in its thread:
    # closing the walk then (as a failed stage does) closed the directory descriptors the
    # walk was using, and their numbers could be another file's by its next look.
    _, b = await _five_files_pushed(make_site)
    planning, go, _ = _planning_held(monkeypatch)
    closed_while_walking: list[bool] = []
    real_close = Walker.close

    def close(self: Walker, wait_lookups: bool = True) -> None:
        closed_while_walking.append(planning.is_set() and not go.is_set())
        real_close(self, wait_lookups)

    monkeypatch.setattr(Walker, "close", close)
    site_b = await b.open()
    try:
        task = asyncio.create_task(stage(site_b, "/proj/ds"))
        assert await asyncio.to_thread(planning.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go.set()
        await asyncio.sleep(0.2)
        assert True not in closed_while_walking
    finally:
        go.set()
        await site_b.close()


async def test_a_restage_keeps_files_whose_mtime_the_file_system_cannot_hold(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    # Pushed where the file system holds it (tmpfs, XFS with big timestamps); ext4 keeps no
    # time before 1901, a file system of 1 s timestamps no nanoseconds.
    old = Entry("census-1850.txt", Kind.FILE, 0o644, -(1 << 62))
    await publish_manifest(a, "/proj/old", [old, Entry("now.txt", Kind.FILE, 0o644, 1)])
    site_b = await b.open()
    try:
        await stage(site_b, "/proj/old")
        root = os.open(b.data / "old", os.O_RDONLY | os.O_DIRECTORY)
        try:
            stored = fsops.stored_mtime(root)
        finally:
            os.close(root)
        for name, mtime in (("census-1850.txt", -(1 << 62)), ("now.txt", 1)):
            assert os.stat(b.data / "old" / name).st_mtime_ns == stored(mtime)
        again = await stage(site_b, "/proj/old")
        assert again.trashed == [] and again.fetched_files == 0 and again.kept_files == 2
        assert [p.name for p in (b.data / "old").iterdir() if p.name.startswith(".dm-")] == []
    finally:
        await site_b.close()


async def test_verify_takes_mtimes_as_the_file_system_stores_them(make_site: MakeSite) -> None:
    # What stage accepts (the test above), verify must accept too, and report the rest.
    a, b = await make_site("site-a"), await make_site("site-b")
    old = -(1 << 62)
    entries = [
        Entry("census", Kind.DIR, 0o755, old),
        Entry("census/1850.txt", Kind.FILE, 0o644, old),
        Entry("now.txt", Kind.FILE, 0o644, 1),
    ]
    await publish_manifest(a, "/proj/old", entries)
    site_b = await b.open()
    try:
        await stage(site_b, "/proj/old")
        staged = b.data / "old"
        if os.stat(staged / "census").st_mtime_ns == old:
            pytest.skip("this file system holds an mtime before 1901: nothing to model")
        assert (await verify(site_b, "/proj/old")).ok
        os.utime(staged / "census" / "1850.txt", ns=(2, 2))  # a user's touch: different
        os.utime(staged / "census", ns=(3, 3))
        found = await verify(site_b, "/proj/old")
        assert found.problems == [
            "census: modification time differs from the version",
            "census/1850.txt: modification time differs from the version",
        ]
    finally:
        await site_b.close()


def _refused_once(monkeypatch: pytest.MonkeyPatch, name: str, always: bool = False) -> None:
    """Have the walk refused (EACCES, as a user who is not root is) when it first opens
    directory `name` (`always`: every time, as a security module might), so that it
    unlocks it; root's chmod then does what a user's would."""
    real = Walker._open_once
    refused: list[str] = []

    def open_once(self: Walker, rel: str, flags: int) -> int:
        if rel == name and not flags & os.O_PATH and (always or not refused):
            refused.append(rel)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(self, rel, flags)

    monkeypatch.setattr(Walker, "_open_once", open_once)


def test_a_directory_the_walk_unlocked_in_vain_gets_its_mode_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o300)
    _refused_once(monkeypatch, "d", always=True)
    walker = Walker(str(tmp_path), strict=False)  # verify's: modes given back
    try:
        assert next(walker).path == "d"
        walker.allow_unlock()
        with pytest.raises(PermanentError, match="'d'"):
            next(walker)
    finally:
        walker.close()
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o300


def test_verify_leaves_a_mode_changed_while_it_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stage setting a new version's mode (0o755) while a verify walks the directory: the
    # verify gave the directory the mode it had found (0o600) as it left.
    (tmp_path / "d").mkdir()
    for name in ("x", "y"):
        (tmp_path / "d" / name).touch()
    os.chmod(tmp_path / "d", 0o600)
    _refused_once(monkeypatch, "d")
    walker = Walker(str(tmp_path), strict=False)
    try:
        assert next(walker).path == "d"
        walker.allow_unlock()
        assert next(walker).path == "d/x"
        assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700  # unlocked
        os.chmod(tmp_path / "d", 0o755)
        assert [e.path for e in walker] == ["d/y"]
    finally:
        walker.close()
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


def test_probing_the_file_system_leaves_its_directory_as_it_was(tmp_path: Path) -> None:
    # verify probes too, in the dataset's directory, and must not change what it compares.
    os.utime(tmp_path, ns=(5, 5))
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stored = fsops.stored_mtime(fd)
    finally:
        os.close(fd)
    assert os.stat(tmp_path).st_mtime_ns == 5 and list(tmp_path.iterdir()) == []
    (tmp_path / "f").touch()  # and the model is this file system's all the same
    os.utime(tmp_path / "f", ns=(-(1 << 62), -(1 << 62)))
    assert stored(-(1 << 62)) == os.stat(tmp_path / "f").st_mtime_ns


async def test_a_directory_stage_cannot_read_is_a_one_line_error(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "deep" / "sub").mkdir(parents=True)
    (a.data / "ds" / "deep" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    locked = b.data / "ds" / "deep" / "sub"
    os.chmod(locked, 0)  # the user locks a staged directory
    try:
        proc = cli_unprivileged(b, "stage", "/proj/ds")
    finally:
        os.chmod(locked, 0o755)
    assert proc.returncode == PermanentError.exit_code, proc.stderr
    assert proc.stderr.count("\n") == 1 and "'deep/sub'" in proc.stderr, proc.stderr


def test_checking_content_does_not_wait_on_a_fifo_swapped_in(tmp_path: Path) -> None:
    # --checksum and verify read a file the walk saw; a user may have replaced it since.
    os.mkfifo(tmp_path / "results.csv")
    entry = Entry("results.csv", Kind.FILE, 0o644, 0, 0)
    checked = concurrent.futures.ThreadPoolExecutor(1).submit(
        fsops.content_matches, str(tmp_path), entry
    )
    try:
        assert checked.result(timeout=10) is False
    finally:
        if not checked.done():  # let the blocked open return
            os.close(os.open(tmp_path / "results.csv", os.O_WRONLY | os.O_NONBLOCK))


def test_a_file_written_while_its_directory_is_copied_to_the_trash_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        (tmp_path / "ds" / "run7").mkdir(parents=True)
        for name in ("a.log", "b.log"):
            (tmp_path / "ds" / "run7" / name).write_text(name)
        real = crossfs.copy_file

        def copy_while_a_job_writes(src: int, st: os.stat_result, dst_dir: int, name: str) -> None:
            real(src, st, dst_dir, name)
            late = tmp_path / "ds" / "run7" / "late.log"
            if not late.exists():  # a job still running in the directory writes a result
                late.write_text("written during the copy\n")

        monkeypatch.setattr(crossfs, "copy_file", copy_while_a_job_writes)
        writer = TreeWriter(fsops.open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
        try:
            with contextlib.suppress(PermanentError):
                writer.trash("run7")
        finally:
            writer.close()
            os.close(writer.root_fd)
        kept = [p for p in (tmp_path / "ds" / "run7", trash / "run7") if (p / "late.log").exists()]
        assert kept, "the file written during the copy is gone"
        for name in ("a.log", "b.log"):  # and each earlier file is in one place or the other
            assert (tmp_path / "ds" / "run7" / name).exists() or (trash / "run7" / name).exists()
    finally:
        shutil.rmtree(trash)


async def test_a_failed_stage_gives_a_read_only_directory_its_mode_back(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_bytes(os.urandom(50_000))
    assert a.cli("push", "/proj/ds").returncode == 0
    await flip_pack_byte(a, 100)  # the file cannot be written: the stage fails after mkdir
    root = b.data / "ds"
    root.mkdir()
    os.chmod(root, 0o555)  # the user's read-only dataset directory
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    assert proc.returncode == Corrupt.exit_code, proc.stderr
    assert (root / "sub").is_dir()  # made, so the directory was made writable for it
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o555


async def test_a_stage_with_nothing_to_do_leaves_the_dataset_directory_as_it_was(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        os.utime(b.data / "ds", ns=(1, 1))
        assert (await stage(site_b, "/proj/ds")).kept_files == 1
        assert os.stat(b.data / "ds").st_mtime_ns == 1  # no file made and removed in it
    finally:
        await site_a.close()
        await site_b.close()


async def test_the_plan_reads_the_tree_the_stage_writes_when_the_directory_is_swapped(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "notes.txt").write_text("v1\n")
    (a.data / "ds" / "keep.txt").write_text("kept\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        decoy = tmp_path / "decoy"
        shutil.copytree(b.data / "ds", decoy)  # notes.txt as datamover wrote it
        (b.data / "ds" / "notes.txt").write_text("v1 and the user's edits\n")
        (a.data / "ds" / "notes.txt").unlink()
        await push(site_a, "/proj/ds")
        real_open = fsops.open_root

        def open_then_swap(base: Path, parts: tuple[str, ...], create: bool = True) -> int:
            fd = real_open(base, parts, create)
            if not (b.data / "ds.moved").exists():  # the directory is swapped under the stage
                (b.data / "ds").rename(b.data / "ds.moved")
                (b.data / "ds").symlink_to(decoy)
            return fd

        monkeypatch.setattr(fsops, "open_root", open_then_swap)
        staged = await stage(site_b, "/proj/ds", delete=True)
        assert staged.trashed == ["notes.txt"], staged  # the user's edits, not removed
        assert (decoy / "notes.txt").read_text() == "v1\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_directory_swapped_for_a_symlink_during_a_stage_is_a_one_line_conflict(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        real = stage_module._Stager._finish_tree

        def swap_then_finish(self: stage_module._Stager) -> None:
            staged = b.data / "ds" / "sub"
            staged.rename(b.data / "ds.sub.moved")  # a user's move, while the stage runs
            staged.symlink_to(b.data / "ds.sub.moved")
            real(self)

        monkeypatch.setattr(stage_module._Stager, "_finish_tree", swap_then_finish)
        with pytest.raises(Conflict, match="'sub'"):
            await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_partial_file_left_in_a_directory_the_next_version_lacks_is_removed(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "ds"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        (src / "new").mkdir()
        (src / "new" / "small.txt").write_text("small\n")
        await push(site_a, "/proj/ds")

        def killed(self: object) -> None:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as patch:
            patch.setattr(stage_module._Stager, "_finish_tree", killed)
            with pytest.raises(OSError):
                await stage(site_b, "/proj/ds")
        partial = b.data / "ds" / "new" / ".dm-0123456789abcdef.part"
        partial.write_bytes(b"half of a large file")  # what the killed run was writing
        shutil.rmtree(src / "new")
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")  # without --delete: new/ itself stays
        assert not partial.exists()
        assert (b.data / "ds" / "new" / "small.txt").read_text() == "small\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_file_edited_after_it_was_planned_for_removal_goes_to_the_trash(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "ds"
    src.mkdir()
    (src / "draft.txt").write_text("v1\n")
    (src / "keep.txt").write_text("kept\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        (src / "draft.txt").unlink()
        await push(site_a, "/proj/ds")
        real = TreeWriter.remove

        def edited_meanwhile(self: TreeWriter, rel: str, *args: Any) -> None:
            # The user saves new work into the file after the walk saw it as datamover's.
            (b.data / "ds" / rel).write_text("v1 and an hour of the user's work\n")
            real(self, rel, *args)

        monkeypatch.setattr(TreeWriter, "remove", edited_meanwhile)
        staged = await stage(site_b, "/proj/ds", delete=True)
        trashed = Path(staged.trash_dir or "") / "draft.txt"
        assert trashed.read_text() == "v1 and an hour of the user's work\n"
        assert not (b.data / "ds" / "draft.txt").exists()
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_file_edited_after_it_was_planned_for_a_mode_change_keeps_its_mtime(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The version changes only the file's mode; a user saves into it (keeping its size)
    # after the walk and before the mode is set. Given the entry's mtime too, the user's
    # bytes passed for datamover's, and the next version replaced them without a trace.
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "ds"
    src.mkdir()
    (src / "notes.txt").write_text("version one\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        (src / "notes.txt").chmod(0o600)
        await push(site_a, "/proj/ds")
        real = TreeWriter.set_attrs

        def edited_meanwhile(self: TreeWriter, entry: Entry, *args: Any) -> None:
            if entry.path == "notes.txt":
                (b.data / "ds" / "notes.txt").write_text("user's work!\n")  # same size
            real(self, entry, *args)

        monkeypatch.setattr(TreeWriter, "set_attrs", edited_meanwhile)
        await stage(site_b, "/proj/ds")
        monkeypatch.undo()
        assert (b.data / "ds" / "notes.txt").read_text() == "user's work!\n"
        assert (
            os.stat(b.data / "ds" / "notes.txt").st_mtime_ns
            != os.stat(src / "notes.txt").st_mtime_ns
        )

        (src / "notes.txt").write_text("version three\n")
        await push(site_a, "/proj/ds")
        staged = await stage(site_b, "/proj/ds")
        assert (Path(staged.trash_dir or "") / "notes.txt").read_text() == "user's work!\n"
        assert (b.data / "ds" / "notes.txt").read_text() == "version three\n"
    finally:
        await site_a.close()
        await site_b.close()


async def test_set_id_bits_of_files_are_not_staged(make_site: MakeSite) -> None:
    """A version is untrusted: stage (here as root) must not create set-user-ID or
    set-group-ID programs from it; verify and a restage agree with what it wrote."""
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    ds = a.data / "ds"
    (ds / "shared").mkdir(parents=True)
    (ds / "small").write_bytes(b"#!/bin/sh\n")
    (ds / "big").write_bytes(os.urandom(3 << 20))  # above batch_bytes / 4: the large path
    os.chmod(ds / "small", 0o4755)
    os.chmod(ds / "big", 0o6750)
    os.chmod(ds / "shared", 0o2775)
    a.cli_json("push", "/proj/ds")
    site_b = await b.open()
    try:
        doc = await site_b.repo.resolve("/proj/ds", None)
        modes = {
            e.path: e.mode
            for e in site_b.repo.iter_cached(await site_b.repo.prefetch(doc), check=True)
        }
    finally:
        await site_b.close()
    assert modes == {"big": 0o6750, "shared": 0o2775, "small": 0o4755}  # recorded as they are
    staged = b.cli_json("stage", "/proj/ds")
    assert staged["files"] == 2

    def mode(name: str) -> int:
        return stat.S_IMODE(os.lstat(b.data / "ds" / name).st_mode)

    assert (mode("small"), mode("big"), mode("shared")) == (0o755, 0o750, 0o2775)
    assert b.cli_json("verify", "/proj/ds")["ok"] is True
    again = b.cli_json("stage", "/proj/ds")
    assert again["fetched_files"] == 0 and not again.get("trashed_count")
    assert (mode("small"), mode("big")) == (0o755, 0o750)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a directory of another user")
async def test_stage_and_verify_need_only_search_permission_above_the_dataset(
    make_site: MakeSite,
) -> None:
    # Stage opened every directory on the way for reading: a 0o711 directory of another
    # user above the dataset (a home, a shared project directory) made it fail with
    # "permission denied" although the dataset's own directory was writable.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "home" / "ds" / "sub").mkdir(parents=True)
    (a.data / "home" / "ds" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/home/ds", "--json").returncode == 0
    (b.data / "home" / "ds").mkdir(parents=True)
    os.chown(b.data / "home", 65534, 65534)
    os.chmod(b.data / "home", 0o711)
    r = cli_unprivileged(b, "stage", "/proj/home/ds", "--json")
    assert r.returncode == 0, r.stderr
    assert (b.data / "home" / "ds" / "sub" / "f").read_text() == "data\n"
    r = cli_unprivileged(b, "verify", "/proj/home/ds", "--json")
    assert r.returncode == 0, r.stderr
    # Without search permission the error still names the directory, one line.
    os.chmod(b.data / "home", 0o700)
    r = cli_unprivileged(b, "stage", "/proj/home/ds", "--json")
    assert r.returncode != 0
    assert "home" in r.stderr and "Traceback" not in r.stderr


async def test_a_one_second_file_system_gets_the_new_version_of_a_file_rewritten_within_it(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Site b's file system keeps whole seconds (modelled here: the model is what stage
    # probes, and the staged file's mtime is set as such a file system stores it). Two
    # versions of one size written in one second looked alike there: the stage of the
    # second kept the first's bytes, said "ready" and verify then failed.
    def whole_seconds(dir_fd: int) -> Any:
        return lambda ns: ns - ns % 1_000_000_000

    monkeypatch.setattr(fsops, "stored_mtime", whole_seconds)
    a, b = await make_site("site-a"), await make_site("site-b")
    f = a.data / "ds" / "status"
    f.parent.mkdir()
    t = 1_764_583_200_000_000_000
    site_a, site_b = await a.open(), await b.open()
    try:
        f.write_text("state=AAAA\n")
        os.utime(f, ns=(t + 200_000_000, t + 200_000_000))
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        staged = b.data / "ds" / "status"
        os.utime(staged, ns=(t, t))  # as the file system stored it
        f.write_text("state=BBBB\n")
        os.utime(f, ns=(t + 800_000_000, t + 800_000_000))
        await push(site_a, "/proj/ds")
        result = await stage(site_b, "/proj/ds")
        assert staged.read_text() == "state=BBBB\n"
        assert result.fetched_files == 1 and result.trashed_count == 0
    finally:
        await site_a.close()
        await site_b.close()
