"""The transfer queue on both engines: ordering, path exclusion, guarded transitions,
leases, idempotency and cancel, driven step by step (no daemon, no sleeping)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from datamover.catalog.engine import open_engine
from datamover.catalog.queries import owner_id
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission, now
from datamover.catalog.transfers import Transfers
from datamover.client import transfer_error
from datamover.daemon import _reclaim_dead
from datamover.domain.transfers import ALLOWED, State, rank_time
from datamover.errors import Conflict, NotFound
from datamover.metrics import Metrics
from datamover.scheduler.worker import TransferProgress, Worker


@pytest.fixture
async def queue(catalog_url: str):
    engine = await open_engine(catalog_url)
    yield Transfers(engine, max_attempts=3)
    await engine.dispose()


def sub(path: str, **kw) -> Submission:
    return Submission(tenant="t1", kind=kw.pop("kind", "stage"), path=path, **kw)


async def test_priority_deadline_and_aging_order(queue: Transfers) -> None:
    await queue.submit(sub("/p/bulk", priority="bulk"))
    await queue.submit(sub("/p/inter", priority="interactive"))
    await queue.submit(sub("/p/job", priority="job"))
    await queue.submit(sub("/p/due", priority="bulk", deadline=now() + timedelta(minutes=1)))
    order = [(await queue.claim("w", 30)).path for _ in range(4)]
    # A deadline counts within its class: the bulk transfer due now overtakes the other
    # bulk one, not the interactive one (test_queue_review.py has the rule's other cases).
    assert order == ["/p/job", "/p/inter", "/p/due", "/p/bulk"]
    assert await queue.claim("w", 30) is None
    created = now()
    old_bulk = rank_time(created - timedelta(hours=3), "bulk", None)
    assert old_bulk < rank_time(created, "job", None)  # aging: nothing starves


async def test_one_run_per_path_and_guarded_transitions(queue: Transfers) -> None:
    first, _ = await queue.submit(sub("/p/x"))
    second, _ = await queue.submit(sub("/p/x"))
    claimed = await queue.claim("w1", 30)
    assert claimed is not None and claimed.id == first.id
    assert await queue.claim("w2", 30) is None  # same path is busy
    with pytest.raises(Conflict):
        await queue.transition(first.id, State.SUCCEEDED, owner="someone-else")
    done = await queue.transition(first.id, State.SUCCEEDED, owner="w1")
    assert done.state == "succeeded" and done.finished_at
    with pytest.raises(Conflict, match="cannot become succeeded"):
        await queue.transition(first.id, State.SUCCEEDED, owner="w1")
    assert (await queue.claim("w2", 30)).id == second.id
    assert ALLOWED[State.SUCCEEDED] == frozenset()


async def test_nested_paths_do_not_run_at_once(queue: Transfers) -> None:
    outer, _ = await queue.submit(sub("/p/a"))
    inner, _ = await queue.submit(sub("/p/a/b"))
    sibling, _ = await queue.submit(sub("/p/a_b"))  # `_` is no wildcard here
    other, _ = await queue.submit(sub("/p/ab"))
    percent, _ = await queue.submit(sub("/p/a%"))  # nor is `%`
    assert (await queue.claim("w1", 30)).id == outer.id
    # /p/a/b lies inside the running /p/a: the claims skip it
    assert (await queue.claim("w2", 30)).id == sibling.id
    assert (await queue.claim("w3", 30)).id == other.id
    assert (await queue.claim("w3", 30)).id == percent.id
    assert await queue.claim("w4", 30) is None
    await queue.transition(outer.id, State.SUCCEEDED, owner="w1")
    assert (await queue.claim("w4", 30)).id == inner.id
    again, _ = await queue.submit(sub("/p/a"))
    assert await queue.claim("w5", 30) is None  # and /p/a waits for /p/a/b
    await queue.transition(inner.id, State.SUCCEEDED, owner="w4")
    assert (await queue.claim("w5", 30)).id == again.id


async def test_a_waiting_parent_is_not_overtaken_by_later_children(queue: Transfers) -> None:
    child, _ = await queue.submit(sub("/p/a/x"))
    assert (await queue.claim("w1", 30)).id == child.id
    parent, _ = await queue.submit(sub("/p"))
    later, _ = await queue.submit(sub("/p/a/y"))
    other, _ = await queue.submit(sub("/q"))
    # /p waits for the running /p/a/x, and /p/a/y waits behind /p; /q is free
    assert (await queue.claim("w2", 30)).id == other.id
    assert await queue.claim("w2", 30) is None
    await queue.transition(child.id, State.SUCCEEDED, owner="w1")
    assert (await queue.claim("w2", 30)).id == parent.id
    assert await queue.claim("w3", 30) is None
    # a transfer in retry backoff keeps its place too
    backoff = now() + timedelta(minutes=5)
    await queue.transition(
        parent.id,
        State.QUEUED,
        owner="w2",
        lease_owner=None,
        lease_expires=None,
        not_before=backoff,
    )
    assert await queue.claim("w3", 30) is None
    await queue.transition(parent.id, State.CANCELLED)
    assert (await queue.claim("w3", 30)).id == later.id


async def test_a_free_transfer_is_found_behind_pages_of_waiting_ones(queue: Transfers) -> None:
    child, _ = await queue.submit(sub("/p/a/x"))
    await queue.claim("w1", 30)
    parent, _ = await queue.submit(sub("/p"))
    for i in range(150):  # more than two pages of the claim's scan, all behind /p
        await queue.submit(sub(f"/p/c{i:03d}"))
    free, _ = await queue.submit(sub("/q"))
    assert (await queue.claim("w2", 30)).id == free.id
    assert await queue.claim("w2", 30) is None
    await queue.transition(child.id, State.SUCCEEDED, owner="w1")
    assert (await queue.claim("w3", 30)).id == parent.id


async def test_a_cancel_asked_while_running_wins_over_a_requeue(queue: Transfers) -> None:
    lapsed, _ = await queue.submit(sub("/p/x"))
    await queue.claim("w1", 30)
    await queue.cancel(lapsed.id)
    assert await queue.requeue_expired(["w1"]) == 1  # its worker died
    row = await queue.get(lapsed.id)
    assert row.state == "cancelled" and row.finished_at and row.lease_owner is None
    released, _ = await queue.submit(sub("/p/y"))
    await queue.claim("w2", 30)
    await queue.cancel(released.id)
    # a draining worker, or a retryable failure, puts it back: cancelled instead
    again = await queue.transition(
        released.id, State.QUEUED, owner="w2", lease_owner=None, lease_expires=None
    )
    assert again.state == "cancelled" and again.finished_at
    fresh, _ = await queue.submit(sub("/p/x"))
    assert (await queue.claim("w3", 30)).id == fresh.id  # nothing left to block its path


@contextlib.asynccontextmanager
async def _catalog_locked(url: str, transfer_id: str) -> AsyncIterator[None]:
    """Hold what a heartbeat's UPDATE of `transfer_id` waits for, from another connection."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        con = sqlite3.connect(u.database or "", isolation_level=None, timeout=0)
        con.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            con.rollback()
            con.close()
        return
    import asyncpg

    conn = await asyncpg.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, database=u.database
    )
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM transfers WHERE id = $1 FOR UPDATE", transfer_id)
            yield
    finally:
        await conn.close()


