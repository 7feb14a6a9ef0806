"""The generic daemon loop: call `run_once` until told to stop, sleeping when idle.

Every daemon activity (a transfer worker, a metrics refresher) is a `run_once()` coroutine
returning whether it did something; tests drive `run_once` directly, and this runner owns the
sleeping, stopping and error containment for all of them. Their steps use the catalog: one
it cannot reach (a PostgreSQL restart, a locked SQLite file, no free pooled connection) is
one warning line per failed step, naming it; a traceback is for what is no outage (a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from datamover.catalog.engine import catalog_outage
from datamover.errors import CatalogError, TransientError

log = logging.getLogger(__name__)


class Doorbell:
    """Wakes one idle loop per `ring` (a submission: one transfer for one worker to claim).

    An event set for all woke every idle worker for each submission, and each of them
    claimed: a burst of stages queued behind a running one cost every worker a scan of the
    queue per submission. A ring while no loop is idle is kept (once) for the next loop to
    pause, which then does not: it may have missed the submission just before."""

    def __init__(self) -> None:
        self._idle: deque[asyncio.Future[None]] = deque()
        self._rung = False

    def ring(self) -> None:
        """Wake the loop idle longest, or keep the ring for the next one to pause."""
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._rung = True

    @property
    def idle(self) -> int:
        """How many loops wait for a ring now."""
        return sum(not w.done() for w in self._idle)

    async def pause(self, stop: asyncio.Event, seconds: float) -> None:
        """Wait `seconds`, or until `stop` is set or a ring wakes this loop."""
        if self._rung:
            self._rung = False
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await _pause(stop, waiter, seconds)
        finally:
            waiter.cancel()
            with contextlib.suppress(ValueError):
                self._idle.remove(waiter)


async def _pause(stop: asyncio.Event, woken: asyncio.Future[None] | None, seconds: float) -> None:
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if woken is not None:
        waiters.add(woken)
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def run_loop(
    name: str,
    run_once: Callable[[], Awaitable[bool]],
    stop: asyncio.Event,
    idle: float = 0.5,
    backoff: float = 5.0,
    wake: Doorbell | None = None,
    catalog_only: bool = True,
) -> None:
    """Run `run_once` until `stop` is set; wait `idle` seconds (or until `wake` wakes this
    loop, as for a new submission) when it found nothing to do, and `backoff` seconds after
    an error, which is logged, never fatal: a catalog outage as one warning line, anything
    else as an unexpected error with its traceback (a `CancelledError` too, unless this
    loop's task is being cancelled, which ends it). `catalog_only`: `run_once` talks to the
    catalog alone, so a bare connection error is the catalog's (`catalog_outage`)."""
    while not stop.is_set():
        try:
            worked = await run_once()
            delay = 0.0 if worked else idle
        except asyncio.CancelledError:
            if _cancelling():
                raise
            # Raised inside the step (it awaited a future other code cancelled), not this
            # loop's task cancelled: a bug of the step, which must not end the loop.
            delay = backoff
            log.exception(
                "%s: unexpected error (cancelled inside); retrying in %.0f s", name, backoff
            )
        except Exception as exc:
            delay = backoff
            outage = _outage(exc, catalog_only)
            if outage is None:
                log.exception("%s: unexpected error; retrying in %.0f s", name, backoff)
            else:
                log.warning("%s: %s; retrying in %.0f s", name, outage, backoff)
        if delay and wake is not None and delay == idle:
            await wake.pause(stop, delay)
        elif delay:
            await _pause(stop, None, delay)


def _cancelling() -> bool:
    """Whether the running task is being cancelled (`Task.cancel`), as opposed to a
    `CancelledError` merely raised through it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Loops:
    """The daemon's loops (`run_loop`s), kept running until `stop` is set: one that ends
    otherwise (an error that escaped `run_loop`, a cancel that was not the daemon's) is
    logged as an error naming it and started again `backoff` seconds later, so a daemon
    that still answers its API never goes on with a worker (or the requeue of lapsed
    leases) silently gone."""

    def __init__(self, stop: asyncio.Event, backoff: float = 5.0) -> None:
        self.stop = stop
        self.backoff = backoff
        self._made: dict[str, Callable[[], Awaitable[None]]] = {}
        self._tasks: dict[str, asyncio.Future[None]] = {}

    def start(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        """Run the loop `make()` under `name` (one of each name)."""
        self._made[name] = make
        self._tasks[name] = asyncio.ensure_future(make())

    def cancel(self, name: str) -> None:
        """Cancel the loop `name` (after `stop` is set: it is not started again)."""
        if name in self._tasks:
            self._tasks[name].cancel()

    async def supervise(self) -> None:
        """Return once `stop` is set; until then start again each loop that ended."""
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                running = set(self._tasks.values())
                await asyncio.wait({stopping, *running}, return_when=asyncio.FIRST_COMPLETED)
                if self.stop.is_set():
                    return
                for name, task in list(self._tasks.items()):
                    if task.done():
                        self._restart(name, task)
        finally:
            stopping.cancel()

    def _restart(self, name: str, ended: asyncio.Future[None]) -> None:
        exc = None if ended.cancelled() else ended.exception()
        why = "was cancelled" if ended.cancelled() else "ended" if exc is None else "failed"
        log.error(
            "%s %s while the daemon runs; starting it again in %.0f s",
            name,
            why,
            self.backoff,
            exc_info=exc,
        )
        make = self._made[name]

        async def later() -> None:
            await _pause(self.stop, None, self.backoff)
            if not self.stop.is_set():
                await make()

        self._tasks[name] = asyncio.ensure_future(later())

    async def wait(self) -> None:
        """Wait for every loop to end (after `stop`), whatever its outcome."""
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _outage(exc: Exception, catalog_only: bool = True) -> str | None:
    """What to log of `exc` if it is no bug: the catalog (or the store) unavailable, or a
    catalog that cannot be used; None otherwise."""
    if isinstance(exc, TransientError | CatalogError):
        return exc.message
    known = catalog_outage(exc, catalog_only=catalog_only)
    return None if known is None else known.message
