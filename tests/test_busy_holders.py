"""A daemon's transfer that finds the dataset held by a push or stage of another process is
tried again after a backoff, not failed: the holder ends, or, dead where its death cannot
be seen from here (another host, another PID namespace), its claim goes stale and is taken
over. Each test here once failed on the code before its fix: the run failed for good."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import update

from datamover.catalog.access import Access
from datamover.catalog.models import Replica
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission, now
from datamover.catalog.transfers import Transfers
from datamover.domain.transfers import State
from datamover.metrics import Metrics
from datamover.scheduler.worker import Worker
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree

#: A process this host cannot check: PID 1 of another PID namespace.
_ELSEWHERE = f"{socket.gethostname()}:1@effff123"


def _sub(path: str, **kw: Any) -> Submission:
    return Submission(tenant="t1", kind=kw.pop("kind", "stage"), path=path, **kw)


async def test_a_push_held_by_a_process_elsewhere_is_tried_again(make_site: MakeSite) -> None:
    env = await make_site("site-a")
    make_tree(env.data / "x", files=2)
    site = await env.open()
    queue = Transfers(site.catalog.engine, max_attempts=5)
    try:
        t, _ = await queue.submit(_sub("/proj/x", kind="push"))
        # What a daemon killed on another host left: its lapsed claim of the transfer
        # and its claim of the push (touched less than 15 minutes ago).
        assert await queue.claim("otherhost:4242/w0", 30) is not None
        await site.catalog.start_checkpoint("/proj/x", None, "otherhost:4242", False)
        async with site.catalog.engine.begin() as conn:
            await conn.execute(
                update(T).where(T.c.id == t.id).values(lease_expires=now() - timedelta(seconds=1))
            )
        assert await queue.requeue_expired() == 1
        worker = Worker(site, queue, Access(site.catalog.engine), "thishost:1/w0", Metrics("s"))
        assert await worker.run_once()
        row = await queue.get(t.id)
        assert row.state == State.QUEUED and row.error["code"] == "conflict", row
        assert "already running (otherhost:4242)" in row.error["message"]
    finally:
        await site.close()


async def test_a_stage_record_of_a_process_elsewhere_is_waited_for_then_taken_over(
    make_site: MakeSite,
) -> None:
    env = await make_site("site-a")
    make_tree(env.data / "x", files=2)
    site = await env.open()
    queue = Transfers(site.catalog.engine, max_attempts=5)
    worker = Worker(site, queue, Access(site.catalog.engine), "thishost:1/w0", Metrics("s"))
    try:
        p, _ = await queue.submit(_sub("/proj/x", kind="push"))
        assert await worker.run_once()
        version = (await queue.get(p.id)).result["version"]
        root = str(site.config.namespace.resolve("/proj/x"))
        await site.catalog.begin_replica("/proj/x", root, version, version, _ELSEWHERE)
        t, _ = await queue.submit(_sub("/proj/x"))
        assert await worker.run_once()
        row = await queue.get(t.id)
        # Touched just now: it may be running; tried again later, not failed.
        assert row.state == State.QUEUED and row.error["code"] == "conflict", row
        # Silent for 16 minutes: its stage died; the next run takes it over.
        async with site.catalog.engine.begin() as conn:
            await conn.execute(
                update(Replica)
                .where(Replica.c.dataset == "/proj/x")
                .values(updated_at=now() - timedelta(minutes=16))
            )
        async with site.catalog.engine.begin() as conn:
            await conn.execute(update(T).where(T.c.id == t.id).values(not_before=now()))
        assert await worker.run_once()
        row = await queue.get(t.id)
        assert row.state == State.SUCCEEDED, row
        assert (await site.catalog.replica("/proj/x")).state == "ready"
    finally:
        await site.close()


async def test_a_touched_record_is_not_silent(make_site: MakeSite) -> None:
    # What a running stage does every minute (`aio.every` with `touch_replica`), faster.
    import functools

    from datamover.aio import every
    from datamover.transfer import stage as stage_module

    env = await make_site("site-a")
    site = await env.open()
    try:
        await site.catalog.begin_replica("/proj/x", "/r", "v1", None, "me:1")
        async with site.catalog.engine.begin() as conn:
            await conn.execute(update(Replica).values(updated_at=now() - timedelta(minutes=30)))
        silent = await site.catalog.replica("/proj/x")
        assert silent is not None and stage_module._silent(silent)
        touch = functools.partial(site.catalog.touch_replica, "/proj/x", "me:1")
        async with every(0.05, touch, "touch"):
            await asyncio.sleep(0.3)
        record = await site.catalog.replica("/proj/x")
        assert record is not None and not stage_module._silent(record)
    finally:
        await site.close()


async def test_a_held_dataset_is_waited_for_past_max_attempts(make_site: MakeSite) -> None:
    # A holder that died elsewhere keeps its claim for 15 minutes: the runs of a busy
    # transfer are not cut at `max_attempts`, whose backoff ends within a minute.
    from datamover.scheduler.worker import BUSY_ATTEMPTS

    env = await make_site("site-a")
    make_tree(env.data / "x", files=2)
    site = await env.open()
    queue = Transfers(site.catalog.engine, max_attempts=2)
    worker = Worker(site, queue, Access(site.catalog.engine), "thishost:1/w0", Metrics("s"))
    try:
        t, _ = await queue.submit(_sub("/proj/x", kind="push"))
        await site.catalog.start_checkpoint("/proj/x", None, "otherhost:4242", False)
        for attempt in range(1, BUSY_ATTEMPTS + 1):
            assert await worker.run_once()
            row = await queue.get(t.id)
            assert row.attempts == attempt
            if attempt < BUSY_ATTEMPTS:
                assert row.state == State.QUEUED, row
                async with site.catalog.engine.begin() as conn:
                    await conn.execute(update(T).where(T.c.id == t.id).values(not_before=now()))
        assert row.state == State.FAILED and row.error["code"] == "conflict", row
    finally:
        await site.close()


async def test_a_stage_whose_record_was_taken_over_does_not_record_its_tree_ready(
    make_site: MakeSite, monkeypatch: Any
) -> None:
    """A stage silent for 15 minutes (a stalled host) is taken over by another; when the
    first comes back and ends, both may have written the tree: it records it failed, not
    ready at its version, and says so."""
    import pytest

    from datamover.errors import Conflict
    from datamover.transfer import ctimes
    from datamover.transfer import stage as stage_module
    from datamover.transfer.push import push

    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "x", files=3)
    site_a, site_b = await a.open(), await b.open()
    real = ctimes.after_writes

    async def taken_over_meanwhile(path: str, wrote: bool) -> Any:
        await site_b.catalog.begin_replica("/proj/x", path, version, None, _ELSEWHERE)
        return await real(path, wrote)

    try:
        version = (await push(site_a, "/proj/x")).version
        monkeypatch.setattr(stage_module.ctimes, "after_writes", taken_over_meanwhile)
        with pytest.raises(Conflict, match="took this stage's record over while it ran"):
            await stage_module.stage(site_b, "/proj/x")
        record = await site_b.catalog.replica("/proj/x")
        assert record is not None and (record.state, record.version) == ("failed", version)
        assert record.base_version is None  # not the version: the tree holds no known one
        monkeypatch.setattr(stage_module.ctimes, "after_writes", real)
        again = await stage_module.stage(site_b, "/proj/x")  # after the other's claim is stale
        assert again.version == version and again.fetched_files == 0
        record = await site_b.catalog.replica("/proj/x")
        assert record is not None and (record.state, record.base_version) == ("ready", version)
    finally:
        await site_a.close()
        await site_b.close()
