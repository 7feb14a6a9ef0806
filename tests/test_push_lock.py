"""Push and stage of one dataset on one host: a push reads the tree under the dataset's lock,
held shared, so it never publishes what a stage is half-way through writing."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from datamover.catalog.access import Access
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission, now
from datamover.catalog.transfers import Transfers
from datamover.domain.manifest import Entry
from datamover.errors import Conflict, DatamoverError, NotFound
from datamover.metrics import Metrics
from datamover.scheduler.worker import Worker
from datamover.site import Site
from datamover.transfer import push as push_module
from datamover.transfer import stage as stage_module
from datamover.transfer.fsops import TreeWriter
from datamover.transfer.push import push
from datamover.transfer.scan import Scanner
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.locking import Gate, a_cli_stage_waits, dataset_lock, held_lock

_RUNNING = "a stage of '/proj/ds' is running (node7:4242); push after it ends"


async def _keys(site: Site) -> list[str]:
    """Every key in the bucket."""
    return [info.key async for info in site.store.list("")]


async def _pushed(make_site: MakeSite) -> SiteEnv:
    """Site A with `/proj/ds` (one file) pushed, and a second file added since."""
    a = await make_site("site-a")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ds")
    finally:
        await site_a.close()
    (a.data / "ds" / "g").write_text("more\n")
    return a


async def test_a_push_while_a_stage_runs_is_a_conflict(make_site: MakeSite) -> None:
    # A push beside a stage of its dataset published the stage's half-written tree (its
    # `.dm-….part` files only) as the latest version.
    a = await _pushed(make_site)
    site_a = await a.open()
    try:
        before = await _keys(site_a)
        with held_lock(dataset_lock(a, "/proj/ds"), fcntl.LOCK_EX, b"node7:4242"):
            with pytest.raises(Conflict) as caught:
                await push(site_a, "/proj/ds")
            r = a.cli("push", "/proj/ds")
        assert caught.value.message == _RUNNING
        assert r.returncode == Conflict.exit_code, r.stderr
        assert r.stderr.strip().splitlines() == [f"datamover: error: {_RUNNING}"]
        assert await _keys(site_a) == before  # nothing uploaded, nothing published
        assert await site_a.catalog.checkpoint("/proj/ds") is None  # nor a push begun
        pushed = await push(site_a, "/proj/ds")  # held by no one: pushes as before
        assert pushed.files == 2 and not pushed.unchanged
    finally:
        await site_a.close()


async def test_a_push_while_a_stage_writes_publishes_nothing(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await _pushed(make_site)
    b = await make_site("site-b")
    writing, go = threading.Event(), threading.Event()
    real = stage_module._Stager._finish_tree

    def held(self: Any) -> None:  # every file written, directory attributes still to set
        writing.set()
        go.wait(20)
        real(self)

    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")  # v2: two files
        versions = await site_b.repo.version_ids("/proj/ds")
        monkeypatch.setattr(stage_module._Stager, "_finish_tree", held)
        staging = asyncio.create_task(stage(site_b, "/proj/ds"))
        assert await asyncio.to_thread(writing.wait, 10)
        with pytest.raises(Conflict) as caught:
            await push(site_b, "/proj/ds")
        go.set()
        assert (await staging).files == 2
        assert caught.value.message.startswith("a stage of '/proj/ds' is running (")
        assert caught.value.message.endswith("); push after it ends")
        assert await site_b.repo.version_ids("/proj/ds") == versions
    finally:
        go.set()
        await site_a.close()
        await site_b.close()


async def test_a_stage_while_a_push_walks_waits_for_it(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await _pushed(make_site)
    gate = Gate()

    class HeldScanner(Scanner):
        def next_batch(self, *args: Any, **kwargs: Any) -> list[object]:
            gate.hold()
            return super().next_batch(*args, **kwargs)

    site_a = await a.open()
    try:
        monkeypatch.setattr(push_module, "Scanner", HeldScanner)
        pushing = await gate.start(push(site_a, "/proj/ds"))
        staging = asyncio.create_task(stage(site_a, "/proj/ds"))
        await asyncio.sleep(0.6)
        assert not staging.done(), "the stage ran while the push walked"
        gate.release()
        pushed = await pushing
        assert pushed.files == 2 and not pushed.unchanged
        staged = await asyncio.wait_for(staging, 20)
        assert staged.version == pushed.version  # what the push published, once it had

        (a.data / "ds" / "h").write_text("yet more\n")
        pushing = await gate.start(push(site_a, "/proj/ds"))
        assert (await a_cli_stage_waits(a, gate, pushing)).files == 3
    finally:
        gate.release()
        await site_a.close()


async def test_a_daemon_push_that_meets_a_stage_is_tried_again_after_it(
    make_site: MakeSite,
) -> None:
    # It failed at once, for good; the stage (a job's, run --local) soon ends.
    a = await _pushed(make_site)
    site = await a.open()
    try:
        queue = Transfers(site.catalog.engine, max_attempts=3)
        before = await _keys(site)
        t, _ = await queue.submit(Submission(tenant="t1", kind="push", path="/proj/ds"))
        worker = Worker(site, queue, Access(site.catalog.engine), "w1", Metrics("s"))
        with held_lock(dataset_lock(a, "/proj/ds"), fcntl.LOCK_EX, b"node7:4242"):
            assert await worker.run_once()
        row = await queue.get(t.id)
        assert row.state == "queued" and row.attempts == 1, row
        assert row.error is not None
        assert (row.error["code"], row.error["message"]) == ("conflict", _RUNNING)
        assert await _keys(site) == before
        async with site.catalog.engine.begin() as conn:  # its backoff over
            await conn.execute(update(T).where(T.c.id == t.id).values(not_before=now()))
        assert await worker.run_once()
        assert (await queue.get(t.id)).state == "succeeded"
    finally:
        await site.close()


async def test_a_push_of_a_tree_a_stage_did_not_finish_needs_force(make_site: MakeSite) -> None:
    # A stage of v2 at site B fails midway (a pack of v2 is gone from the store) after it
    # wrote v2's `big`: the tree holds v2's `big` and v1's files where v2 changed them.
    # Pushed, it became the latest version and undid v2 for every site; with --delete
    # elsewhere, it removed v2's new files.
    a = await make_site("site-a", pack_size=1 << 20)
    src = a.data / "ds"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(f"v1 of {i}\n".encode() * 100)
    a.cli_json("push", "/proj/ds")
    # B writes a file of more than a quarter of its batch (1 MiB) on its own, before the
    # small files after it in the tree are fetched.
    b = await make_site("site-b", batch_bytes=4 << 20)
    b.cli_json("stage", "/proj/ds")
    (src / "big").write_bytes(os.urandom(3 << 20))
    a.cli_json("push", "/proj/ds")
    before = await _packs(a)
    for i in range(10, 20):
        (src / f"f{i:02d}").write_bytes(f"v2 of {i}\n".encode() * 100)
    v2 = a.cli_json("push", "/proj/ds")["version"]
    await _delete(a, await _packs(a) - before)  # the packs of v2's small files only
    failed = b.cli("stage", "/proj/ds", "--json")
    assert failed.returncode != 0, failed.stdout
    assert (b.data / "ds" / "big").read_bytes() == (src / "big").read_bytes()  # written

    refused = b.cli("push", "/proj/ds", "--json")
    assert refused.returncode == 4, refused.stderr
    assert f"a stage of version {v2} into this tree did not finish" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    listed = a.cli_json("ls", "/proj/ds")["datasets"][0]["versions"]
    assert max(v["version"] for v in listed) == v2  # nothing was published
    forced = b.cli_json("push", "/proj/ds", "--force")
    assert forced["version"] != v2  # published as it is, as asked


async def _v1_staged_v2_pushed(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv, set[str]]:
    """Site A pushes v1 of `/proj/ds` (20 files), site B stages it, A pushes v2 (half of
    the files changed); return A, B and the packs v2 added."""
    a = await make_site("site-a", pack_size=1 << 20)
    src = a.data / "ds"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(f"v1 of {i}\n".encode() * 100)
    a.cli_json("push", "/proj/ds")
    before = await _packs(a)
    b = await make_site("site-b")
    b.cli_json("stage", "/proj/ds")
    for i in range(10, 20):
        (src / f"f{i:02d}").write_bytes(f"v2 of {i}\n".encode() * 100)
    a.cli_json("push", "/proj/ds")
    return a, b, await _packs(a) - before


def _refused_only_as_behind(b: SiteEnv) -> None:
    """B's push is not refused as from a tree a stage left half done (which only --force
    gets past, skipping the check where it matters): only as one that holds v1 while A
    published v2 since, which a stage of the latest, or --force, gets past."""
    pushed = b.cli("push", "/proj/ds", "--json")
    assert pushed.returncode == 4, pushed.stderr
    assert "did not finish" not in pushed.stderr, pushed.stderr
    assert "the tree here holds version" in pushed.stderr, pushed.stderr


def _tree(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.iterdir())}


async def _stage_fails_keeping_the_record(b: SiteEnv) -> str:
    """Run a stage of `/proj/ds` at B that must fail; check that B's replica record, which
    said `ready`, is as it was (every field), and that push then needs no --force. Returns
    the failed stage's stderr."""
    site_b = await b.open()
    try:
        record = await site_b.catalog.replica("/proj/ds")
        assert record is not None and record.state == "ready"
        failed = b.cli("stage", "/proj/ds", "--json")
        assert failed.returncode != 0, failed.stdout
        assert "Traceback" not in failed.stderr
        assert await site_b.catalog.replica("/proj/ds") == record
    finally:
        await site_b.close()
    return failed.stderr


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
async def test_a_stage_that_failed_before_changing_the_tree_leaves_push_alone(
    make_site: MakeSite, damage: str
) -> None:
    # The pack of v2's changed files is gone (or damaged): B's stage of v2 fails at its
    # first fetch (or the first batch's check), before it has written anything, so the
    # tree still is v1, as the record said. Recording the stage as failed had push refuse
    # that tree, and the only way on was --force, which skips the check where it matters.
    a, b, added = await _v1_staged_v2_pushed(make_site)
    if damage == "deleted":
        await _delete(a, added)
    else:
        await _corrupt(a, added)
    tree = _tree(b.data / "ds")
    await _stage_fails_keeping_the_record(b)
    assert _tree(b.data / "ds") == tree
    _refused_only_as_behind(b)