async def test_a_run_whose_lease_cannot_be_renewed_is_stopped(
    queue: Transfers, catalog_url: str
) -> None:
    t, _ = await queue.submit(sub("/p/x"))
    row = await queue.claim("w1", 1.5)
    worker = Worker(None, queue, None, "w1", Metrics("s"), lease=1.5)  # type: ignore[arg-type]
    runner = asyncio.ensure_future(asyncio.sleep(60))  # stands in for the transfer
    started = time.monotonic()
    async with _catalog_locked(catalog_url, t.id):
        beat = asyncio.ensure_future(worker._heartbeat(row, TransferProgress(), runner))
        await asyncio.wait({runner}, timeout=10)
        stopped_after = time.monotonic() - started
        assert runner.cancelled() and worker._stop.reason == "lapsed"
        assert stopped_after < 1.5  # before the lease lapsed: no second run can overlap
        await beat
    # the heartbeat that waited goes through once the catalog answers again
    for _ in range(100):
        if (await queue.get(t.id)).updated_at != row.updated_at:
            break
        await asyncio.sleep(0.05)
    assert (await queue.get(t.id)).updated_at != row.updated_at


async def test_a_lease_counts_from_the_claim_not_from_its_late_answer(
    queue: Transfers, catalog_url: str
) -> None:
    """The lease runs from the claim's UPDATE; an answer that reached the worker late (a slow
    catalog) must not give the run more time than that, or it could outlive its lease."""
    t, _ = await queue.submit(sub("/p/x"))
    worker = Worker(None, queue, None, "w1", Metrics("s"), lease=1.5)  # type: ignore[arg-type]
    real_claim = queue.claim
    lock = _catalog_locked(catalog_url, t.id)
    times: dict[str, float] = {}

    async def slow_claim(owner: str, lease: float):
        times["claim"] = time.monotonic()
        row = await real_claim(owner, lease)
        await lock.__aenter__()  # from now on no heartbeat gets through
        await asyncio.sleep(0.8)  # and the claim's answer arrives this late
        return row

    async def stand_in(row, progress) -> None:  # the transfer, running until stopped
        try:
            await asyncio.sleep(60)
        finally:
            times["stopped"] = time.monotonic()

    queue.claim = slow_claim  # type: ignore[method-assign]
    worker._run = stand_in  # type: ignore[method-assign]
    try:
        assert await worker.run_once()
    finally:
        del queue.claim
        await lock.__aexit__(None, None, None)
    assert worker._stop.reason == "lapsed"
    assert times["stopped"] - times["claim"] < 1.5  # before the lease it was given lapsed


