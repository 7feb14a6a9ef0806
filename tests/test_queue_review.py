"""The transfer queue, continued: what the claim's scan costs, a run failing after its lease
was taken over, stages cancelled while they are being answered, deadlines within a class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from datamover.catalog.access import Access
from datamover.catalog.engine import open_engine
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission, now
from datamover.catalog.transfers import Transfers
from datamover.domain.transfers import State, rank_time
from datamover.errors import Conflict, Corrupt, DatamoverError, StoreUnavailable
from datamover.metrics import Metrics
from datamover.scheduler.worker import Worker


@pytest.fixture
async def engine(catalog_url: str) -> AsyncIterator[AsyncEngine]:
    engine = await open_engine(catalog_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def queue(engine: AsyncEngine) -> Transfers:
    return Transfers(engine, max_attempts=3)


def sub(path: str, **kw: Any) -> Submission:
    return Submission(tenant="t1", kind=kw.pop("kind", "stage"), path=path, **kw)


def _record(engine: AsyncEngine) -> list[tuple[str, Any]]:
    """Every statement `engine` sends from now on, with its driver parameters."""
    sent: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
        sent.append((statement, params))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    return sent


async def _plan(engine: AsyncEngine, statement: str, params: Any) -> str:
    """The plan the engine chooses for `statement`, as text. PostgreSQL is told to use an
    index whenever it can (a test's table is too small for it to bother otherwise)."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            await conn.exec_driver_sql("SET LOCAL enable_bitmapscan = off")
            rows = await conn.exec_driver_sql("EXPLAIN " + statement, params)
            return "\n".join(r[0] for r in rows)
        rows = await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
        return "\n".join(r[-1] for r in rows)


async def test_a_claims_later_pages_seek_to_where_the_last_one_ended(
    engine: AsyncEngine, queue: Transfers
) -> None:
    """Each page of the claim's scan starts in the queue index where the page before ended,
    not at the queue's start: the keyset condition alone (an OR) gave the index nothing to
    seek to, so a claim behind N blocked transfers read N^2/128 rows."""
    await queue.submit(sub("/p/x"))
    assert await queue.claim("w1", 30) is not None
    for _ in range(130):  # three pages, all waiting for the running /p/x
        await queue.submit(sub("/p/x"))
    sent = _record(engine)
    assert await queue.claim("w2", 30) is None
    pages = [(s, p) for s, p in sent if "ORDER BY transfers.rank_time" in s]
    assert len(pages) == 3
    for statement, params in pages[1:]:
        plan = await _plan(engine, statement, params)
        if engine.dialect.name == "postgresql":
            scan = [line for line in plan.splitlines() if "Index Cond" in line]
            assert "'queued'::text) AND (rank_time >=" in scan[0], plan
        else:
            assert "USING INDEX ix_transfers_queue (state=? AND rank_time>?)" in plan, plan


@pytest.mark.parametrize("error", [Corrupt("bad pack"), StoreUnavailable("no store")])
async def test_a_run_that_fails_after_its_lease_was_taken_over_is_a_warning(
    queue: Transfers, caplog: pytest.LogCaptureFixture, error: DatamoverError
) -> None:
    """The run failed, but by then another worker held the transfer: this worker can neither
    fail it nor put it back for a retry. One warning, no failure logged or counted, nothing
    raised out of `run_once` (the loop logged a traceback and waited 5 s), and the other
    worker's run goes on untouched."""
    t, _ = await queue.submit(sub("/p/x"))
    metrics = Metrics("s")
    worker = Worker(None, queue, None, "w1", metrics)  # type: ignore[arg-type]

    async def taken_over(row: Any, progress: Any) -> dict[str, Any]:
        assert await queue.requeue_expired(["w1"]) == 1  # the lapse, noticed elsewhere
        assert (await queue.claim("w2", 30)).id == t.id
        raise error

    worker._run = taken_over  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="datamover.scheduler.worker"):
        assert await worker.run_once() is True
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "after its lease lapsed" in warned[0].getMessage(), caplog.text
    assert error.message in warned[0].getMessage()
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    row = await queue.get(t.id)
    assert row.state == "running" and row.lease_owner == "w2" and row.error is None
    samples = [s for m in metrics.registry.collect() for s in m.samples]
    counted = {s.name for s in samples if s.value and s.name.endswith("_total")}
    assert not counted & {
        "datamover_errors_total",
        "datamover_retries_total",
        "datamover_transfers_finished_total",
    }, counted