async def _v1_staged_big_changed(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv, str, set[str]]:
    """Site A pushes v1 of `/proj/ds` (a 3 MiB file and a small one), site B stages it, A
    pushes v2 with another large file; return A, B, v1's id and the packs v2 added."""
    a = await make_site("site-a", pack_size=1 << 20)
    src = a.data / "ds"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    (src / "small").write_text("the same in both versions\n")
    v1 = a.cli_json("push", "/proj/ds")["version"]
    b = await make_site("site-b", batch_bytes=4 << 20)
    b.cli_json("stage", "/proj/ds")
    before = await _packs(a)
    (src / "big").write_bytes(os.urandom(3 << 20))
    a.cli_json("push", "/proj/ds")
    return a, b, v1, await _packs(a) - before


async def test_a_stage_that_failed_before_writing_a_large_file_leaves_push_alone(
    make_site: MakeSite,
) -> None:
    # v2 changes only a large file, whose packs are gone: B's stage makes the file's
    # partial file, then its first fetch fails. It removes the partial file again and gives
    # the directory its times back, so the tree still is v1 as the record says; counting
    # the partial file as a change had push ask for --force.
    a, b, v1, added = await _v1_staged_big_changed(make_site)
    await _delete(a, added)
    tree = _tree(b.data / "ds")
    mtime_ns = (b.data / "ds").stat().st_mtime_ns
    await _stage_fails_keeping_the_record(b)
    assert _tree(b.data / "ds") == tree  # the partial file made is gone again
    assert (b.data / "ds").stat().st_mtime_ns == mtime_ns  # as were the directory's times
    assert b.cli("verify", "/proj/ds", "--version", v1).returncode == 0
    _refused_only_as_behind(b)


