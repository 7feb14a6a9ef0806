"""Review of the push heal pass: what a no-op push leaves lost, progress across passes, and
the background checks' tasks (bounded, none left running after a failure)."""

from __future__ import annotations

import asyncio
import os

import pytest

from datamover.domain.manifest import ChunkRef
from datamover.errors import StoreUnavailable
from datamover.repo.layout import manifest_key
from datamover.transfer import reuse
from datamover.transfer.push import push
from datamover.transfer.reuse import ReuseCheck
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite
from tests.treegen import snapshot, three_packs

KiB = 1 << 10


async def test_a_lost_manifest_list_is_uploaded_again(make_site: MakeSite) -> None:
    """An unchanged push answers with the parent version: its list must be in the store."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x").mkdir()
    for i in range(5):
        (a.data / "x" / f"f{i}").write_text(f"file {i}\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/x")
        doc = await site_a.repo.read_version("/proj/x", first.version)
        listing = manifest_key(doc.manifest_digest)
        await site_a.store.delete(listing)  # site A still has it in its local cache

        again = await push(site_a, "/proj/x")
        assert again.unchanged and again.version == first.version
        assert await site_a.repo.stored(listing)
        await stage(site_b, "/proj/x")  # site B has no cache: it reads the store
        assert snapshot(b.data / "x") == snapshot(a.data / "x")
    finally:
        await site_a.close()
        await site_b.close()


class _Counting:
    def __init__(self) -> None:
        self.files = self.bytes = 0

    def total(self, files: int | None, nbytes: int | None) -> None:
        pass

    def advance(self, files: int, nbytes: int) -> None:
        self.files += files
        self.bytes += nbytes


async def test_a_heal_pass_does_not_count_files_twice(make_site: MakeSite) -> None:
    a = await make_site("site-a", pack_size=1024 * KiB)
    three_packs(a.data / "x")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/x")
        packs = sorted([o.key async for o in site_a.store.list("packs/")])
        await site_a.store.delete(packs[1])
        progress = _Counting()
        healed = await push(site_a, "/proj/x", progress=progress)
        assert healed.files_read > 0  # a heal pass ran
        assert (progress.files, progress.bytes) == (40, 40 * 64 * KiB)
    finally:
        await site_a.close()


async def test_a_heal_pass_counts_every_new_chunk(make_site: MakeSite) -> None:
    """Chunks the first pass uploaded are found in the index by the heal pass; the summary
    still counts them, as it counts their packs."""
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(os.urandom(10 * KiB))
    site_a = await a.open()
    try:
        await push(site_a, "/proj/x")
        [key] = [o.key async for o in site_a.store.list("packs/")]
        await site_a.store.delete(key)
        (a.data / "x" / "g").write_bytes(os.urandom(10 * KiB))
        result = await push(site_a, "/proj/x")
        assert result.packs == 2  # g's pack in the first pass, f's in the heal pass
        assert result.new_chunks == 2 and result.new_chunk_bytes == 20 * KiB
    finally:
        await site_a.close()


class _SlowRepo:
    """`stored_size` that waits until released; counts the calls under way."""

    def __init__(self, fail: str | None = None) -> None:
        self.running = self.peak = 0
        self.release = asyncio.Event()
        self.fail = fail

    async def stored_size(self, key: str) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if key == self.fail:
                raise StoreUnavailable("HEAD failed")
            await self.release.wait()
            return 1 << 20
        finally:
            self.running -= 1

    async def stored(self, key: str) -> bool:
        return await self.stored_size(key) is not None


def _refs(n: int) -> list[ChunkRef]:
    return [ChunkRef(os.urandom(32), os.urandom(32), 0, 1, 1, 0) for _ in range(n)]


async def _feed(check: ReuseCheck, refs: list[ChunkRef]) -> None:
    """What `_build` does with each reused reference."""
    for ref in refs:
        check.chunks([ref])
        if getattr(check, "full", lambda: False)():
            await check.flush()


async def test_reuse_checks_in_flight_are_bounded() -> None:
    """The walk of a no-op push outruns the HEADs: checks waiting for their turn must not
    pile up, one task per pack of the whole dataset."""
    repo = _SlowRepo()
    check = ReuseCheck(repo)  # type: ignore[arg-type]
    feeding = asyncio.create_task(_feed(check, _refs(40 * reuse._BATCH)))
    await asyncio.sleep(0.2)
    assert repo.running <= 8 * reuse._BATCH  # not 40 batches at once
    repo.release.set()
    await feeding
    assert await check.missing() == (set(), set())
    assert repo.peak <= 8 * reuse._BATCH


async def test_a_failed_reuse_check_leaves_nothing_running() -> None:
    refs = _refs(reuse._BATCH)
    from datamover.chunking.pack import pack_key

    repo = _SlowRepo(fail=pack_key(refs[3].pack))
    check = ReuseCheck(repo)  # type: ignore[arg-type]
    await _feed(check, refs)
    with pytest.raises(StoreUnavailable):
        await check.missing()
    await check.cancel()
    await asyncio.sleep(0)
    assert repo.running == 0  # the other HEADs of the batch were stopped


async def _cut_short(store, key: str) -> None:
    """Put back the first half of the object `key` (a copy interrupted, a restore cut)."""
    data = await store.get(key)
    await store.put(key, data[: len(data) // 2])


@pytest.mark.parametrize("again", ["x", "y"])
async def test_a_pack_cut_short_in_the_store_is_not_reused(make_site: MakeSite, again: str) -> None:
    """A pack the store holds only in part is lost for reuse: a push of the unchanged tree
    (`x`, reusing the parent's references) reads the lost pack's files again, and one of
    the same bytes under another path (`y`, deduplicating through the chunk index)
    uploads them again; either version stages whole elsewhere. (HEAD only asked whether
    the pack existed: the first answered "unchanged", the second pointed its version into
    the pack, and every later stage of the dataset was corrupt.)"""
    a, b = await make_site("site-a", pack_size=1024 * KiB), await make_site("site-b")
    three_packs(a.data / "x")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        packs = sorted([o.key async for o in site_a.store.list("packs/")])
        await _cut_short(site_a.store, packs[1])
        if again == "y":
            (a.data / "y").mkdir()
            for f in (a.data / "x").iterdir():
                (a.data / "y" / f.name).write_bytes(f.read_bytes())
        result = await push(site_a, f"/proj/{again}")
        assert result.files_read > 0 and result.new_chunks > 0  # the cut pack's chunks
        await stage(site_b, f"/proj/{again}", version=result.version)
        assert snapshot(b.data / again) == snapshot(a.data / again)
    finally:
        await site_a.close()
        await site_b.close()


async def test_one_files_packs_are_headed_a_batch_at_a_time() -> None:
    # One huge file's chunks span thousands of packs, all passed in one `chunks` call: its
    # batch was HEADed all at once (a task each, ~1.6 KB a pack: 496 MiB for 300,000).
    repo = _SlowRepo()
    check = ReuseCheck(repo)  # type: ignore[arg-type]
    check.chunks(_refs(20 * reuse._BATCH))
    await check.flush()
    await asyncio.sleep(0.2)
    assert 0 < repo.running <= reuse._BATCH
    repo.release.set()
    assert await check.missing() == (set(), set())
    assert repo.peak <= reuse._BATCH
