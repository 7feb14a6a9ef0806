"""`datamover db rebuild`: a site learns the chunks already in the store from the packs'
indexes, so its pushes send nothing that is stored, whoever stored it."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import blake3
import pytest

from datamover.catalog.engine import open_engine
from datamover.catalog.queries import Catalog
from datamover.chunking.pack import ENTRY_SIZE, TRAILER_SIZE, PackBuilder, pack_key, parse_pack
from datamover.domain.manifest import ChunkRef, Codec
from datamover.errors import Corrupt, StoreUnavailable
from datamover.repo import reindex as reindex_module
from datamover.repo.reindex import (
    pack_id_of,
    pack_listing,
    read_checked,
    read_index,
    reindex,
)
from datamover.scheduler.reindexing import Reindexer
from datamover.storage.base import ObjectInfo
from datamover.storage.memory import MemoryStore
from datamover.storage.s3 import S3Store
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_daemon import StartSite, free_port
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.treegen import make_tree, snapshot


@pytest.fixture
async def catalog(catalog_url: str) -> AsyncIterator[Catalog]:
    """A catalog of its own (on SQLite and on PostgreSQL), closed after the test."""
    opened = Catalog(await open_engine(catalog_url))
    yield opened
    await opened.close()


def _json_exit(env: SiteEnv, *args: str, status: int) -> dict[str, Any]:
    """Run a command with `--json`, expecting exit `status`; return its JSON object."""
    proc = env.cli(*args, "--json")
    assert proc.returncode == status, proc.stderr
    return json.loads(proc.stdout)


def _pack(chunks: list[bytes]) -> tuple[bytes, bytes]:
    """`(pack_id, pack bytes)` of raw chunks, each named by its own digest."""
    b = PackBuilder()
    for c in chunks:
        b.add(blake3.blake3(c).digest(), c, len(c), Codec.RAW)
    pack_id, view = b.finish()
    return pack_id, bytes(view)


async def _put_pack(store: Any, chunks: list[bytes]) -> tuple[str, bytes, bytes]:
    """Store a pack of raw `chunks` in `store`; return its key, id and bytes."""
    pack_id, data = _pack(chunks)
    await store.put(pack_key(pack_id), data)
    return pack_key(pack_id), pack_id, data


async def test_a_new_site_pushes_no_chunk_another_site_stored(make_site: MakeSite) -> None:
    a, b, c = await make_site("site-a"), await make_site("site-b"), await make_site("site-c")
    make_tree(a.data / "run1")
    shutil.copytree(a.data / "run1", b.data / "copy-b", symlinks=True)
    shutil.copytree(a.data / "run1", c.data / "copy", symlinks=True)
    site_a, site_b, site_c = await a.open(), await b.open(), await c.open()
    try:
        first = await push(site_a, "/proj/run1")

        # Without the index, site B uploads the same chunks again.
        unindexed = await push(site_b, "/proj/copy-b")  # its own dataset, same files
        assert unindexed.new_chunks == first.new_chunks > 0

        built = await reindex(site_c.store, site_c.catalog, concurrency=4)
        packs = [o async for o in site_c.store.list("packs/")]
        assert built.ok and built.packs == len(packs) == built.packs_indexed
        assert built.packs_known == 0 and built.foreign_keys == 0
        assert built.chunks_indexed == await site_c.catalog.count_chunks()
        assert built.chunks_indexed >= await site_a.catalog.count_chunks()

        indexed = await push(site_c, "/proj/copy")
        assert indexed.files == first.files and indexed.new_chunks == indexed.packs == 0
        assert indexed.uploaded_bytes < unindexed.uploaded_bytes / 10  # manifests only
        staged = await stage(site_a, "/proj/copy")
        assert staged.version == indexed.version
        assert snapshot(a.data / "copy") == snapshot(a.data / "run1")
        assert (await verify(site_a, "/proj/copy")).ok

        again = await reindex(site_c.store, site_c.catalog, concurrency=4)
        assert again.packs_indexed == 0 and again.bytes_read == 0
        assert (
            again.packs_known == again.packs == len([o async for o in site_c.store.list("packs/")])
        )
    finally:
        for s in (site_a, site_b, site_c):
            await s.close()


@pytest.mark.parametrize("first_read", [TRAILER_SIZE + 3, 4096, 16 << 10, 1 << 20])
async def test_the_index_is_read_from_the_tail_in_one_read_or_two(
    monkeypatch: pytest.MonkeyPatch, first_read: int
) -> None:
    monkeypatch.setattr(reindex_module, "FIRST_READ", first_read)
    store = MemoryStore()
    chunks = [bytes([i]) * (100 + i) for i in range(200)]
    key, pack_id, data = await _put_pack(store, chunks)
    entries, read = await read_index(store, key, len(data))
    assert entries == parse_pack(data, pack_id)
    index_size = TRAILER_SIZE + len(chunks) * ENTRY_SIZE
    assert read == max(index_size, min(first_read, len(data)))


@pytest.mark.parametrize("flush_rows", [1, 7, 50_000])
async def test_packs_are_recorded_whatever_the_transactions_hold(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog, flush_rows: int
) -> None:
    monkeypatch.setattr(reindex_module, "FLUSH_ROWS", flush_rows)
    monkeypatch.setattr(reindex_module, "BATCH", 8)  # three batches, the last one short
    store = MemoryStore()
    digests: set[bytes] = set()
    for p in range(20):
        chunks = [f"pack {p} chunk {i}".encode() for i in range(p % 5 + 1)]
        digests.update(blake3.blake3(c).digest() for c in chunks)
        await _put_pack(store, chunks)
    result = await reindex(store, catalog, concurrency=3)
    assert (result.packs, result.packs_indexed, result.chunks_indexed) == (20, 20, 60)
    assert set(await catalog.lookup_chunks(sorted(digests))) == digests
    again = await reindex(store, catalog, concurrency=3)
    assert (again.packs_known, again.packs_indexed) == (20, 0)


@pytest.mark.parametrize("span", [1, 250, 1 << 20])
async def test_read_data_checks_a_pack_a_span_at_a_time(
    monkeypatch: pytest.MonkeyPatch, span: int
) -> None:
    monkeypatch.setattr(reindex_module, "DATA_SPAN", span)
    store = MemoryStore()
    chunks = [bytes([i]) * (100 + i) for i in range(20)]
    key, pack_id, data = await _put_pack(store, chunks)
    entries, read = await read_checked(store, key, len(data), pack_id)
    assert entries == parse_pack(data, pack_id) and read >= len(data)

    bad = bytearray(data)
    bad[entries[7].offset + 3] ^= 1  # a chunk's byte: its digest no longer matches
    await store.put(key, bytes(bad))
    with pytest.raises(Corrupt, match=f"chunk at offset {entries[7].offset}: "):
        await read_checked(store, key, len(bad), pack_id)
    other = pack_key(b"\x07" * 32)
    await store.put(other, data)  # sound, under a name that is not its digest
    with pytest.raises(Corrupt, match="do not match its name"):
        await read_checked(store, other, len(data), b"\x07" * 32)


async def test_chunks_already_indexed_are_not_counted_again(catalog: Catalog) -> None:
    store = MemoryStore()
    shared = b"in both packs"
    for chunks in ([shared, b"only in the first"], [shared, b"only in the second"]):
        await _put_pack(store, chunks)
    result = await reindex(store, catalog, concurrency=2)
    assert (result.packs_indexed, result.chunks_indexed) == (2, 3)
    assert await catalog.count_chunks() == 3


async def test_a_pack_gone_before_it_is_read_is_counted_not_corrupt(
    catalog: Catalog,
) -> None:
    class Vanishing(MemoryStore):
        async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            await self.delete(key)  # removed (by GC, say) after the listing named it
            return await super().get(key, offset, length)

    store = Vanishing()
    await _put_pack(store, [b"soon gone"])
    result = await reindex(store, catalog, concurrency=2)
    assert (result.packs, result.vanished, result.packs_indexed) == (1, 1, 0)
    assert result.ok and result.corrupt_count == 0


async def test_writers_of_overlapping_chunks_in_opposite_orders_do_not_deadlock(
    new_catalog: Any,
) -> None:
    # Two daemons sharing a catalog index packs of other sites holding the same chunks,
    # each finishing them in another order; on PostgreSQL their transactions deadlocked.
    url = await new_catalog()
    first, second = Catalog(await open_engine(url)), Catalog(await open_engine(url))

    def refs(pack: bytes, tag: str) -> list[ChunkRef]:
        return [
            ChunkRef(f"{tag}{i}".encode().ljust(32, b"\0"), pack, i, 1, 1, 0) for i in range(3000)
        ]

    a1, b1, a2, b2 = (bytes([k]) * 32 for k in (1, 2, 3, 4))
    try:
        added = await asyncio.gather(
            first.add_packs([(a1, 1, refs(a1, "a")), (b2, 1, refs(b2, "b"))]),
            second.add_packs([(b1, 1, refs(b1, "b")), (a2, 1, refs(a2, "a"))]),
        )
        assert sum(added) == 6000 == await first.count_chunks()
        assert await first.known_packs([a1, b1, a2, b2]) == {a1, b1, a2, b2}
    finally:
        await first.close()
        await second.close()


async def test_a_cancelled_run_keeps_what_it_recorded_and_the_next_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog
) -> None:
    monkeypatch.setattr(reindex_module, "FLUSH_ROWS", 1)  # each pack recorded on its own
    monkeypatch.setattr(reindex_module, "BATCH", 4)
    reads = 0
    stalled = asyncio.Event()

    class Stalling(MemoryStore):
        async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
            nonlocal reads
            reads += 1
            if reads > 5:
                stalled.set()
                await asyncio.sleep(3600)  # a store that stopped answering
            return await super().get(key, offset, length)

    store = Stalling()
    for p in range(12):
        await _put_pack(store, [f"chunk of pack {p}".encode()])
    run = asyncio.ensure_future(reindex(store, catalog, concurrency=1))
    await asyncio.wait_for(stalled.wait(), 30)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    recorded = await catalog.count_chunks()
    assert recorded == 5  # the packs read before the stall, each in its transaction
    reads = -1000  # the store answers again
    result = await reindex(store, catalog, concurrency=2)
    assert (result.packs_known, result.packs_indexed) == (5, 7)
    assert await catalog.count_chunks() == 12


async def test_a_catalog_outage_in_the_daemon_is_one_warning(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.exc import OperationalError

    a = await make_site("site-a")
    site = await a.open()
    try:
        await _put_pack(site.store, [b"x"])

        async def locked(ids: Any) -> set[bytes]:
            raise OperationalError("SELECT", {}, Exception("database is locked"))

        monkeypatch.setattr(site.catalog, "known_packs", locked)
        caplog.set_level(logging.INFO, "datamover.scheduler.reindexing")
        assert await Reindexer(site, 10).run_once() is False
        [warning] = caplog.records
        assert warning.levelno == logging.WARNING and warning.exc_info is None
        assert warning.message == (
            "indexing the store's packs failed, tried again in 10 minutes: "
            "catalog unavailable: database is locked"
        )
    finally:
        await site.close()


async def test_the_listing_covers_every_prefix_and_ends_on_a_listing_error() -> None:
    store = MemoryStore()
    keys = {pack_key(bytes([i]) + bytes(31)) for i in range(256)}
    keys |= {pack_key(bytes([7]) + bytes([i]) * 31) for i in range(1, 40)}
    for key in keys:
        await store.put(key, b"x")
    await store.put("packs-not/00/x", b"x")
    assert {info.key async for info in pack_listing(store)} == keys

    class Failing(MemoryStore):
        def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
            if prefix == "packs/80/":
                raise StoreUnavailable("listing packs/80/ failed")
            return super().list(prefix, start_after)

    failing = Failing()
    for key in keys:
        await failing.put(key, b"x")
    seen = 0
    with pytest.raises(StoreUnavailable, match="packs/80/"):
        async for _ in pack_listing(failing):
            seen += 1
    assert seen < len(keys)
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in tasks if "lister" in repr(t.get_coro())]  # none left running


def test_only_pack_keys_name_packs() -> None:
    h = "ab" + "0" * 62
    assert pack_id_of(f"packs/ab/{h}") == bytes.fromhex(h)
    for key in (
        f"packs/cd/{h}",
        f"packs/ab/{h}x",
        f"packs/ab/{h}\n",  # `$` matched before a final newline
        f"packs/ab/{h.upper()}",
        "packs/ab/x",
        "packs/x",
    ):
        assert pack_id_of(key) is None


async def _seed_bad_packs(store: object) -> dict[str, str]:
    """Put packs the index check must refuse; return key -> what is wrong with it."""
    good_id, good = _pack([b"good chunk"])
    bad: dict[str, str] = {}
    garbage = b"x" * 500
    key = pack_key(blake3.blake3(garbage).digest())
    await store.put(key, garbage)  # type: ignore[attr-defined]
    bad[key] = "magic"
    flipped = bytearray(good)
    flipped[len(good) - TRAILER_SIZE - ENTRY_SIZE + 40] ^= 1  # a length in the index
    key = pack_key(blake3.blake3(flipped).digest())
    await store.put(key, bytes(flipped))  # type: ignore[attr-defined]
    bad[key] = "digest mismatch"
    short = good[:30]
    key = pack_key(blake3.blake3(short).digest())
    await store.put(key, short)  # type: ignore[attr-defined]
    bad[key] = "too short"
    await store.put(pack_key(good_id), good)  # type: ignore[attr-defined]
    await store.put("packs/ab/not-a-pack", b"?")  # type: ignore[attr-defined]
    await store.put("packs/zz/not-listed", b"?")  # type: ignore[attr-defined]
    return bad


async def test_corrupt_packs_are_named_and_not_indexed(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    site = await a.open()
    try:
        bad = await _seed_bad_packs(site.store)
    finally:
        await site.close()
    proc = a.cli("db", "rebuild")
    assert proc.returncode == 5, proc.stderr
    assert "4 packs in the store: 1 indexed now (1 chunk," in proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 3 and "Traceback" not in proc.stderr
    for key, why in bad.items():
        [line] = [ln for ln in lines if key in ln]
        assert "corrupt, not indexed" in line and why in line

    proc = a.cli("db", "rebuild", "--json")
    assert proc.returncode == 5, proc.stderr
    again = json.loads(proc.stdout)
    assert sorted(proc.stderr.splitlines()) == sorted(lines)  # the warnings with --json too
    assert again["packs_indexed"] == 0 and again["packs_known"] == 1
    assert again["corrupt_count"] == 3 and again["foreign_keys"] == 1
    assert {c["key"] for c in again["corrupt"]} == set(bad)


async def test_read_data_refuses_a_pack_whose_index_lies(make_site: MakeSite) -> None:
    """An index can be consistent in itself and still lie about a chunk's digest (bit rot
    before the pack was named, or a writer's bug); only reading the data shows it."""
    a, b = await make_site("site-a"), await make_site("site-b")
    chunk = b"the real bytes" * 100
    b_ = PackBuilder()
    b_.add(blake3.blake3(b"other bytes").digest(), chunk, len(chunk), Codec.RAW)
    pack_id, view = b_.finish()
    site = await a.open()
    try:
        await site.store.put(pack_key(pack_id), bytes(view))
    finally:
        await site.close()

    checked = _json_exit(a, "db", "rebuild", "--read-data", status=5)
    assert checked["packs_indexed"] == 0 and checked["read_data"] is True
    [corrupt] = checked["corrupt"]
    assert corrupt["key"] == pack_key(pack_id) and "offset 0" in corrupt["error"]

    trusted = b.cli_json("db", "rebuild")  # the index alone is consistent: indexed
    assert trusted["packs_indexed"] == 1 and trusted["chunks_indexed"] == 1


