"""Prometheus metrics of a site daemon, on a registry of its own.

Counters move as work finishes (bytes and files by direction, durations, retries, errors);
gauges that describe the catalog (queue depth, cache bytes, dedup ratio) are refreshed by
`refresh`, which the daemon runs periodically, so a scrape never waits on the database.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

_DIRECTION = {"push": "up", "stage": "down"}


class Metrics:
    """The daemon's collectors."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes = Counter(
            "datamover_bytes_moved",
            "Bytes sent to or fetched from the store",
            ["direction", "site"],
            registry=r,
        )
        self.files = Counter(
            "datamover_files_moved", "Files pushed or staged", ["direction", "site"], registry=r
        )
        self.duration = Histogram(
            "datamover_transfer_duration_seconds",
            "Wall time of finished transfers",
            ["kind", "site"],
            registry=r,
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400, float("inf")),
        )
        self.outcomes = Counter(
            "datamover_transfers_finished",
            "Transfers by final state",
            ["kind", "state", "site"],
            registry=r,
        )
        self.retries = Counter(
            "datamover_retries", "Transfer attempts retried", ["kind", "site"], registry=r
        )
        self.store_retries = Counter(
            "datamover_store_retries",
            "Store requests tried again after a transient failure, by what was retried: a "
            "call (put, get, head, list, delete) or a step of a multipart upload (part, "
            "completion, check)",
            ["op", "site"],
            registry=r,
        )
        self.errors = Counter(
            "datamover_errors",
            "Transfer attempts failed, by error code",
            ["kind", "code", "site"],
            registry=r,
        )
        self.queue = Gauge(
            "datamover_queue_depth",
            "Queued and running transfers by state and priority",
            ["state", "priority", "site"],
            registry=r,
        )
        self.dedup = Gauge(
            "datamover_dedup_ratio",
            "Logical bytes pushed per byte uploaded, over this daemon's pushes that published "
            "a version (the bytes of its files over the bytes of packs, manifest and version "
            "document sent); a push that found its tree unchanged counts in neither",
            ["site"],
            registry=r,
        )
        self.deleted = Counter(
            "datamover_transfers_pruned",
            "Ended transfers deleted after [api] history_days",
            ["site"],
            registry=r,
        )
        self.indexed = Counter(
            "datamover_packs_indexed",
            "Packs in the store whose chunks the daemon indexed ([api] reindex_minutes)",
            ["site"],
            registry=r,
        )
        self.trash_runs = Counter(
            "datamover_trash_runs_emptied",
            "Runs of the trash (what stages moved aside) the daemon removed after [api] trash_days",
            ["site"],
            registry=r,
        )
        self.trash_bytes = Counter(
            "datamover_trash_emptied_bytes",
            "Bytes of regular files in the trash runs the daemon removed",
            ["site"],
            registry=r,
        )
        self.corrupt_packs = Gauge(
            "datamover_packs_corrupt",
            "Packs in the store the daemon's last reindex found corrupt and did not index",
            ["site"],
            registry=r,
        )
        self.cache = Gauge(
            "datamover_cache_bytes", "Bytes of replicas in this site's cache", ["site"], registry=r
        )
        self._logical = 0
        self._uploaded = 0

    def finished(self, kind: str, state: str, seconds: float, result: dict[str, Any]) -> None:
        """Count a transfer that ended."""
        self.outcomes.labels(kind, state, self.site).inc()
        if state != "succeeded":
            return
        self.duration.labels(kind, self.site).observe(seconds)
        direction = _DIRECTION.get(kind, kind)
        moved = result.get("uploaded_bytes", result.get("downloaded_bytes", 0))
        self.bytes.labels(direction, self.site).inc(moved)
        files = result.get("files_read", result.get("fetched_files", 0))
        self.files.labels(direction, self.site).inc(files)
        if kind == "push" and not result.get("unchanged") and moved > 0:
            # `bytes` is the size of every file of the version published, `bytes_read` only
            # of those this push read again (changed or new): a push publishing 150,000
            # bytes that uploaded 5,835 showed 0.51 instead of 25.7. A push that found
            # its tree unchanged publishes nothing and uploads nothing (or only repairs a
            # manifest object the store lost): counted, each one would raise the ratio.
            self._logical += result.get("bytes", 0)
            self._uploaded += moved
            self.dedup.labels(self.site).set(self._logical / self._uploaded)

    def retry(self, kind: str) -> None:
        """Count a retried attempt."""
        self.retries.labels(kind, self.site).inc()

    def store_retry(self, op: str) -> None:
        """Count a store request tried again (`RetryPolicy.on_retry`)."""
        self.store_retries.labels(op, self.site).inc()

    def error(self, kind: str, code: str) -> None:
        """Count a failed attempt."""
        self.errors.labels(kind, code, self.site).inc()

    def pruned(self, n: int) -> None:
        """Count `n` ended transfers deleted from the history."""
        self.deleted.labels(self.site).inc(n)

    def trash_emptied(self, runs: int, nbytes: int) -> None:
        """Count `runs` trash runs removed, holding `nbytes` bytes of files."""
        self.trash_runs.labels(self.site).inc(runs)
        self.trash_bytes.labels(self.site).inc(nbytes)

    def reindexed(self, indexed: int, corrupt: int) -> None:
        """Count packs a periodic reindex recorded; show the corrupt ones it skipped."""
        self.indexed.labels(self.site).inc(indexed)
        self.corrupt_packs.labels(self.site).set(corrupt)

    def set_queue(self, depth: dict[tuple[str, str], int]) -> None:
        """Replace the queue-depth gauge with fresh counts."""
        self.queue.clear()
        for (state, priority), n in depth.items():
            self.queue.labels(state, priority, self.site).set(n)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
