"""Memory and task bounds of store-wide loops.

`Repository.prefetch` warms the manifest cache with a bounded number of segments in memory
and of tasks, however long the manifest.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import blake3
import pytest

from datamover.errors import Corrupt, ObjectNotFound
from datamover.repo.layout import VersionDoc, manifest_key
from datamover.repo.manifest import SegmentRef, encode_list
from datamover.repo.repository import Repository, utc_now
from datamover.storage.memory import MemoryStore

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