async def test_a_failed_attempt_of_a_transfer_asked_to_cancel_is_not_a_retry(
    queue: Transfers,
) -> None:
    """A cancel asked while the run was failing wins over the retry: the transfer ends
    cancelled and is counted so, and no retry is counted for it."""
    t, _ = await queue.submit(sub("/p/x"))
    metrics = Metrics("s")
    worker = Worker(None, queue, None, "w1", metrics)  # type: ignore[arg-type]

    async def cancelled_then_failed(row: Any, progress: Any) -> dict[str, Any]:
        await queue.cancel(t.id)  # before the heartbeat passes the cancel on
        raise StoreUnavailable("no store")

    worker._run = cancelled_then_failed  # type: ignore[method-assign]
    assert await worker.run_once() is True
    assert (await queue.get(t.id)).state == "cancelled"
    value = metrics.registry.get_sample_value
    ended = {"kind": "stage", "state": "cancelled", "site": "s"}
    assert value("datamover_transfers_finished_total", ended) == 1
    assert not value("datamover_retries_total", {"kind": "stage", "site": "s"})


async def test_a_stage_cancelled_while_stages_are_answered_stays_cancelled(
    engine: AsyncEngine, queue: Transfers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands between answering's read of the queue and its update (on SQLite
    that read runs before the write transaction begins) wins: the stage stays cancelled, is
    not pinned and is not among those answered; the stages around it are answered."""
    access = Access(engine)
    lead, _ = await queue.submit(sub("/p/x"))
    assert (await queue.claim("w", 30)).id == lead.id
    before, _ = await queue.submit(sub("/p/x", pin="job-1"))
    victim, _ = await queue.submit(sub("/p/x", pin="job-2"))
    after, _ = await queue.submit(sub("/p/x", pin="job-3"))
    done = await queue.transition(lead.id, State.SUCCEEDED, owner="w")
    real = AsyncConnection.execute
    cancels: list[tuple[Any, bool]] = []

    async def execute(self: AsyncConnection, statement: Any, *args: Any, **kw: Any) -> Any:
        result = await real(self, statement, *args, **kw)
        reads_queue = "ORDER BY transfers.rank_time" in str(statement)
        if reads_queue and not cancels:  # the user's cancel, right after the read
            cancels.append(await queue.cancel(victim.id))
        return result

    def pins(ids: Any) -> Any:
        return access.pins_for_transfers(ids, "/p/x", "v2")

    monkeypatch.setattr(AsyncConnection, "execute", execute)
    answered = await queue.answer_stages(done, "v2", True, {"version": "v2"}, pin=pins)
    monkeypatch.undo()
    assert cancels and cancels[0][1] is True  # the cancel ended it
    assert sorted(t.id for t in answered) == sorted([before.id, after.id])
    assert all(t.state == "succeeded" for t in answered)
    assert (await queue.get(victim.id)).state == "cancelled"
    held = sorted(p.pin for p in await access.pins(dataset="/p/x"))
    assert held == ["job-1", "job-3"]


async def test_deadlines_order_transfers_within_their_class(queue: Transfers) -> None:
    """Job transfers submitted in turn, due in 8 h, in 5 minutes and never, run the one due
    soonest first: the class's shift applies to the deadline too, so a deadline counts
    within its class (it did not at all for a job transfer, due in more than 50 minutes
    before it was met). An interactive transfer due in 2 minutes still waits for the job
    transfers submitted with it: classes keep their precedence."""
    late, _ = await queue.submit(
        sub("/p/late", priority="job", deadline=now() + timedelta(hours=8))
    )
    soon, _ = await queue.submit(
        sub("/p/soon", priority="job", deadline=now() + timedelta(minutes=5))
    )
    never, _ = await queue.submit(sub("/p/never", priority="job"))
    person, _ = await queue.submit(
        sub("/p/person", priority="interactive", deadline=now() + timedelta(minutes=2))
    )
    order = [(await queue.claim("w", 30)).id for _ in range(4)]
    assert order == [soon.id, late.id, never.id, person.id]
    assert await queue.claim("w", 30) is None


async def test_a_deadline_long_past_does_not_overtake_other_classes(queue: Transfers) -> None:
    """A deadline moves a transfer ahead by at most its lead (10 minutes before it is due),
    and one already past when submitted counts as due then. Unbounded, a bulk transfer due
    in 1970 ranked before every job transfer, however fresh: a client could jump the queue
    of every class by naming an old deadline."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    jobs = [(await queue.submit(sub(f"/p/job{i}", priority="job")))[0] for i in range(2)]
    person, _ = await queue.submit(sub("/p/person", priority="interactive", deadline=epoch))
    old, _ = await queue.submit(sub("/p/old", priority="bulk", deadline=epoch))
    plain, _ = await queue.submit(sub("/p/plain", priority="bulk"))
    order = [(await queue.claim("w", 30)).id for _ in range(5)]
    # Within its class the one due still comes first; the classes keep their precedence.
    assert order == [jobs[0].id, jobs[1].id, person.id, old.id, plain.id]
    at = now()
    for priority in ("job", "interactive", "bulk"):
        due_now = rank_time(at, priority, at)
        shift = rank_time(at, priority, None) - at
        assert rank_time(at, priority, epoch) == due_now == at - timedelta(minutes=10) + shift
        assert rank_time(at, priority, at + timedelta(minutes=5)) > due_now  # still ordered