async def test_lapsed_lease_is_taken_over(queue: Transfers) -> None:
    t, _ = await queue.submit(sub("/p/x"))
    await queue.claim("dead", 0.01)
    ours, _ = await queue.heartbeat(t.id, "dead", 0.01)
    assert ours  # lapsed or not, still ours until someone notices
    await asyncio.sleep(0.05)
    assert await queue.requeue_expired() == 1
    again = await queue.claim("alive", 30)
    assert again is not None and again.id == t.id and again.attempts == 2
    ours, _ = await queue.heartbeat(t.id, "dead", 30)
    assert not ours  # the old worker learns it lost the lease
    assert await queue.requeue_expired(["alive"]) == 1  # a known-dead owner, at once


async def test_a_transfer_whose_every_run_is_cut_off_fails_after_max_attempts(
    queue: Transfers,
) -> None:
    """A run that kills its daemon (the OOM killer, a crash in a compiled library) was put
    back after every restart, forever; after `max_attempts` (3 here) runs it fails. One
    whose cancel was asked meanwhile is cancelled as before."""
    t, _ = await queue.submit(sub("/p/x"))
    c, _ = await queue.submit(sub("/q/x"))
    ended: list[tuple[str, str]] = []
    for attempt in (1, 2, 3):
        for want in (t.id, c.id):
            row = await queue.claim(f"host:{attempt}/w0", 30)
            assert row is not None and row.id == want and row.attempts == attempt
        if attempt == 3:
            await queue.cancel(c.id)
        dead = [f"host:{attempt}/w0"]
        assert await queue.requeue_expired(dead, lambda *o: ended.append(o)) == 2  # died
        states = [(await queue.get(i)).state for i in (t.id, c.id)]
        assert states == (["queued"] * 2 if attempt < 3 else ["failed", "cancelled"])
    # Each counted once, by kind and outcome, for the outcome metric.
    assert ended == [("stage", "failed"), ("stage", "cancelled")]
    failed = await queue.get(t.id)
    assert failed.error is not None and failed.error["code"] == "runs_exhausted"
    assert "run 3 times, the last run cut off" in failed.error["message"]
    # A hook waiting through the daemon exits 7 (permanent), not 130 (Ctrl-C).
    assert transfer_error({"id": t.id, **failed.to_json()}).exit_code == 7
    assert failed.finished_at is not None and failed.lease_owner is None
    assert await queue.claim("host:4/w0", 30) is None


