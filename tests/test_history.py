"""The transfers' history on both engines: ended transfers are deleted once older than
`[api] history_days`, a batch at a time, by the daemon as it runs; nothing queued or running
ever is."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, inspect, update
from sqlalchemy.engine import Connection

from datamover.catalog.engine import HEAD, _alembic_config, create_engine_for, open_engine, upgrade
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission
from datamover.catalog.transfers import Transfers
from datamover.domain.transfers import State
from datamover.errors import NotFound
from datamover.metrics import Metrics
from datamover.scheduler.history import History
from datamover.scheduler.runner import run_loop
from tests.fixtures_daemon import free_port, start_daemon, with_token
from tests.fixtures_sites import MakeSite

MONTH = timedelta(days=30)


@pytest.fixture
async def queue(catalog_url: str):
    engine = await open_engine(catalog_url)
    yield Transfers(engine)
    await engine.dispose()


def sub(path: str, **kw: Any) -> Submission:
    return Submission(tenant="t1", kind="stage", path=path, **kw)


async def days_ago(queue: Transfers, days: float) -> datetime:
    return await queue.clock() - timedelta(days=days)


async def set_row(queue: Transfers, transfer_id: str, **values: Any) -> None:
    async with queue.engine.begin() as conn:
        await conn.execute(update(T).where(T.c.id == transfer_id).values(**values))


async def ended(queue: Transfers, path: str, state: State, days: float, **kw: Any) -> str:
    """A transfer of `path` that ended in `state` `days` ago."""
    row, _ = await queue.submit(sub(path, **kw))
    if state == State.CANCELLED:
        await queue.cancel(row.id)
    else:
        claimed = await queue.claim("w", 30)
        assert claimed is not None and claimed.id == row.id
        await queue.transition(row.id, state, owner="w")
    await set_row(queue, row.id, finished_at=await days_ago(queue, days))
    return row.id


async def test_only_transfers_that_ended_before_the_retention_are_deleted(
    queue: Transfers,
) -> None:
    running, _ = await queue.submit(sub("/p/running"))
    assert (await queue.claim("w", 30)).id == running.id
    old = [
        await ended(queue, f"/p/{state}", state, days=31)
        for state in (State.SUCCEEDED, State.FAILED, State.CANCELLED)
    ]
    recent = await ended(queue, "/p/recent", State.SUCCEEDED, days=29)
    queued, _ = await queue.submit(sub("/p/queued"))
    # Queued and running for a year, with an end time in their rows too: no such row is
    # made, but a transfer that has not ended is kept whatever its times say.
    year = await days_ago(queue, 365)
    for row in (running, queued):
        await set_row(queue, row.id, created_at=year, updated_at=year, finished_at=year)

    assert await queue.prune(MONTH) == 3
    for transfer_id in old:
        with pytest.raises(NotFound):
            await queue.get(transfer_id)
    assert (await queue.get(recent)).state == "succeeded"
    assert (await queue.get(running.id)).state == "running"
    assert (await queue.get(queued.id)).state == "queued"
    assert await queue.prune(MONTH) == 0


async def test_a_prune_deletes_a_batch_at_a_time_oldest_first(queue: Transfers) -> None:
    ids = [await ended(queue, f"/p/d{i}", State.SUCCEEDED, days=60 - i) for i in range(25)]
    assert await queue.prune(MONTH, limit=10) == 10
    assert [r.id for r in await queue.list(limit=100)] == ids[10:]
    assert [await queue.prune(MONTH, limit=10) for _ in range(3)] == [10, 5, 0]
    assert await queue.list(limit=100) == []


def _row(i: int, at: datetime) -> dict[str, Any]:
    return {
        "id": f"tr-old-{i:05d}",
        "tenant": "t1",
        "kind": "stage",
        "path": f"/p/d{i}",
        "priority": "job",
        "options": "{}",
        "state": "succeeded",
        "rank_time": at,
        "not_before": at,
        "attempts": 1,
        "max_attempts": 5,
        "cancel_requested": False,
        "created_at": at,
        "updated_at": at,
        "finished_at": at,
        "files_done": 0,
        "bytes_done": 0,
        "bytes_moved": 0,
        "rate": 0.0,
    }


async def test_the_default_batch_deletes_a_thousand_rows(queue: Transfers) -> None:
    at = await days_ago(queue, 31)
    async with queue.engine.begin() as conn:
        await conn.execute(T.insert(), [_row(i, at) for i in range(2100)])
    assert [await queue.prune(MONTH) for _ in range(4)] == [1000, 1000, 100, 0]


async def test_a_batch_reads_the_end_time_index_on_sqlite(tmp_path: Path) -> None:
    # SQLite has no statistics: given `state IN (...)` it took the queue index and read and
    # sorted every ended transfer for each batch (0.5 s a batch with 500,000 of them).
    queue = Transfers(await open_engine(f"sqlite:///{tmp_path / 'catalog.db'}"))
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            statements.append((statement, parameters))

    event.listen(queue.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await queue.prune(MONTH)
        [(statement, parameters)] = statements
        async with queue.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            cursor = await raw.driver_connection.execute(
                "EXPLAIN QUERY PLAN " + statement, parameters
            )
            plan = " | ".join(row[3] for row in await cursor.fetchall())
    finally:
        await queue.engine.dispose()
    assert "ix_transfers_finished" in plan and "ix_transfers_queue" not in plan, plan


async def test_a_stage_answered_by_a_pruned_one_keeps_its_record(queue: Transfers) -> None:
    # `satisfied_by` names the stage that did the work; that one ended first, so it is
    # deleted first. The later stage's record stays whole; the id it names is then unknown.
    lead = await ended(queue, "/p/x", State.SUCCEEDED, days=31)
    follower, _ = await queue.submit(sub("/p/x"))
    assert (await queue.claim("w", 30)).id == follower.id
    result = json.dumps({"version": "v1", "satisfied_by": lead})
    await queue.transition(follower.id, State.SUCCEEDED, owner="w", result=result)
    await set_row(queue, follower.id, finished_at=await days_ago(queue, 29))
    assert await queue.prune(MONTH) == 1
    assert (await queue.get(follower.id)).result == {"version": "v1", "satisfied_by": lead}
    with pytest.raises(NotFound):
        await queue.get(lead)


async def test_a_stage_queued_longer_than_the_retention_is_no_longer_answered(
    queue: Transfers,
) -> None:
    # A stage asked for while another ran is answered by it (`scheduler.satisfied`). If it
    # waited so long that the other one was deleted meanwhile, it stays queued and runs
    # itself: slower, never wrong.
    lead, _ = await queue.submit(sub("/p/x"))
    assert (await queue.claim("w", 30)).id == lead.id
    waiting, _ = await queue.submit(sub("/p/x"))
    await queue.transition(lead.id, State.SUCCEEDED, owner="w")
    await set_row(queue, waiting.id, created_at=await days_ago(queue, 40))
    await set_row(queue, lead.id, finished_at=await days_ago(queue, 35))
    answer = await queue.stage_ended_since_asked(await queue.get(waiting.id))
    assert answer is not None and answer.id == lead.id
    assert await queue.prune(MONTH) == 1
    assert (await queue.get(waiting.id)).state == "queued"
    assert await queue.stage_ended_since_asked(await queue.get(waiting.id)) is None


async def test_the_idempotency_key_of_a_pruned_transfer_makes_a_new_one(
    queue: Transfers,
) -> None:
    first = await ended(queue, "/p/x", State.SUCCEEDED, days=31, idempotency_key="job-7")
    again, created = await queue.submit(sub("/p/x", idempotency_key="job-7"))
    assert (again.id, created) == (first, False)
    assert await queue.prune(MONTH) == 1
    later, created = await queue.submit(sub("/p/x", idempotency_key="job-7"))
    assert created and later.id != first and later.state == "queued"


# -- the index the prune reads -------------------------------------------------------------


def _indexes(conn: Connection) -> dict[str, Any]:
    return {i["name"]: i["column_names"] for i in inspect(conn).get_indexes("transfers")}


def _downgrade(conn: Connection, revision: str) -> None:
    from alembic import command

    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)


async def test_an_upgrade_indexes_transfers_by_their_end_and_keeps_them(catalog_url: str) -> None:
    engine = create_engine_for(catalog_url)
    try:
        await upgrade(engine, "0004")
        old, _ = await Transfers(engine).submit(Submission("t1", "stage", "/proj/x"))
        async with engine.connect() as conn:
            assert "ix_transfers_finished" not in await conn.run_sync(_indexes)
        assert await upgrade(engine) == ("0004", HEAD)
        async with engine.connect() as conn:
            assert (await conn.run_sync(_indexes))["ix_transfers_finished"] == ["finished_at"]
        assert (await Transfers(engine).get(old.id)).state == "queued"
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0004")
        async with engine.connect() as conn:
            assert "ix_transfers_finished" not in await conn.run_sync(_indexes)
        assert (await Transfers(engine).get(old.id)).state == "queued"
    finally:
        await engine.dispose()


async def test_an_upgrade_indexes_transfers_by_path_and_state_and_keeps_them(
    catalog_url: str,
) -> None:
    engine = create_engine_for(catalog_url)
    try:
        await upgrade(engine, "0005")
        old, _ = await Transfers(engine).submit(Submission("t1", "stage", "/proj/x"))
        async with engine.connect() as conn:
            assert (await conn.run_sync(_indexes))["ix_transfers_path"] == ["path"]
        assert await upgrade(engine) == ("0005", HEAD)
        async with engine.connect() as conn:
            indexes = await conn.run_sync(_indexes)
        assert indexes["ix_transfers_path_state"] == ["path", "state", "finished_at"]
        assert "ix_transfers_path" not in indexes
        assert await Transfers(engine).stage_queued("/proj/x")
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0005")
        async with engine.connect() as conn:
            indexes = await conn.run_sync(_indexes)
        assert indexes["ix_transfers_path"] == ["path"] and "ix_transfers_path_state" not in indexes
        assert (await Transfers(engine).get(old.id)).state == "queued"
    finally:
        await engine.dispose()


# -- the daemon's loop -----------------------------------------------------------------------


async def test_history_deletes_a_batch_a_call_and_counts_them(
    queue: Transfers, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(25):
        await ended(queue, f"/p/d{i}", State.FAILED, days=8 + i / 100)
    kept = await ended(queue, "/p/kept", State.FAILED, days=6)
    metrics = Metrics("site-a")
    history = History(queue, 7, metrics, batch=10)
    with caplog.at_level(logging.INFO, logger="datamover.scheduler.history"):
        assert [await history.run_once() for _ in range(3)] == [True, True, False]
        assert await history.run_once() is False  # nothing more: no second line
    assert [r.id for r in await queue.list(limit=100)] == [kept]
    pruned = metrics.registry.get_sample_value(
        "datamover_transfers_pruned_total", {"site": "site-a"}
    )
    assert pruned == 25
    assert [r.getMessage() for r in caplog.records] == [
        "deleted 25 transfers that ended more than 7 days ago"
    ]


async def test_history_of_0_days_keeps_ended_transfers_for_ever(queue: Transfers) -> None:
    old = await ended(queue, "/p/x", State.SUCCEEDED, days=3650)
    assert await History(queue, 0).run_once() is False
    assert (await queue.get(old)).state == "succeeded"


async def test_the_history_loop_prunes_again_as_transfers_age(queue: Transfers) -> None:
    # What the daemon runs: the generic loop calls `run_once` at once, then every `every`
    # seconds, so a transfer that ages past the retention while it runs is deleted too.
    old = await ended(queue, "/p/old", State.SUCCEEDED, days=8)
    later = await ended(queue, "/p/later", State.SUCCEEDED, days=1)
    history = History(queue, 7, every=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(run_loop("history", history.run_once, stop, idle=history.every))
    try:
        await _until_gone(queue, old)
        assert (await queue.get(later)).state == "succeeded"
        await set_row(queue, later, finished_at=await days_ago(queue, 7.5))
        await _until_gone(queue, later)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def _until_gone(queue: Transfers, transfer_id: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await queue.get(transfer_id)
        except NotFound:
            return
        assert time.monotonic() < deadline, f"{transfer_id} was not deleted"
        await asyncio.sleep(0.05)


async def test_the_daemon_deletes_transfers_older_than_history_days(make_site: MakeSite) -> None:
    env = await make_site("site-b", api={"listen": f"127.0.0.1:{free_port()}", "history_days": 7})
    engine = await open_engine(env.config.catalog_url)
    try:
        queue = Transfers(engine)
        old = [
            await ended(queue, f"/proj/old{i}", State.SUCCEEDED, days=8, idempotency_key=f"k{i}")
            for i in range(3)
        ]
        recent = await ended(queue, "/proj/recent", State.FAILED, days=6)
        waiting, _ = await queue.submit(sub("/proj/waiting"))  # for a year, not due for a day
        year, due = await days_ago(queue, 365), await days_ago(queue, -1)
        await set_row(queue, waiting.id, created_at=year, rank_time=year, not_before=due)
    finally:
        await engine.dispose()
    d = start_daemon(env)
    try:
        token = d.token("t1", "/proj", "write")
        pruned = 'datamover_transfers_pruned_total{site="site-b"} 3.0'
        deadline = time.monotonic() + 30
        while pruned not in d.request("GET", "/metrics")[1]:  # counted once deleted
            assert time.monotonic() < deadline, d.log()
            await asyncio.sleep(0.1)
        for transfer_id in old:  # gone: a JSON 404, as for an id never made
            status, body = d.request("GET", f"/v1/transfers/{transfer_id}", token)
            assert (status, body) == (
                404,
                {"error": {"code": "not_found", "message": f"no transfer {transfer_id!r}"}},
            )
        assert d.request("GET", f"/v1/transfers/{recent}", token)[1]["state"] == "failed"
        assert d.request("GET", f"/v1/transfers/{waiting.id}", token)[1]["state"] == "queued"
        _, page = d.request("GET", "/v1/transfers", token)
        assert sorted(t["id"] for t in page["transfers"]) == sorted([recent, waiting.id])
        assert "deleted 3 transfers that ended more than 7 days ago" in d.log()
        proc = with_token(env, token).cli("transfer", "watch", old[0])
        assert proc.returncode == 3 and f"no transfer {old[0]!r}" in proc.stderr, proc.stderr
        # The key of a deleted transfer is free again: the same request makes a new one.
        body = {"kind": "stage", "path": "/proj/old0"}
        status, again = d.request("POST", "/v1/transfers", token, body, {"Idempotency-Key": "k0"})
        assert status == 201 and again["id"] not in old
    finally:
        d.stop()