async def test_a_retry_after_its_pin_was_released_is_the_same_request(
    engine: AsyncEngine, queue: Transfers
) -> None:
    """A release takes its pin off queued and running transfers. A client resending its
    submission with the same idempotency key afterwards (the client does on a reset
    connection) was told the key was used for a different request: the request was
    compared with the row's pin, no longer the one submitted."""
    access = Access(engine)
    running, _ = await queue.submit(sub("/p/r", pin="slurm-7", idempotency_key="k1"))
    queued, _ = await queue.submit(sub("/p/q", pin="slurm-7", idempotency_key="k2"))
    assert (await queue.claim("w", 30)).id == running.id
    await access.release("slurm-7", "t1")
    for row, key in ((running, "k1"), (queued, "k2")):
        again, created = await queue.submit(sub(row.path, pin="slurm-7", idempotency_key=key))
        assert not created and again.id == row.id
        assert again.pin is None and again.options == {}  # released; no option was asked
        for other in (None, "slurm-8"):
            with pytest.raises(Conflict, match="different request"):
                await queue.submit(sub(row.path, pin=other, idempotency_key=key))


def _flaky(queue: Transfers, target: State, blip: str, times: int = 1) -> None:
    """Make `queue.transition` to `target` fail `times` times as a catalog outage does:
    "locked" before writing (SQLite's "database is locked"), "lost" after its write was
    committed (the connection reset as the answer came, as asyncpg raises it)."""
    real = queue.transition
    left = [times]

    async def transition(transfer_id: str, state: State, **kw: Any) -> Any:
        if state == target and left[0]:
            left[0] -= 1
            if blip == "locked":
                raise OperationalError("UPDATE transfers", {}, Exception("database is locked"))
            await real(transfer_id, state, **kw)
            raise ConnectionResetError(104, "Connection reset by peer")
        return await real(transfer_id, state, **kw)

    queue.transition = transition  # type: ignore[method-assign]


@pytest.mark.parametrize("blip", ["locked", "lost"])
@pytest.mark.parametrize("end", ["succeeded", "retry", "failed", "drain"])
async def test_a_runs_end_is_recorded_through_a_short_catalog_outage(
    engine: AsyncEngine,
    queue: Transfers,
    caplog: pytest.LogCaptureFixture,
    end: str,
    blip: str,
) -> None:
    """Recording how a run ended is tried again while the catalog is unavailable for a
    moment. Only `Conflict` was caught: the outage escaped `run_once`, the transfer stayed
    running with no worker, and when its lease lapsed it was taken for a run cut off: on
    its last attempt, a transfer that had succeeded failed as `runs_exhausted`. A write
    committed whose answer was lost is found recorded, not taken for a lapsed lease."""
    t, _ = await queue.submit(sub("/p/x", kind="push"))
    last = end != "retry"
    if last:  # two runs were cut off already: this one is the last
        async with engine.begin() as conn:
            await conn.execute(update(T).where(T.c.id == t.id).values(attempts=2))
    metrics = Metrics("s")
    worker = Worker(None, queue, Access(engine), "w1", metrics, lease=1.0)  # type: ignore[arg-type]
    target = {"succeeded": State.SUCCEEDED, "failed": State.FAILED}.get(end, State.QUEUED)
    _flaky(queue, target, blip)

    async def run(row: Any, progress: Any) -> dict[str, Any]:
        if end == "succeeded":
            return {"version": "v1"}
        if end == "drain":
            worker.drain()
            await asyncio.sleep(60)
        raise StoreUnavailable("no store") if end == "retry" else Corrupt("bad pack")

    worker._run = run  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="datamover.scheduler.worker"):
        assert await worker.run_once() is True
    row = await queue.get(t.id)
    expected = {
        "succeeded": ("succeeded", 3, None),
        "retry": ("queued", 1, "store_unavailable"),
        "failed": ("failed", 3, "corrupt"),
        "drain": ("queued", 2, None),  # a drain's run is not counted
    }[end]
    assert (row.state, row.attempts, (row.error or {}).get("code")) == expected, row
    assert row.lease_owner is None
    retried = [r for r in caplog.records if "recording it failed" in r.getMessage()]
    assert len(retried) == 1 and retried[0].levelname == "WARNING", caplog.text
    said = caplog.text
    assert "lease lapsed" not in said and "could not be recorded" not in said, said
    assert not [r for r in caplog.records if r.exc_info], said
    value = metrics.registry.get_sample_value
    outcome = {"succeeded": "succeeded", "failed": "failed"}.get(end)
    if outcome:
        labels = {"kind": "push", "state": outcome, "site": "s"}
        assert value("datamover_transfers_finished_total", labels) == 1
    if end == "retry":
        assert value("datamover_retries_total", {"kind": "push", "site": "s"}) == 1
    await asyncio.sleep(1.1)  # the lease would have lapsed by now: nothing lapses
    assert await queue.requeue_expired() == 0
    assert (await queue.get(t.id)).state == row.state


