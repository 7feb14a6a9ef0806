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
    else as an unexpected error with its traceback. `catalog_only`: `run_once` talks to
    the catalog alone, so a bare connection error is the catalog's (`catalog_outage`)."""
    while not stop.is_set():
        try:
            worked = await run_once()
            delay = 0.0 if worked else idle
        except asyncio.CancelledError:
            raise
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


def _outage(exc: Exception, catalog_only: bool = True) -> str | None:
    """What to log of `exc` if it is no bug: the catalog (or the store) unavailable, or a
    catalog that cannot be used; None otherwise."""
    if isinstance(exc, TransientError | CatalogError):
        return exc.message
    known = catalog_outage(exc, catalog_only=catalog_only)
    return None if known is None else known.message
