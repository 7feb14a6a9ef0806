"""The generic daemon loop: call `run_once` until told to stop, sleeping when idle.

Every daemon activity (a transfer worker, a metrics refresher) is a `run_once()` coroutine
returning whether it did something; tests drive `run_once` directly, and this runner owns the
sleeping, stopping and error containment for all of them. Their steps use the catalog: one
it cannot reach (a PostgreSQL restart, a locked SQLite file, no free pooled connection) is
one warning line per failed step, naming it; a traceback is for what is no outage (a bug).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from datamover.catalog.engine import catalog_outage
from datamover.errors import CatalogError, TransientError

log = logging.getLogger(__name__)


async def _pause(stop: asyncio.Event, wake: asyncio.Event | None, seconds: float) -> None:
    events = [stop] if wake is None else [stop, wake]
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if wake is not None:
        wake.clear()


async def run_loop(
    name: str,
    run_once: Callable[[], Awaitable[bool]],
    stop: asyncio.Event,
    idle: float = 0.5,
    backoff: float = 5.0,
    wake: asyncio.Event | None = None,
) -> None:
    """Run `run_once` until `stop` is set; wait `idle` seconds (or until `wake` is set, e.g.
    by a new submission) when it found nothing to do, and `backoff` seconds after an error,
    which is logged, never fatal: a catalog outage as one warning line, anything else as an
    unexpected error with its traceback."""
    while not stop.is_set():
        try:
            worked = await run_once()
            delay = 0.0 if worked else idle
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff
            outage = _outage(exc)
            if outage is None:
                log.exception("%s: unexpected error; retrying in %.0f s", name, backoff)
            else:
                log.warning("%s: %s; retrying in %.0f s", name, outage, backoff)
        if delay:
            await _pause(stop, wake if delay == idle else None, delay)


def _outage(exc: Exception) -> str | None:
    """What to log of `exc` if it is no bug: the catalog (or the store) unavailable, or a
    catalog that cannot be used; None otherwise."""
    if isinstance(exc, TransientError | CatalogError):
        return exc.message
    known = catalog_outage(exc, catalog_only=True)
    return None if known is None else known.message
