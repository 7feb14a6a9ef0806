"""The daemon's trash retention: with `[api] trash_days`, the runs in the site's trash (what
stages moved aside, `transfer.trash`) that started more than that many days ago are removed
at start-up and every `EVERY` seconds.

The trash holds users' changes, so nothing empties it unless asked: `[api] trash_days` (0,
the default: never) or `datamover trash --empty`. A run of the last day is never removed
(its stage may still be writing into it). A trash that cannot be emptied (a directory of
another user's the daemon may not change) is one warning line, tried again at the next
round, not an error every few seconds; a trash another process is emptying (a cron job's
`datamover trash --empty`) is left to it for this round. A daemon that drains stops an
emptying under way between two entries (`TrashRetention.stop`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from datamover.console import counted, human_bytes
from datamover.errors import Busy, DatamoverError
from datamover.metrics import Metrics
from datamover.transfer import trash

log = logging.getLogger(__name__)

EVERY = 3600.0  # seconds between two emptyings


class TrashRetention:
    """Removes the trash runs of `state_dir` older than `days` (at least 1)."""

    def __init__(
        self, state_dir: Path, days: int, metrics: Metrics | None = None, every: float = EVERY
    ) -> None:
        self.state_dir = state_dir
        self.days = days
        self.metrics = metrics
        self.every = every
        self._stop = threading.Event()

    def stop(self) -> None:
        """Make an emptying under way return between two entries (the daemon drains; the
        thread it runs in cannot be cancelled, and the process waits for it at exit)."""
        self._stop.set()

    async def run_once(self) -> bool:
        """Empty what is due; always False (the next round is `every` seconds away)."""
        try:
            removed = await asyncio.to_thread(trash.empty, self.state_dir, self.days, self._stop)
        except Busy as exc:  # a cron job's `trash --empty`: it does the work
            log.info("trash: %s; trying again in %.0f minutes", exc, self.every / 60)
            return False
        except trash.TrashStuck as exc:  # the other runs were emptied: counted below
            log.warning("trash: %s; trying again in %.0f minutes", exc, self.every / 60)
            removed = exc.removed
        except DatamoverError as exc:
            log.warning("trash: %s; trying again in %.0f minutes", exc, self.every / 60)
            return False
        if self._stop.is_set():
            log.info("trash: emptying stopped for the drain; the next start goes on with it")
        if removed:
            files = sum(r.files for r in removed)
            size = sum(r.bytes for r in removed)
            if self.metrics is not None:
                self.metrics.trash_emptied(len(removed), size)
            log.info(
                "emptied %s older than %s: %s, %s",
                counted(len(removed), "trash run"),
                counted(self.days, "day"),
                counted(files, "file"),
                human_bytes(size),
            )
        return False