async def test_read_data_indexes_sound_packs(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "run1")
    site = await a.open()
    try:
        await push(site, "/proj/run1")
        chunks = await site.catalog.count_chunks()
        sizes = [o.size async for o in site.store.list("packs/")]
    finally:
        await site.close()
    built = b.cli_json("db", "rebuild", "--read-data")
    assert built["packs_indexed"] == built["packs"] == len(sizes) >= 1
    assert built["corrupt_count"] == 0 and built["chunks_indexed"] == chunks
    # Every byte of every pack, and the first read of its tail once more.
    assert sum(sizes) < built["bytes_read"] <= sum(sizes) + len(sizes) * reindex_module.FIRST_READ


async def test_an_unreachable_store_ends_in_one_error_line(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    text = a.config_path.read_text()
    endpoint = a.config.store.endpoint
    a.config_path.write_text(text.replace(endpoint, f"http://127.0.0.1:{free_port()}"))
    proc = a.cli("db", "rebuild")
    assert proc.returncode == 6, proc.stderr  # TransientError: worth running again later
    assert "Traceback" not in proc.stderr
    *retries, line = proc.stderr.splitlines()
    assert line.startswith("datamover: error:") and "unavailable" in line
    assert all("WARNING" in r and "resuming in" in r for r in retries)


async def test_the_daemon_indexes_packs_other_sites_stored(
    make_site: MakeSite, served_site: StartSite
) -> None:
    a = await make_site("site-a")
    make_tree(a.data / "run1")
    pushed = a.cli_json("push", "/proj/run1")
    d = await served_site("site-b", api={"reindex_minutes": 1})
    deadline = time.monotonic() + 30
    line = 'datamover_packs_indexed_total{site="site-b"} 1.0'
    while line not in d.request("GET", "/metrics")[1]:
        assert time.monotonic() < deadline, d.log()
        await asyncio.sleep(0.1)
    assert "indexed 1 new packs of the store (34 chunks)" in d.log()

    shutil.copytree(a.data / "run1", d.env.data / "copy", symlinks=True)
    token = d.token("t1", "/proj", "write")
    status, t = d.request("POST", "/v1/transfers", token, {"kind": "push", "path": "/proj/copy"})
    assert status == 201, t
    done = d.wait(t["id"], token)
    assert done["state"] == "succeeded", done
    assert done["result"]["new_chunks"] == 0 and done["result"]["files"] == pushed["files"]


async def test_each_run_indexes_only_new_packs_and_outages_are_one_warning(
    make_site: MakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    make_tree(a.data / "run1")
    make_tree(a.data / "run2", seed=2)
    site_a, site_b = await a.open(), await b.open()
    try:
        reindexer = Reindexer(site_b, 1.0)
        assert reindexer.every == 60.0
        await push(site_a, "/proj/run1")
        caplog.set_level(logging.INFO, "datamover.scheduler.reindexing")
        assert await reindexer.run_once() is False
        first = await site_b.catalog.count_chunks()
        assert first == await site_a.catalog.count_chunks() > 0
        await push(site_a, "/proj/run2")
        await reindexer.run_once()
        assert await site_b.catalog.count_chunks() == await site_a.catalog.count_chunks() > first
        assert [r.message.split(" (")[0] for r in caplog.records] == [
            "indexed 1 new packs of the store",
            "indexed 1 new packs of the store",
        ]

        caplog.clear()
        await site_b.store.close()
        site_b.store = S3Store(
            f"http://127.0.0.1:{free_port()}", "nowhere", access_key="k", secret_key="s"
        )
        assert await reindexer.run_once() is False
        [warning] = caplog.records
        assert warning.levelno == logging.WARNING
        assert warning.message.startswith(
            "indexing the store's packs failed, tried again in 1 minute: "
        )
    finally:
        await site_a.close()
        await site_b.close()
