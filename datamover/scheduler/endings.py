"""Wake the requests waiting for a transfer when this process stops running it.

`GET /v1/transfers/{id}?wait=S` (a long poll) answers as soon as the transfer is terminal.
The workers of this serve process call `ended(id)` after each run (succeeded, failed, given
back to the queue or cancelled) and the cancel route after each cancel; a waiter then reads
the transfer again. A transfer ended by another serve process sharing the catalog wakes no
one here, so waiters also re-read it every `RECHECK` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

RECHECK = 1.0  # seconds between reads while nothing here says the transfer ended


class Endings:
    """Per-transfer wake-ups within one event loop. Not thread-safe."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def close(self) -> None:
        """The daemon is stopping: wake every waiter; they answer with what they have, so
        no held request delays the shutdown (clients ask again, then wait for the restart)."""
        self.closed = True
        for transfer_id in list(self._waiters):
            self.ended(transfer_id)

    def ended(self, transfer_id: str) -> None:
        """Wake every request waiting for `transfer_id` (they read it again)."""
        for waiter in self._waiters.pop(transfer_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    @contextlib.contextmanager
    def watch(self, transfer_id: str) -> Iterator[asyncio.Future[None]]:
        """A future done once `ended(transfer_id)` is called. Enter it *before* reading the
        transfer, so an end between that read and the wait is not missed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(transfer_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(transfer_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[transfer_id]
            if not waiter.done():
                waiter.cancel()

    @property
    def waiting(self) -> int:
        """How many requests are waiting now (for tests and metrics)."""
        return sum(len(w) for w in self._waiters.values())


async def until(waiter: asyncio.Future[None], seconds: float) -> None:
    """Wait for `waiter` at most `seconds` (never raises on time-out)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiter), seconds)
