"""The transfers' history: ended transfers are deleted `[api] history_days` after they ended.

A site whose Slurm prolog stages for every job records thousands of transfers a day; kept
for ever, they slow listings and lookups and grow the catalog without bound. The daemon runs
`History.run_once` at start-up and every `EVERY` seconds: each call deletes one batch of
transfers (succeeded, failed or cancelled) that ended before the retention, oldest first,
in a transaction of its own (`Transfers.prune`), and asks to be called again at once while
batches come back full, so a first prune of millions of rows takes the catalog's write lock
a batch at a time and a stop is obeyed between batches. Queued and running transfers are
never deleted. A deleted transfer is gone: its id answers 404 like an unknown one, and its
idempotency key is free, so a submission with that key makes a new transfer.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from datamover.catalog.transfers import PRUNE_BATCH, Transfers
from datamover.metrics import Metrics

log = logging.getLogger(__name__)

EVERY = 600.0  # seconds between prunes once a prune found nothing more to delete


class History:
    """Deletes ended transfers older than `days` (0: keeps them for ever)."""

    def __init__(
        self,
        transfers: Transfers,
        days: float,
        metrics: Metrics | None = None,
        batch: int = PRUNE_BATCH,
        every: float = EVERY,
    ) -> None:
        self.transfers = transfers
        self.days = days
        self.metrics = metrics
        self.batch = batch
        self.every = every
        self._deleted = 0  # by the prune under way, for one log line when it ends

    async def run_once(self) -> bool:
        """Delete one batch; True if it was full (more may be due: call again at once)."""
        if self.days <= 0:
            return False
        n = await self.transfers.prune(timedelta(days=self.days), self.batch)
        if n and self.metrics is not None:
            self.metrics.pruned(n)
        self._deleted += n
        if n >= self.batch:
            return True
        if self._deleted:
            log.info(
                "deleted %d transfers that ended more than %g days ago", self._deleted, self.days
            )
        self._deleted = 0
        return False