async def test_a_partial_file_a_failing_open_made_is_removed_again(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening the partial file made it, then failed (an I/O error reading what was there):
    # the run removes it again, so it still changed nothing.
    _, b, _, _ = await _v1_staged_big_changed(make_site)
    real_open = TreeWriter.open_partial

    def failing(self: TreeWriter, entry: Entry) -> tuple[int, int]:
        fd, _ = real_open(self, entry)
        os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(TreeWriter, "open_partial", failing)
    tree = _tree(b.data / "ds")
    mtime_ns = (b.data / "ds").stat().st_mtime_ns
    site_b = await b.open()
    try:
        record = await site_b.catalog.replica("/proj/ds")
        with pytest.raises((OSError, DatamoverError)):
            await stage(site_b, "/proj/ds")
        assert await site_b.catalog.replica("/proj/ds") == record
    finally:
        await site_b.close()
    assert _tree(b.data / "ds") == tree
    assert (b.data / "ds").stat().st_mtime_ns == mtime_ns


def _record_tells_the_truth(record: Any, after: Any, tree: Path, mtime_ns: int) -> None:
    """After a stage that stopped: its record is given back only if the tree is as it was
    (no partial file left, the directory's mtime as before); otherwise it says failed."""
    left = [p.name for p in tree.iterdir() if p.name.endswith(".part")]
    if after == record:
        assert not left and tree.stat().st_mtime_ns == mtime_ns, left
    else:
        assert after is not None and after.state == "failed", after


def _open_in(tree: Path) -> list[str]:
    """What this process holds open under `tree`."""
    held = (os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())
    return [path for path in held if path.startswith(f"{tree}/")]


async def _cancel_a_stage_and_check_its_record(
    b: SiteEnv, stuck: Callable[[], Awaitable[None]], release: threading.Event
) -> tuple[Any, Any]:
    """Stage `/proj/ds` at B, cancel it once `stuck()` returns, then set `release` (what
    held the run up); check the record it leaves (`_record_tells_the_truth`) and that no
    file in the tree is left open. Return the record before and after."""
    tree = b.data / "ds"
    mtime_ns = tree.stat().st_mtime_ns
    site_b = await b.open()
    try:
        record = await site_b.catalog.replica("/proj/ds")
        run = asyncio.create_task(stage(site_b, "/proj/ds"))
        await stuck()
        run.cancel()
        await asyncio.sleep(0.1)
        release.set()
        with pytest.raises(BaseException):  # noqa: B017 (cancelled, or the stage's error)
            await run
        after = await site_b.catalog.replica("/proj/ds")
        await asyncio.sleep(0.2)  # let a thread still at work after the cancel end
        assert _open_in(tree) == []
    finally:
        release.set()
        await site_b.close()
    _record_tells_the_truth(record, after, tree, mtime_ns)
    return record, after


async def test_a_cancel_while_the_partial_file_is_closed_keeps_the_record_true(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fetch fails while the writer thread is busy, and a cancel arrives while the
    # partial file's close and removal wait behind it: the removal never runs. Giving the
    # record back then left it saying v1 while the tree held a partial file.
    _, b, _, _ = await _v1_staged_big_changed(make_site)
    stagers: list[Any] = []
    busy = threading.Event()
    failed = asyncio.Event()
    real_large = stage_module._Stager._large

    async def large(self: Any, entry: Any, *args: Any) -> None:
        stagers.append(self)
        await real_large(self, entry, *args)

    class Failing(stage_module.Fetcher):
        # A large file's ranges.
        async def stream(self, rng: Any, sink: Any, owner: Any = None) -> None:
            stagers[0]._pool.submit(busy.wait, 20)  # the writer thread busy with a batch
            failed.set()
            raise NotFound("pack gone")

    monkeypatch.setattr(stage_module._Stager, "_large", large)
    monkeypatch.setattr(stage_module, "Fetcher", Failing)

    async def stuck() -> None:
        await asyncio.wait_for(failed.wait(), 20)
        await asyncio.sleep(0.3)  # the partial file's close is queued behind the batch

    await _cancel_a_stage_and_check_its_record(b, stuck, busy)


async def test_a_cancel_while_the_partial_file_is_opened_keeps_the_record_true(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b, _, _ = await _v1_staged_big_changed(make_site)
    slow = threading.Event()
    opened = threading.Event()
    real_open = TreeWriter.open_partial

    def slow_open(self: TreeWriter, entry: Entry) -> tuple[int, int]:
        made = real_open(self, entry)
        opened.set()
        slow.wait(20)  # a slow file system: the cancel arrives meanwhile
        return made

    monkeypatch.setattr(TreeWriter, "open_partial", slow_open)

    async def stuck() -> None:
        assert await asyncio.to_thread(opened.wait, 20)

    record, after = await _cancel_a_stage_and_check_its_record(b, stuck, slow)
    assert after == record  # the file it made was closed and removed: the tree is as it was


async def test_a_stage_that_cannot_open_the_dataset_directory_leaves_push_alone(
    make_site: MakeSite,
) -> None:
    # The dataset's directory was swapped for a symlink to it (a user's `mv` and `ln -s`):
    # stage refuses to write through it before it touches anything. The record still said
    # the tree was v1, yet it was recorded as a failed stage, and push then wanted --force
    # once the directory was back.
    _, b, _ = await _v1_staged_v2_pushed(make_site)
    tree = _tree(b.data / "ds")
    (b.data / "ds").rename(b.data / "moved")
    (b.data / "ds").symlink_to(b.data / "moved")
    assert "refusing to write through it" in await _stage_fails_keeping_the_record(b)
    (b.data / "ds").unlink()
    (b.data / "moved").rename(b.data / "ds")
    assert _tree(b.data / "ds") == tree
    _refused_only_as_behind(b)


async def test_a_stage_cancelled_before_changing_the_tree_gives_its_record_back(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, b, _ = await _v1_staged_v2_pushed(make_site)
    fetching = asyncio.Event()

    class Stalled(stage_module.Fetcher):
        async def fetch(self, ranges: Any, owners: Any = None) -> list[bytes]:
            fetching.set()
            await asyncio.sleep(60)  # a store that stopped answering
            raise AssertionError("not cancelled")

    monkeypatch.setattr(stage_module, "Fetcher", Stalled)
    site_b = await b.open()
    try:
        record = await site_b.catalog.replica("/proj/ds")
        staging = asyncio.create_task(stage(site_b, "/proj/ds"))
        await asyncio.wait_for(fetching.wait(), 20)
        staging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await staging
        assert await site_b.catalog.replica("/proj/ds") == record
        # Refused only as a tree that holds v1 while v2 was published since.
        with pytest.raises(Conflict, match="the tree here holds version"):
            await push(site_b, "/proj/ds")
        assert not (await push(site_b, "/proj/ds", force=True)).unchanged
    finally:
        await site_b.close()


async def _packs(env: SiteEnv) -> set[str]:
    site = await env.open()
    try:
        return {info.key async for info in site.store.list("packs/")}
    finally:
        await site.close()


async def _delete(env: SiteEnv, keys: set[str]) -> None:
    site = await env.open()
    try:
        for key in keys:
            await site.store.delete(key)
    finally:
        await site.close()


async def _corrupt(env: SiteEnv, keys: set[str]) -> None:
    """Flip every bit of each object (its size stays)."""
    site = await env.open()
    try:
        for key in keys:
            await site.store.put(key, bytes(b ^ 0xFF for b in await site.store.get(key)))
    finally:
        await site.close()
