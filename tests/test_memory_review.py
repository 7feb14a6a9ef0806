"""Memory and task bounds of two store-wide loops.

`Repository.prefetch` warms the manifest cache with a bounded number of segments in memory
and of tasks, however long the manifest; a `db rebuild` run that fails (the store down,
access refused) leaves no task behind, so the daemon's periodic run does not pile them up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from datamover.chunking.pack import pack_key
from datamover.errors import Corrupt, ObjectNotFound, StoreUnavailable
from datamover.repo import reindex as reindex_module
from datamover.repo.layout import VersionDoc, manifest_key
from datamover.repo.manifest import SegmentRef, encode_list
from datamover.repo.repository import Repository, utc_now
from datamover.scheduler.reindexing import Reindexer
from datamover.site import Site
from datamover.storage.base import ObjectInfo
from datamover.storage.memory import MemoryStore
from tests.fixtures_sites import MakeSite

SEGMENTS = 200
SEGMENT_BYTES = 4096
FETCHES = 4  # the repository's fetch concurrency


class _Held(bytes):
    """Bytes a store answered, counted by `_CountingStore` while alive (CPython frees an
    object as its last reference goes, so the count is exact)."""

    store: _CountingStore

    def __del__(self) -> None:
        self.store.alive -= 1


class _CountingStore(MemoryStore):
    """Counts the segment bytes it answered that are still held (`alive`, `peak_alive`) and
    the tasks running at each read (`peak_tasks`)."""

    def __init__(self) -> None:
        super().__init__()
        self.alive = self.peak_alive = self.peak_tasks = self.reads = 0
        self.missing: str | None = None  # a key answered as absent

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key == self.missing:
            raise ObjectNotFound(key)
        data = await super().get(key, offset, length)
        if not key.startswith("manifests/"):
            return data
        self.reads += 1
        self.peak_tasks = max(self.peak_tasks, len(asyncio.all_tasks()))
        held = _Held(data)
        held.store = self
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        return held


async def _version(repo: Repository, count: int) -> tuple[VersionDoc, list[SegmentRef]]:
    """A version of `count` distinct segments, stored but not cached (the list is both)."""
    refs = []
    for i in range(count):
        data = i.to_bytes(4, "big") * (SEGMENT_BYTES // 4)
        digest = blake3.blake3(data).digest()
        await repo.store.put(manifest_key(digest), data)
        refs.append(SegmentRef(digest, len(data), 1, f"f{i:05}", f"f{i:05}", 0))
    listing = encode_list(refs)
    digest = await repo.put_manifest_object(listing)
    doc = VersionDoc(
        "/proj/big", "v1", None, "site-a", utc_now(), digest.hex(), len(listing),
        count, count, 0, 0, 0,
    )  # fmt: skip
    return doc, refs


async def test_prefetch_holds_a_bounded_number_of_segments_and_tasks(tmp_path: Path) -> None:
    # It held every segment until the last arrived (one task each): a 600-million-file
    # manifest is ~25 GB stored.
    store = _CountingStore()
    repo = Repository(store, tmp_path / "cache", fetch_concurrency=FETCHES)
    doc, refs = await _version(repo, SEGMENTS)
    tasks_before = len(asyncio.all_tasks())
    assert await repo.prefetch(doc) == refs
    assert store.reads == SEGMENTS
    assert all(repo.read_cached(r.digest) is not None for r in refs)
    # A worker drops its segment once cached; a thread pool's work item may still hold the
    # one before for a moment, hence twice the concurrency.
    assert store.peak_alive <= 2 * FETCHES
    assert store.peak_tasks <= tasks_before + FETCHES
    reads = store.reads
    assert await repo.prefetch(doc) == refs  # all cached now: nothing read again
    assert store.reads == reads


async def test_a_prefetch_failure_cancels_the_other_fetches(tmp_path: Path) -> None:
    store = _CountingStore()
    repo = Repository(store, tmp_path / "cache", fetch_concurrency=FETCHES)
    doc, refs = await _version(repo, SEGMENTS)
    store.missing = manifest_key(refs[10].digest)
    tasks_before = asyncio.all_tasks()
    with pytest.raises(Corrupt, match="missing from the store"):
        await repo.prefetch(doc)
    assert store.reads < SEGMENTS - 1  # the rest were not fetched
    assert asyncio.all_tasks() == tasks_before  # nor left running


async def test_checking_a_parent_holds_a_bounded_number_of_segments(tmp_path: Path) -> None:
    # `all_stored` (a push checking its parent version is still whole) checked 256 segments
    # at once, a task each, each fetched segment held until written to the cache.
    store = _CountingStore()
    repo = Repository(store, tmp_path / "cache", fetch_concurrency=FETCHES)
    _, refs = await _version(repo, SEGMENTS)
    store.missing = manifest_key(refs[-1].digest)  # so the check ends before the packs
    tasks_before = len(asyncio.all_tasks())
    assert await repo.all_stored(refs) is False
    assert store.reads == SEGMENTS - 1
    assert store.peak_tasks <= tasks_before + 4 * FETCHES
    # A batch of four times the concurrency; as in prefetch, a thread pool's work item may
    # still hold a segment already written for a moment (17 of 16 seen once, on a loaded
    # machine), so one concurrency more. Before, a batch held 256.
    assert store.peak_alive <= 5 * FETCHES


class _DownForReads(MemoryStore):
    """Lists its packs, but refuses every read once the listing is waiting for room in
    `pack_listing`'s queue (more than two batches listed): a store going down mid-run."""

    def __init__(self) -> None:
        super().__init__()
        self.listed = 0
        self.queue_full = asyncio.Event()

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in super().list(prefix, start_after):
            self.listed += 1
            if self.listed > 2 * reindex_module.BATCH:  # a batch read, a queue full
                self.queue_full.set()
            yield info

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        await self.queue_full.wait()
        raise StoreUnavailable("the store went away")


async def test_failed_reindex_runs_leave_no_task_behind(make_site: MakeSite) -> None:
    # The listing was left to the event loop's finaliser, and its producer, cancelled,
    # waited for ever for room in the full queue to put its end mark: two tasks a run.
    store = _DownForReads()
    for i in range(3 * reindex_module.BATCH):
        await store.put(pack_key(i.to_bytes(2, "big") * 16), bytes(1000))  # never read
    env = await make_site("site-a")
    site = await Site.open(env.config, store=store)
    try:
        reindexer = Reindexer(site, 10)
        before = asyncio.all_tasks()
        for _ in range(3):
            store.listed = 0
            store.queue_full.clear()
            assert await reindexer.run_once() is False  # the failure is logged
            assert store.queue_full.is_set()
            for _ in range(5):  # let anything scheduled by the failure run
                await asyncio.sleep(0)
            assert asyncio.all_tasks() == before
    finally:
        await site.close()