async def test_leases_are_reckoned_on_the_catalogs_clock(
    queue: Transfers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts sharing a PostgreSQL catalog may disagree about the time: one whose clock runs
    a minute ahead must not take another's live lease for lapsed, nor run a retry early."""
    import datamover.catalog.transfers as transfers

    t, _ = await queue.submit(sub("/p/x"))
    assert await queue.claim("host-a:1/w0", 30) is not None
    ahead = now() + timedelta(seconds=60)
    monkeypatch.setattr(transfers, "now", lambda: ahead)  # this host's clock, from here on
    if queue.dialect != "postgresql":
        # One process per SQLite catalog (a lock file): its clock is the only clock.
        assert await queue.requeue_expired() == 1
        return
    assert await queue.requeue_expired() == 0
    assert (await queue.get(t.id)).state == State.RUNNING
    assert abs((await queue.clock() - ahead).total_seconds()) > 50  # the server's, not ours
    # A retry's backoff counts on that clock too: 30 s from the server's now, not ours.
    await queue.transition(t.id, State.QUEUED, owner="host-a:1/w0", retry_in=30)
    assert await queue.claim("host-b:1/w0", 30) is None
    await queue.transition(t.id, State.CANCELLED)


async def test_a_daemon_restarted_under_its_old_pid_takes_back_its_transfers(
    queue: Transfers,
) -> None:
    """A container's daemon is PID 1 again after a crash, on the same host name: at start-up
    no worker of this process holds anything yet, so a lease naming its own `host:pid` is
    its predecessor's, dead, not a live process's to wait out."""
    ours, _ = await queue.submit(sub("/p/x"))
    live, _ = await queue.submit(sub("/p/y"))
    assert (await queue.claim(f"{owner_id()}/w0", 3600)).id == ours.id
    parent = f"{socket.gethostname()}:{os.getppid()}/w0"  # another process, alive
    assert (await queue.claim(parent, 3600)).id == live.id
    await _reclaim_dead(queue, Metrics("s"))
    assert (await queue.get(ours.id)).state == "queued"
    assert (await queue.get(live.id)).state == "running"


async def test_idempotency_and_cancel(queue: Transfers) -> None:
    a, new = await queue.submit(sub("/p/x", idempotency_key="k1"))
    b, again = await queue.submit(sub("/p/x", idempotency_key="k1"))
    assert new and not again and a.id == b.id
    with pytest.raises(Conflict, match="different request"):
        await queue.submit(sub("/p/y", idempotency_key="k1"))
    due = now().replace(microsecond=123456) + timedelta(hours=2)
    timed, _ = await queue.submit(sub("/p/t", deadline=due, idempotency_key="k2"))
    assert (await queue.submit(sub("/p/t", deadline=due, idempotency_key="k2")))[0].id == timed.id
    for other in (due + timedelta(hours=1), None):  # a deadline is part of the request
        with pytest.raises(Conflict, match="different request"):
            await queue.submit(sub("/p/t", deadline=other, idempotency_key="k2"))
    with pytest.raises(Conflict, match="different request"):
        await queue.submit(sub("/p/x", deadline=due, idempotency_key="k1"))
    await queue.cancel(timed.id)
    other_tenant, new = await queue.submit(
        Submission(tenant="t2", kind="stage", path="/p/x", idempotency_key="k1")
    )
    assert new and other_tenant.id != a.id
    assert (await queue.cancel(a.id))[0].state == "cancelled"
    assert (await queue.cancel(other_tenant.id))[0].state == "cancelled"
    running, _ = await queue.submit(sub("/p/z"))
    await queue.claim("w", 30)
    flagged, ended = await queue.cancel(running.id)
    assert flagged.state == "running" and flagged.cancel_requested and not ended
    assert await queue.heartbeat(running.id, "w", 30) == (True, True)
    with pytest.raises(NotFound):
        await queue.get("tr-missing")


async def test_a_cancel_says_whether_it_ended_the_transfer(queue: Transfers) -> None:
    # Two cancels of one queued transfer at once both read it queued and both counted it
    # (28 cancellations counted for 10 transfers): only the one that ended it may.
    rows = [(await queue.submit(sub(f"/p/c{i}")))[0] for i in range(6)]
    results = await asyncio.gather(*(queue.cancel(r.id) for r in rows for _ in range(3)))
    assert all(row.state == "cancelled" for row, _ in results)
    assert sum(ended for _, ended in results) == len(rows)
    assert (await queue.cancel(rows[0].id))[1] is False  # already cancelled: harmless


async def test_a_cut_off_run_that_was_asked_to_cancel_is_counted(queue: Transfers) -> None:
    running, _ = await queue.submit(sub("/p/z"))
    await queue.claim("w", 30)
    await queue.cancel(running.id)
    ended: list[tuple[str, str]] = []
    assert await queue.requeue_expired(["w"], lambda *outcome: ended.append(outcome)) == 1
    assert (await queue.get(running.id)).state == "cancelled"
    assert ended == [("stage", "cancelled")]


async def test_listing_filters_and_pages(queue: Transfers) -> None:
    ids = [(await queue.submit(sub(f"/p/d{i}", kind="push")))[0].id for i in range(5)]
    await queue.submit(sub("/q/other"))
    page = await queue.list(prefixes=["/p"], limit=3)
    assert [r.id for r in page] == ids[:3]
    rest = await queue.list(prefixes=["/p"], after=page[-1].id, limit=3)
    assert [r.id for r in rest] == ids[3:]
    assert [r.path for r in await queue.list(path_prefix="/q")] == ["/q/other"]
    assert await queue.list(prefixes=[]) == []
    # Newest first, paged the same way: past the cursor in that order.
    page = await queue.list(prefixes=["/p"], limit=3, newest=True)
    assert [r.id for r in page] == ids[:1:-1]
    rest = await queue.list(prefixes=["/p"], after=page[-1].id, limit=3, newest=True)
    assert [r.id for r in rest] == ids[1::-1]
    depth = await queue.depth()
    assert depth[("queued", "interactive")] == 6


async def test_queue_depth_counts_the_queue_not_every_transfer_ever_made(
    queue: Transfers,
) -> None:
    """Refreshed every 5 s and read by each /readyz: finished transfers pile up for ever,
    and counting them all was a scan of the whole table each time."""
    for path in ("/p/a", "/p/b", "/p/c"):
        await queue.submit(sub(path))
    done = await queue.claim("w", 30)
    await queue.transition(done.id, State.SUCCEEDED, owner="w")
    await queue.claim("w", 30)
    assert await queue.depth() == {("queued", "interactive"): 1, ("running", "interactive"): 1}


async def test_a_cancel_is_not_lost_when_a_requeue_races_it(
    queue: Transfers, monkeypatch: pytest.MonkeyPatch
) -> None:
    t, _ = await queue.submit(sub("/p/x"))
    await queue.claim("w1", 30)
    real_get = queue.get
    requeued: list[str] = []

    async def get_then_requeue(transfer_id: str):
        row = await real_get(transfer_id)
        if not requeued:  # the worker drains right after the cancel looked at the row
            requeued.append(transfer_id)
            await queue.transition(
                transfer_id, State.QUEUED, owner="w1", lease_owner=None, lease_expires=None
            )
        return row

    monkeypatch.setattr(queue, "get", get_then_requeue)
    await queue.cancel(t.id)
    monkeypatch.setattr(queue, "get", real_get)
    assert requeued
    final = await queue.get(t.id)
    assert final.state == "cancelled", final
    assert await queue.claim("w2", 30) is None


async def test_a_transfer_claimed_while_draining_goes_back_unrun(queue: Transfers) -> None:
    t, _ = await queue.submit(sub("/p/x"))
    worker = Worker(None, queue, None, "w1", Metrics("s"))  # type: ignore[arg-type]
    real_claim = queue.claim

    async def claim_during_sigterm(owner: str, lease: float):
        row = await real_claim(owner, lease)
        worker.drain()  # SIGTERM arrives while the claim is in flight
        return row

    queue.claim = claim_during_sigterm  # type: ignore[method-assign]
    try:
        assert await worker.run_once() is False  # would run the stage (site None) otherwise
    finally:
        del queue.claim
    row = await queue.get(t.id)
    assert row.state == "queued" and row.attempts == 0 and row.lease_owner is None
    assert row.started_at is None
    again = await queue.claim("w2", 30)
    assert again is not None and again.id == t.id and again.attempts == 1


async def test_a_run_that_ends_after_its_lease_lapsed_is_a_warning_not_an_error(
    queue: Transfers, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process noticed the lapse and put the transfer back as the run finished: the
    worker cannot record success, and says so in one warning (it raised, and the loop
    logged a traceback and backed off)."""
    t, _ = await queue.submit(sub("/p/x"))
    metrics = Metrics("s")
    worker = Worker(None, queue, None, "w1", metrics)  # type: ignore[arg-type]

    async def stand_in(row: Any, progress: Any) -> dict[str, Any]:
        assert await queue.requeue_expired(["w1"]) == 1  # the lapse, noticed elsewhere
        return {"files": 1, "bytes": 1, "downloaded_bytes": 1}

    worker._run = stand_in  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="datamover.scheduler.worker"):
        assert await worker.run_once() is True
    assert "finished after its lease lapsed" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert (await queue.get(t.id)).state == "queued"  # the next run finds the work done
    outcome = {"kind": "stage", "state": "succeeded", "site": "s"}
    assert not metrics.registry.get_sample_value("datamover_transfers_finished_total", outcome)


async def test_a_transfer_a_requeue_cancels_counts_as_cancelled(queue: Transfers) -> None:
    """A cancel asked while the transfer was held wins over giving it back (drain, retry):
    it ends cancelled there, and the outcome counter must say so too."""
    t, _ = await queue.submit(sub("/p/x"))
    metrics = Metrics("s")
    worker = Worker(None, queue, None, "w1", metrics)  # type: ignore[arg-type]
    real_claim = queue.claim

    async def claim_then_cancel_and_sigterm(owner: str, lease: float):
        row = await real_claim(owner, lease)
        await queue.cancel(row.id)
        worker.drain()
        return row

    queue.claim = claim_then_cancel_and_sigterm  # type: ignore[method-assign]
    try:
        assert await worker.run_once() is False
    finally:
        del queue.claim
    assert (await queue.get(t.id)).state == "cancelled"
    outcome = {"kind": "stage", "state": "cancelled", "site": "s"}
    assert metrics.registry.get_sample_value("datamover_transfers_finished_total", outcome) == 1


async def test_a_catalog_outage_during_a_run_is_retried(make_site) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from datamover.catalog.access import Access
    from datamover.catalog.queries import Catalog
    from tests.treegen import make_tree

    env = await make_site("site-a")
    make_tree(env.data / "x", files=2)
    site = await env.open()
    queue = Transfers(site.catalog.engine, max_attempts=3)
    good = site.catalog
    # A real database failure: the catalog's file cannot be opened (as if its server left).
    gone = create_async_engine(f"sqlite+aiosqlite:///{env.state}/gone/catalog.db")
    site.catalog = Catalog(gone)
    try:
        t, _ = await queue.submit(sub("/proj/x", kind="push"))
        worker = Worker(site, queue, Access(good.engine), "w1", Metrics("s"))
        assert await worker.run_once()
        row = await queue.get(t.id)
        assert row.state == "queued" and row.attempts == 1, row
        assert row.error is not None and row.error["code"] == "catalog_unavailable"
        assert row.error["message"].startswith("catalog unavailable: ")

        # The catalog is back: the retry succeeds, and the transfer no longer shows the
        # error of the attempt before (`transfer list` printed "succeeded (catalog_...)").
        site.catalog = good
        async with good.engine.begin() as conn:  # its backoff is over
            await conn.execute(update(T).where(T.c.id == t.id).values(not_before=now()))
        assert await worker.run_once()
        row = await queue.get(t.id)
        assert row.state == "succeeded" and row.attempts == 2, row
        assert row.error is None, row.error
    finally:
        site.catalog = good
        await gone.dispose()
        await site.close()


async def test_a_catalog_without_a_free_connection_is_retried(make_site) -> None:
    """Every pooled connection busy (held long polls, a slow catalog) until the pool's time-out
    is a moment's overload, like a restart: retried, not failed as an internal error."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from datamover.catalog.access import Access
    from datamover.catalog.queries import Catalog
    from tests.treegen import make_tree

    env = await make_site("site-a")
    make_tree(env.data / "x", files=2)
    site = await env.open()
    queue = Transfers(site.catalog.engine, max_attempts=3)
    good = site.catalog
    busy = create_async_engine(good.engine.url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    held = await busy.connect()  # the one connection of its pool, taken
    site.catalog = Catalog(busy)
    try:
        t, _ = await queue.submit(sub("/proj/x", kind="push"))
        worker = Worker(site, queue, Access(good.engine), "w1", Metrics("s"))
        assert await worker.run_once()
        row = await queue.get(t.id)
    finally:
        site.catalog = good
        await held.close()
        await busy.dispose()
        await site.close()
    assert row.state == "queued" and row.attempts == 1, row
    assert row.error is not None and row.error["code"] == "catalog_unavailable", row.error


async def test_stages_a_finished_stage_has_done_are_answered_in_one_step(
    catalog_url: str,
) -> None:
    # A job array's stages of /p/x queue behind the one running. When it succeeds at v2,
    # those it has done succeed in one transaction, pins taken, in queue order up to the
    # first transfer over the tree that is not one (here a --delete stage), which runs.
    from datamover.catalog.access import Access

    engine = await open_engine(catalog_url)
    queue, access = Transfers(engine), Access(engine)
    try:
        lead, _ = await queue.submit(sub("/p/x"))
        assert (await queue.claim("w", 30)).id == lead.id
        plain, _ = await queue.submit(sub("/p/x", pin="job-1"))
        foreign, _ = await queue.submit(Submission(tenant="t2", kind="stage", path="/p/x"))
        named, _ = await queue.submit(sub("/p/x", version="v2"))
        older, _ = await queue.submit(sub("/p/x", version="v1"))  # not what the lead staged
        assert (await queue.claim("w2", 30)) is None
        done = await queue.transition(lead.id, State.SUCCEEDED, owner="w", result='{"a": 1}')
        late, _ = await queue.submit(sub("/p/x"))  # asked after the lead ended
        result = {"version": "v2", "files": 3, "bytes": 9}

        def pins(ids):
            return access.pins_for_transfers(ids, "/p/x", "v2")

        answered = await queue.answer_stages(done, "v2", True, result, pin=pins)
        assert [t.id for t in answered] == sorted([plain.id, foreign.id, named.id])
        for t in answered:
            # Another tenant's stage is not shown the lead's id (it answers 404 there).
            named_lead = {"satisfied_by": lead.id} if t.tenant == "t1" else {}
            assert t.state == "succeeded" and t.result == {**result, **named_lead}
            assert t.files_total == 3
            assert t.finished_at == answered[0].finished_at  # one transaction
        assert [(p.pin, p.version) for p in await access.pins(dataset="/p/x")] == [("job-1", "v2")]
        # `older` is next in queue order and not answered: it and `late` stay queued
        assert (await queue.get(older.id)).state == "queued"
        assert (await queue.get(late.id)).state == "queued"

        # Not the latest any more (a push since): only stages naming v2 are answered.
        assert (await queue.claim("w", 30)).id == older.id
        done = await queue.transition(older.id, State.SUCCEEDED, owner="w")
        latest, _ = await queue.submit(sub("/p/x"))
        assert await queue.answer_stages(done, "v1", False, result) == []
        assert (await queue.get(latest.id)).state == "queued"

        # A --delete stage ahead ends the batch; nothing is answered while one runs.
        assert (await queue.claim("w", 30)).id == late.id
        done = await queue.transition(late.id, State.SUCCEEDED, owner="w")
        deleting, _ = await queue.submit(sub("/p/x", options={"delete": True}))
        after, _ = await queue.submit(sub("/p/x"))
        answered = await queue.answer_stages(done, "v2", True, result)
        assert [t.id for t in answered] == [latest.id]
        assert (await queue.get(after.id)).state == "queued"
        assert (await queue.claim("w", 30)).id == deleting.id
        assert await queue.answer_stages(done, "v2", True, result) == []
        assert (await queue.get(after.id)).state == "queued"
    finally:
        await engine.dispose()


async def test_answering_stops_at_a_transfer_on_a_path_above(queue: Transfers) -> None:
    # A queued push of /p (above /p/x) comes before a later stage of /p/x in queue order:
    # the stage waits for it, as a claim would make it.
    lead, _ = await queue.submit(sub("/p/x"))
    await queue.claim("w", 30)
    await queue.submit(sub("/p", kind="push"))
    waiting, _ = await queue.submit(sub("/p/x"))
    done = await queue.transition(lead.id, State.SUCCEEDED, owner="w")
    assert await queue.answer_stages(done, "v2", True, {"version": "v2"}) == []
    assert (await queue.get(waiting.id)).state == "queued"


async def test_answering_goes_on_in_batches(queue: Transfers) -> None:
    lead, _ = await queue.submit(sub("/p/x"))
    await queue.claim("w", 30)
    waiting = [(await queue.submit(sub("/p/x")))[0].id for _ in range(5)]
    done = await queue.transition(lead.id, State.SUCCEEDED, owner="w")
    queue.answer_batch = 2
    got = [await queue.answer_stages(done, "v2", True, {"version": "v2"}) for _ in range(4)]
    assert [len(b) for b in got] == [2, 2, 1, 0]
    assert sorted(t.id for b in got for t in b) == sorted(waiting)


@pytest.mark.parametrize("new_catalog", ["postgresql"], indirect=True)  # SQLite: one writer
async def test_answering_does_not_wait_for_a_stage_a_claim_holds(catalog_url: str) -> None:
    # A claim on PostgreSQL locks the row it picked, then waits for the path's advisory lock,
    # which answering holds: answering must skip that row, not wait for it (a deadlock).
    engine = await open_engine(catalog_url)
    queue = Transfers(engine)
    try:
        lead, _ = await queue.submit(sub("/p/x"))
        await queue.claim("w", 30)
        held, _ = await queue.submit(sub("/p/x"))
        free, _ = await queue.submit(sub("/p/x"))
        done = await queue.transition(lead.id, State.SUCCEEDED, owner="w")
        async with engine.connect() as other:
            trans = await other.begin()
            locked = select(T.c.id).where(T.c.id == held.id).with_for_update()
            assert (await other.execute(locked)).scalar() == held.id
            answered = await asyncio.wait_for(
                queue.answer_stages(done, "v2", True, {"version": "v2"}), 10
            )
            await trans.rollback()
        assert [t.id for t in answered] == [free.id]
        assert (await queue.get(held.id)).state == "queued"
    finally:
        await engine.dispose()
