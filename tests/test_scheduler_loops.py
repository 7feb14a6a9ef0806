"""The daemon's loops stay up while it serves: a `CancelledError` raised inside a step is an
error of that step, a loop that ends anyway is logged and started again, and the requeue of
lapsed leases does not depend on the metrics loop (`datamover serve` run in this process)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from datamover.catalog.engine import open_engine
from datamover.catalog.queue_sql import T
from datamover.catalog.transfer_rows import Submission, now
from datamover.catalog.transfers import Transfers
from datamover.config import load_config
from datamover.scheduler.runner import Loops, run_loop
from tests.fixtures_daemon import free_port
from tests.fixtures_sites import MakeSite


class _Crash(BaseException):
    """Stands in for what escapes `run_loop` (it contains every `Exception`)."""


async def test_a_cancelled_error_inside_a_step_does_not_end_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: `run_loop` re-raised every `CancelledError`, so a step that awaited a future
    other code cancelled ended the loop, with no log line. Now that is an unexpected error,
    logged with its traceback, and the loop goes on; cancelling its task still ends it."""
    stop = asyncio.Event()
    calls = 0

    async def run_once() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future
        if calls == 3:
            stop.set()
        return True

    caplog.set_level(logging.INFO, "datamover.scheduler.runner")
    await asyncio.wait_for(run_loop("worker 0", run_once, stop, backoff=0.01), 10)
    assert calls == 3
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.exc_info, caplog.text
    assert record.getMessage().startswith("worker 0: unexpected error (cancelled inside)")

    async def idle() -> bool:
        return False

    forever = asyncio.create_task(run_loop("w", idle, asyncio.Event(), idle=60))
    await asyncio.sleep(0.05)
    forever.cancel()
    with pytest.raises(asyncio.CancelledError):
        await forever


async def test_a_loop_that_ends_while_the_daemon_runs_is_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: `serve` only waited for its stop; a worker task that ended meanwhile was gone
    for good, with no log line, while the daemon went on answering. Now each loop that ends
    (fails, returns, or is cancelled by others) is one error line and starts again."""
    stop = asyncio.Event()
    starts: dict[str, int] = {"crashing": 0, "returning": 0, "cancelled": 0}
    tasks: list[asyncio.Task[Any]] = []

    def make(name: str) -> Any:
        async def loop() -> None:
            starts[name] += 1
            if starts[name] > 2:
                await stop.wait()
                return
            if name == "crashing":
                raise _Crash()
            if name == "cancelled" and starts[name] == 1:
                tasks.append(asyncio.current_task())  # type: ignore[arg-type]
                await asyncio.sleep(60)

        return loop

    loops = Loops(stop, backoff=0.01)
    for name in starts:
        loops.start(name, make(name))
    supervising = asyncio.create_task(loops.supervise())
    while not tasks:
        await asyncio.sleep(0.01)
    tasks[0].cancel()  # by some code other than the daemon's
    for _ in range(500):
        if all(n == 3 for n in starts.values()):
            break
        await asyncio.sleep(0.01)
    assert starts == {"crashing": 3, "returning": 3, "cancelled": 3}
    stop.set()
    await asyncio.wait_for(supervising, 5)
    await asyncio.wait_for(loops.wait(), 5)
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 6, caplog.text
    assert any(
        r.getMessage().startswith("crashing failed while the daemon runs") and r.exc_info
        for r in errors
    )
    assert any(r.getMessage().startswith("cancelled was cancelled") for r in errors)
    assert any(r.getMessage().startswith("returning ended") for r in errors)


@contextlib.asynccontextmanager
async def _serving(env: Any) -> AsyncIterator[None]:
    """`datamover serve` of `env` in this process, stopped (by its SIGTERM) on leaving."""
    from datamover.daemon import serve

    ready = asyncio.Event()
    daemon = asyncio.create_task(serve(load_config(env.config_path), ready))
    started = asyncio.ensure_future(ready.wait())
    await asyncio.wait({daemon, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if daemon.done():
        daemon.result()
    try:
        yield
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's handler: it drains and returns
        await asyncio.wait_for(daemon, 60)


async def test_the_daemon_restarts_a_worker_loop_that_ended(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a worker task of `serve` that ended (here: an error escaping its loop) left
    the daemon one worker short for good, silently. Now it is logged and started again."""
    from datamover import daemon
    from datamover.scheduler.worker import Worker

    env = await make_site("site-a", api={"listen": f"127.0.0.1:{free_port()}", "workers": 1})
    calls = 0

    async def run_once(self: Worker) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise _Crash()
        return False

    monkeypatch.setattr(Worker, "run_once", run_once)
    monkeypatch.setattr(daemon, "LOOP_RESTART_SECONDS", 0.05)
    caplog.set_level(logging.INFO, "datamover")
    async with _serving(env):
        for _ in range(200):
            if calls > 1:
                break
            await asyncio.sleep(0.05)
    assert calls > 1
    assert "worker 0 failed while the daemon runs; starting it again" in caplog.text


async def test_lapsed_leases_are_requeued_when_the_metrics_fail(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `requeue_expired` ran at the end of the metrics step, after the queue depth
    and the replicas' size: while either failed, a transfer whose worker died was never
    put back in the queue. It is a loop of its own now."""
    from datamover.scheduler.worker import Worker

    env = await make_site("site-a", api={"listen": f"127.0.0.1:{free_port()}", "workers": 1})
    config = load_config(env.config_path)
    engine = await open_engine(config.catalog_url)
    queue = Transfers(engine, max_attempts=3)
    try:
        t, _ = await queue.submit(Submission(tenant="t1", kind="stage", path="/proj/x"))
        await queue.claim("otherhost:4242/w0", 30)  # a daemon elsewhere, then gone
        async with engine.begin() as conn:
            lapsed = now() - timedelta(seconds=1)
            await conn.execute(update(T).where(T.c.id == t.id).values(lease_expires=lapsed))

        async def broken(self: Transfers) -> Any:
            raise RuntimeError("a bug in the metrics")

        async def claims_nothing(self: Worker) -> bool:  # this daemon leaves it queued
            return False

        monkeypatch.setattr(Transfers, "depth", broken)
        monkeypatch.setattr(Worker, "run_once", claims_nothing)
        async with _serving(env):
            for _ in range(200):
                if (await queue.get(t.id)).state == "queued":
                    break
                await asyncio.sleep(0.05)
        assert (await queue.get(t.id)).state == "queued"
    finally:
        await engine.dispose()
