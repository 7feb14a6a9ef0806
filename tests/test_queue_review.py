"""The transfer queue, continued: what the claim's scan costs, a run failing after its lease
was taken over, stages cancelled while they are being answered, deadlines within a class."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from datamover.catalog.engine import open_engine
from datamover.catalog.transfer_rows import Submission
from datamover.catalog.transfers import Transfers


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