async def test_an_outage_longer_than_the_lease_is_one_error_line(
    engine: AsyncEngine, queue: Transfers, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalog unavailable for longer than the lease leaves before: the end is not
    recorded, and the transfer goes back in the queue when its lease lapses, as a run cut
    off (here its last: it fails `runs_exhausted`). The worker says so in one error line,
    without a traceback, and `run_once` raises nothing: before, the outage escaped it and
    the daemon's loop logged it as an unexpected error."""
    t, _ = await queue.submit(sub("/p/x", kind="push"))
    async with engine.begin() as conn:
        await conn.execute(update(T).where(T.c.id == t.id).values(attempts=2))
    metrics = Metrics("s")
    worker = Worker(None, queue, Access(engine), "w1", metrics, lease=1.0)  # type: ignore[arg-type]
    _flaky(queue, State.SUCCEEDED, "locked", times=1000)

    async def run(row: Any, progress: Any) -> dict[str, Any]:
        return {"version": "v1"}

    worker._run = run  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="datamover.scheduler.worker"):
        assert await worker.run_once() is True
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.exc_info is None
    assert error.getMessage() == (
        "push /p/x succeeded, but that could not be recorded (catalog unavailable: database "
        "is locked); it goes back in the queue when its lease lapses, as a run cut off"
    )
    assert (await queue.get(t.id)).state == "running"
    assert not metrics.registry.get_sample_value(
        "datamover_transfers_finished_total", {"kind": "push", "state": "succeeded", "site": "s"}
    )
    await asyncio.sleep(1.1)
    assert await queue.requeue_expired() == 1
    row = await queue.get(t.id)
    assert row.state == "failed" and (row.error or {}).get("code") == "runs_exhausted", row


async def test_a_burst_behind_a_running_transfer_is_not_read_again_for_each_claim(
    engine: AsyncEngine, queue: Transfers
) -> None:
    """N stages of one dataset queued behind its running stage, each woken claim finding
    nothing free: each claim read every queued row again (N^2/2 rows; 2,000 stages with 2
    workers on PostgreSQL took 29 s to submit against 11 s with none). A claim that found
    nothing free holds until this process changes the queue so that something may be free:
    a transfer queued on a free tree or one ending is claimed at once."""
    queue.recheck = 60.0  # no time-out here: only changes end it
    running, _ = await queue.submit(sub("/p/x"))
    assert (await queue.claim("w1", 30)).id == running.id
    sent = _record(engine)
    waiting = []
    for _ in range(200):
        waiting.append((await queue.submit(sub("/p/x")))[0])
        assert await queue.claim("w2", 30) is None  # the worker its submission woke
    pages = [s for s, _ in sent if "ORDER BY transfers.rank_time" in s]
    assert len(pages) == 1, len(pages)  # the first claim's; the rest knew /p/x is busy
    free, _ = await queue.submit(sub("/q/y"))
    assert (await queue.claim("w2", 30)).id == free.id
    assert await queue.claim("w2", 30) is None
    await queue.transition(running.id, State.SUCCEEDED, owner="w1")
    assert (await queue.claim("w2", 30)).id == waiting[0].id


