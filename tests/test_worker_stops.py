"""How a worker's run ends when it is stopped: the lease of a run stopped for a cancel or a
lapsing lease is held until the run is over, and a `CancelledError` the worker did not
cause is an internal error of the transfer, not the end of the worker loop (both engines)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from datamover.catalog.engine import open_engine
from datamover.catalog.transfers import Transfers
from datamover.metrics import Metrics
from datamover.scheduler.worker import TransferProgress, Worker
from tests.test_queue import _catalog_locked, sub


@pytest.fixture
async def queue(catalog_url: str) -> AsyncIterator[Transfers]:
    engine = await open_engine(catalog_url)
    yield Transfers(engine, max_attempts=3)
    await engine.dispose()


def _slow_to_stop(timeline: list[str], name: str, cleanup: float) -> Any:
    """A stand-in for a transfer that runs until stopped, then takes `cleanup` s to end (a
    stage waiting for its writer processes' batches), noting each step in `timeline`."""

    async def run(row: Any, progress: TransferProgress) -> dict[str, Any]:
        timeline.append(f"{name} start")
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            timeline.append(f"{name} cancelled")
            await asyncio.sleep(cleanup)
            timeline.append(f"{name} over")
            raise
        return {"version": "v"}

    return run


async def _run1_started(
    queue: Transfers,
) -> tuple[Any, list[str], Worker, asyncio.Task[bool], float]:
    """A transfer of /p/x that worker h1 (a 1.5 s lease) runs as `run1`, slow to stop
    (2.5 s of cleanup), once it has started; worker h2 (a 30 s lease) ready to claim. Gives
    the transfer, the timeline, h2, h1's `run_once` task and when it was started."""
    t, _ = await queue.submit(sub("/p/x"))
    timeline: list[str] = []
    w1 = Worker(None, queue, None, "h1:1/w0", Metrics("s"), lease=1.5)  # type: ignore[arg-type]
    w2 = Worker(None, queue, None, "h2:1/w0", Metrics("s"), lease=30)  # type: ignore[arg-type]
    w1._run = _slow_to_stop(timeline, "run1", cleanup=2.5)  # type: ignore[method-assign]
    w2._run = _slow_to_stop(timeline, "run2", cleanup=0)  # type: ignore[method-assign]
    started = time.monotonic()
    one = asyncio.create_task(w1.run_once())
    while "run1 start" not in timeline:
        await asyncio.sleep(0.02)
    return t, timeline, w2, one, started


async def test_a_run_stopped_for_a_lapsing_lease_holds_it_until_it_is_over(
    queue: Transfers, catalog_url: str
) -> None:
    """Before: the heartbeat that stopped a run because the catalog did not renew its lease
    returned at once; the stopped run's cleanup went on unrenewed, its lease lapsed, and
    `requeue_expired` and a claim started a second run on the tree while the first still
    wrote. Now it keeps renewing until the run is over: a catalog back meanwhile holds the
    lease, and the transfer goes back in the queue (a retry) only once the run has ended."""
    t, timeline, w2, one, started = await _run1_started(queue)
    async with _catalog_locked(catalog_url, t.id):  # no heartbeat gets through: stopped
        while "run1 cancelled" not in timeline:
            assert time.monotonic() - started < 1.5, timeline  # stopped before the lapse
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    # The catalog answers again while run1 cleans up, past when its lease would lapse.
    await asyncio.sleep(max(2.9 - (time.monotonic() - started), 0))
    assert await queue.requeue_expired() == 0
    assert not await w2.run_once()  # the path is still run1's
    assert await one
    assert timeline == ["run1 start", "run1 cancelled", "run1 over"]
    row = await queue.get(t.id)
    assert row.state == "queued" and row.attempts == 1, row  # retried like an outage
    assert "lease could not be renewed" in (row.error or {}).get("message", ""), row.error


async def test_a_run_stopped_by_a_cancel_holds_its_lease_until_it_is_over(
    queue: Transfers,
) -> None:
    """Before: the heartbeat that stopped a run for a cancel returned at once; the run's
    cleanup outlived the lease, `requeue_expired` ended the transfer, and a new transfer of
    the same path was claimed and ran on the tree while the first still wrote to it."""
    t, timeline, w2, one, started = await _run1_started(queue)
    await queue.cancel(t.id)
    while "run1 cancelled" not in timeline:
        await asyncio.sleep(0.02)
    await queue.submit(sub("/p/x"))
    await asyncio.sleep(max(2.5 - (time.monotonic() - started), 0))  # past the lease
    assert await queue.requeue_expired() == 0
    assert not await w2.run_once()  # the path is still run1's
    assert await one
    assert timeline == ["run1 start", "run1 cancelled", "run1 over"]
    assert (await queue.get(t.id)).state == "cancelled"


async def test_a_cancelled_error_from_inside_a_run_fails_it_and_the_worker_goes_on(
    queue: Transfers, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a `CancelledError` the run raised itself (it awaited a future other code
    cancelled) was taken for the worker being cancelled: the transfer went back in the queue
    with its attempt uncounted, and the worker loop ended with no log line while the daemon
    went on serving; the next worker to claim the transfer ended the same way. Now the run
    fails as an internal error, with the traceback logged, and the worker runs the next."""
    from datamover.scheduler.runner import run_loop

    bad, _ = await queue.submit(sub("/p/x"))
    buggy, _ = await queue.submit(sub("/p/z"))
    good, _ = await queue.submit(sub("/p/y"))
    worker = Worker(None, queue, None, "w1", Metrics("s"))  # type: ignore[arg-type]

    async def run(row: Any, progress: TransferProgress) -> dict[str, Any]:
        if row.id == bad.id:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            return await future
        if row.id == buggy.id:
            raise KeyError("a bug")
        return {"version": "v"}

    worker._run = run  # type: ignore[method-assign]
    stop = asyncio.Event()
    loop = asyncio.create_task(run_loop("worker 0", worker.run_once, stop, idle=0.05))
    try:
        for _ in range(200):
            if (await queue.get(good.id)).state == "succeeded" or loop.done():
                break
            await asyncio.sleep(0.05)
        assert not loop.done()
    finally:
        stop.set()
        await asyncio.gather(loop, return_exceptions=True)
    failed = await queue.get(bad.id)
    assert failed.state == "failed" and failed.attempts == 1, failed
    assert failed.error and failed.error["message"].startswith("internal error"), failed.error
    # Both recorded with the internal code, which a waiting client exits 70 for (they had
    # the base code, exit 1: what `verify` gives to a tree that differs).
    assert failed.error["code"] == "internal", failed.error
    bug = await queue.get(buggy.id)
    assert bug.state == "failed" and bug.error and bug.error["code"] == "internal", bug.error
    assert (await queue.get(good.id)).state == "succeeded"
    logged = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info for r in logged), caplog.text


async def test_a_worker_task_cancelled_from_outside_still_puts_its_transfer_back(
    queue: Transfers,
) -> None:
    """Cancelling the worker's own task (a hard shutdown) still ends it, the transfer put
    back in the queue with its attempt uncounted, as before."""
    t, _ = await queue.submit(sub("/p/x"))
    worker = Worker(None, queue, None, "w1", Metrics("s"))  # type: ignore[arg-type]
    timeline: list[str] = []
    worker._run = _slow_to_stop(timeline, "run", cleanup=0)  # type: ignore[method-assign]
    one = asyncio.create_task(worker.run_once())
    while "run start" not in timeline:
        await asyncio.sleep(0.02)
    one.cancel()
    with pytest.raises(asyncio.CancelledError):
        await one
    row = await queue.get(t.id)
    assert row.state == "queued" and row.attempts == 0, row
