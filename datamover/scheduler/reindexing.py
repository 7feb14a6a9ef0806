"""The daemon's periodic `db rebuild`: every `[api] reindex_minutes` it indexes the packs in
the store its catalog does not know yet (`repo.reindex`), so pushes at this site send no
chunk another site has stored since. Off by default: a site new to a bucket of hundreds of
millions of chunks would index them all (one catalog row each; SQLite is meant for ~10
million), which an operator should choose.

A run that fails (the store or catalog unreachable) is one warning (an unexpected error:
its traceback); the next run, at the next interval, starts where the packs recorded so far
leave it. A stop of the daemon cancels a run under way (`serve` does). Corrupt packs are
reported at every run that meets them, by count and the first few keys, until they are
dealt with.
"""

from __future__ import annotations

import logging

from datamover.catalog.engine import catalog_outage
from datamover.errors import DatamoverError
from datamover.metrics import Metrics
from datamover.repo.reindex import reindex
from datamover.site import Site

log = logging.getLogger(__name__)

#: Corrupt packs named in one warning line.
NAMED = 3


class Reindexer:
    """Runs `reindex` for `site` every `minutes` (`run_once` is one run)."""

    def __init__(self, site: Site, minutes: float, metrics: Metrics | None = None) -> None:
        self.site = site
        self.every = minutes * 60.0
        self.metrics = metrics
        self._when = "1 minute" if minutes == 1 else f"{minutes:g} minutes"

    async def run_once(self) -> bool:
        """Index what is new; always False (the next run is due in `every` seconds)."""
        try:
            result = await reindex(
                self.site.store,
                self.site.catalog,
                concurrency=self.site.config.transfer.download_concurrency,
            )
        except Exception as exc:  # each is logged, and the next run is in `every` seconds
            known = exc if isinstance(exc, DatamoverError) else catalog_outage(exc)
            if known is None:
                log.exception("indexing the store's packs failed, tried again in %s", self._when)
            else:
                log.warning(
                    "indexing the store's packs failed, tried again in %s: %s",
                    self._when,
                    known.message,
                )
            return False
        if self.metrics is not None:
            self.metrics.reindexed(result.packs_indexed, result.corrupt_count)
        if result.packs_indexed:
            log.info(
                "indexed %d new packs of the store (%d chunks) in %.1f s",
                result.packs_indexed,
                result.chunks_indexed,
                result.seconds,
            )
        if result.corrupt_count:
            named = "; ".join(f"{k}: {why}" for k, why in result.corrupt[:NAMED])
            log.warning(
                "%d packs in the store are corrupt and not indexed (%s)",
                result.corrupt_count,
                named,
            )
        return False