async def test_a_claim_that_found_nothing_free_sees_retries_due_cancels_and_lapses(
    queue: Transfers,
) -> None:
    """What frees a transfer other than an end or a submission ends a claim's "nothing
    free" at once too: a retry's time coming, a cancel of a transfer queued ahead on its
    tree, a lapsed lease put back in the queue."""
    queue.recheck = 60.0
    retried, _ = await queue.submit(sub("/p/a"))
    assert await queue.claim("w1", 30)
    await queue.transition(
        retried.id, State.QUEUED, owner="w1", lease_owner=None, lease_expires=None, retry_in=0.4
    )
    assert await queue.claim("w1", 30) is None
    await asyncio.sleep(0.6)
    assert (await queue.claim("w1", 30)).id == retried.id

    running, _ = await queue.submit(sub("/q/r"))
    assert (await queue.claim("w2", 30)).id == running.id
    above, _ = await queue.submit(sub("/q"))  # waits for /q/r
    sibling, _ = await queue.submit(sub("/q/s"))  # waits for /q, queued ahead of it
    assert await queue.claim("w3", 30) is None
    await queue.cancel(above.id)
    assert (await queue.claim("w3", 30)).id == sibling.id

    lapsing, _ = await queue.submit(sub("/r/x"))
    assert (await queue.claim("w4", 0.2)).id == lapsing.id
    assert await queue.claim("w5", 30) is None
    await asyncio.sleep(0.4)
    assert await queue.requeue_expired() == 1
    assert (await queue.claim("w5", 30)).id == lapsing.id


async def test_a_connection_reset_in_a_run_is_retried_not_an_internal_error(
    queue: Transfers,
) -> None:
    """A PostgreSQL restart reaches a running transfer's catalog calls as asyncpg's bare
    `ConnectionResetError` (then `ConnectionRefusedError`): the transfer failed at once as
    an internal error; it goes back in the queue for another try, as for a store outage."""
    t, _ = await queue.submit(sub("/p/x"))
    worker = Worker(None, queue, None, "w1", Metrics("s"))  # type: ignore[arg-type]

    async def reset(row: Any, progress: Any) -> dict[str, Any]:
        raise ConnectionResetError(104, "Connection reset by peer")

    worker._run = reset  # type: ignore[method-assign]
    assert await worker.run_once() is True
    row = await queue.get(t.id)
    assert row.state == "queued" and row.error is not None, row
    assert row.error["code"] == "unavailable"
    assert "connection lost while it ran" in row.error["message"]


async def test_an_api_cancel_after_a_requeue_whose_answer_was_lost_is_counted_once(
    engine: AsyncEngine, queue: Transfers
) -> None:
    """The worker's requeue committed but its answer was lost; the API cancelled the queued
    transfer (and counted it) before the worker's second try, which took the cancelled row
    for its own record and counted the cancel again."""
    t, _ = await queue.submit(sub("/p/x", kind="push"))
    metrics = Metrics("s")  # one registry for the API and the workers, as in a daemon
    worker = Worker(None, queue, Access(engine), "w1", metrics, lease=30.0)  # type: ignore[arg-type]
    real = queue.transition
    lost = []

    async def transition(transfer_id: str, target: State, **kw: Any) -> Any:
        if target == State.QUEUED and not lost:
            lost.append(1)
            await real(transfer_id, target, **kw)  # committed...
            _, ended = await queue.cancel(transfer_id)  # DELETE /v1/transfers/{id}
            assert ended
            metrics.finished("push", "cancelled", 0, {})  # as the route counts it
            raise ConnectionResetError(104, "Connection reset by peer")  # ...answer lost
        return await real(transfer_id, target, **kw)

    async def run(row: Any, progress: Any) -> dict[str, Any]:
        raise StoreUnavailable("no store")

    queue.transition = transition  # type: ignore[method-assign]
    worker._run = run  # type: ignore[method-assign]
    await worker.run_once()
    assert (await queue.get(t.id)).state == "cancelled"
    ended = {"kind": "push", "state": "cancelled", "site": "s"}
    assert metrics.registry.get_sample_value("datamover_transfers_finished_total", ended) == 1


async def test_a_pin_is_not_added_again_for_a_transfer_no_longer_running(
    engine: AsyncEngine, queue: Transfers
) -> None:
    """A worker recording a stage's success again (its first try's answer lost) after the
    job's epilog released the pin put the released pin back, for good."""
    access = Access(engine)
    t, _ = await queue.submit(sub("/p/x", pin="job-42"))
    assert (await queue.claim("w1", 30)).id == t.id
    assert await access.pin_for_transfer(t.id, "/p/x", "v1")  # while it runs
    await queue.transition(t.id, State.SUCCEEDED, owner="w1")
    assert await access.release("job-42", "t1") == 1
    assert not await access.pin_for_transfer(t.id, "/p/x", "v1")  # the retry
    assert await access.pins(pin="job-42") == []
