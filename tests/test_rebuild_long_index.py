"""`db rebuild` reads a long pack index in runs, in bounded memory (`PackIndex`).

Before, the whole index was read and parsed at once: a trailer may claim up to 2^24
entries (800 MB of index, several GB as entries), and the daemon rebuilds on a timer.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import blake3
import pytest

from datamover.catalog.engine import open_engine
from datamover.catalog.queries import Catalog
from datamover.chunking.pack import ENTRY_SIZE, TRAILER_SIZE, pack_key, parse_pack
from datamover.errors import Corrupt
from datamover.repo import reindex as reindex_module
from datamover.repo.reindex import read_checked, read_index, reindex
from datamover.storage.memory import MemoryStore
from tests.test_rebuild import _pack

RUN = 7  # entries a run in these tests


@pytest.fixture(autouse=True)
def _short_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reindex_module, "INDEX_RUN", RUN)
    monkeypatch.setattr(reindex_module, "FIRST_READ", 4096)


@pytest.fixture
async def catalog(catalog_url: str) -> AsyncIterator[Catalog]:
    opened = Catalog(await open_engine(catalog_url))
    yield opened
    await opened.close()


class _Recording(MemoryStore):
    """A memory store that records the length of every ranged get, and can hand back
    other bytes from the `tamper_at`-th get on."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []
        self.tamper_at: int | None = None

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = await super().get(key, offset, length)
        self.lengths.append(len(data))
        if self.tamper_at is not None and len(self.lengths) >= self.tamper_at and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


def _chunks(n: int, tag: str = "") -> list[bytes]:
    return [f"{tag} chunk {i} ".encode() * 3 for i in range(n)]


async def test_a_long_index_is_read_in_runs_of_bounded_size() -> None:
    store = _Recording()
    pack_id, data = _pack(_chunks(100))
    key = pack_key(pack_id)
    await store.put(key, data)
    entries, read = await read_index(store, key, len(data))
    assert entries == parse_pack(data, pack_id)
    index = 100 * ENTRY_SIZE
    # The first read of the tail, then the index twice (checked, then handed on).
    assert read == 4096 + 2 * index
    assert max(store.lengths[1:]) <= RUN * ENTRY_SIZE
    store.lengths.clear()
    checked, read = await read_checked(store, key, len(data), pack_id)
    assert checked == entries
    assert max(store.lengths[1:]) <= max(RUN * ENTRY_SIZE, reindex_module.DATA_SPAN)


def _retrailed(data: bytes, count: int, index: bytes) -> bytes:
    """`data` with its index replaced by `index` and a trailer whose digest matches it."""
    data_size = len(data) - TRAILER_SIZE - count * ENTRY_SIZE
    trailer = bytearray(data[-TRAILER_SIZE:])
    trailer[:32] = blake3.blake3(index).digest()
    return data[:data_size] + index + bytes(trailer)


async def test_a_long_index_bad_in_its_last_run_records_nothing(catalog: Catalog) -> None:
    store = MemoryStore()
    _, data = _pack(_chunks(50))
    data_size = len(data) - TRAILER_SIZE - 50 * ENTRY_SIZE
    index = bytearray(data[data_size:-TRAILER_SIZE])
    last = 48 * ENTRY_SIZE  # an entry of the last run: its codec made unknown
    index[last + 48] = 9
    bad = _retrailed(data, 50, bytes(index))
    await store.put(pack_key(blake3.blake3(bad).digest()), bad)
    result = await reindex(store, catalog, concurrency=2)
    assert result.corrupt_count == 1 and "unknown codec 9" in result.corrupt[0][1]
    assert await catalog.count_chunks() == 0  # no run of it was recorded
    assert result.packs_indexed == 0


async def test_an_index_that_changes_between_its_two_reads_is_refused(catalog: Catalog) -> None:
    store = _Recording()
    pack_id, data = _pack(_chunks(30))
    await store.put(pack_key(pack_id), data)
    # Get 1 is the tail, gets 2-6 the first pass's runs; the second pass's third run differs.
    store.tamper_at = 1 + 5 + 3
    result = await reindex(store, catalog, concurrency=1)
    assert result.corrupt_count == 1
    assert result.corrupt[0][1] == "its index changed while it was read"
    assert result.packs_indexed == 0 and await catalog.known_packs([pack_id]) == set()
    store.tamper_at = None
    again = await reindex(store, catalog, concurrency=1)  # read again, as not recorded
    assert again.packs_indexed == 1 and await catalog.count_chunks() == 30


@pytest.mark.parametrize("flush_rows", [1, 5, 50_000])
async def test_long_indexes_are_recorded_across_transactions(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog, flush_rows: int
) -> None:
    monkeypatch.setattr(reindex_module, "FLUSH_ROWS", flush_rows)
    store = MemoryStore()
    digests: set[bytes] = set()
    for p in range(6):
        chunks = _chunks(3 + 9 * p, f"pack {p}")
        digests.update(blake3.blake3(c).digest() for c in chunks)
        pack_id, data = _pack(chunks)
        await store.put(pack_key(pack_id), data)
    result = await reindex(store, catalog, concurrency=3, read_data=flush_rows == 5)
    assert (result.packs_indexed, result.corrupt_count) == (6, 0)
    assert result.chunks_indexed == len(digests) == sum(3 + 9 * p for p in range(6))
    assert set(await catalog.lookup_chunks(sorted(digests))) == digests


async def test_read_data_of_a_long_index_names_a_bad_chunk_and_keeps_the_pack_unknown(
    catalog: Catalog,
) -> None:
    store = MemoryStore()
    chunks = _chunks(40)
    pack_id, data = _pack(chunks)
    entries = parse_pack(data, pack_id)
    bad = bytearray(data)
    bad[entries[30].offset] ^= 1  # in the fifth run
    await store.put(pack_key(pack_id), bytes(bad))
    with pytest.raises(Corrupt, match=f"chunk at offset {entries[30].offset}: "):
        await read_checked(store, pack_key(pack_id), len(bad), pack_id)
    result = await reindex(store, catalog, concurrency=1, read_data=True)
    assert result.corrupt_count == 1 and result.packs_indexed == 0
    assert await catalog.known_packs([pack_id]) == set()
    # The runs before the bad chunk were each read and checked: their chunks are sound.
    known = await catalog.lookup_chunks([e.digest for e in entries])
    assert 0 < len(known) <= 28 and entries[30].digest not in known


async def test_a_pack_under_another_name_fails_the_read_data_check(catalog: Catalog) -> None:
    store = MemoryStore()
    _, data = _pack(_chunks(20))
    other = b"\x07" * 32
    await store.put(pack_key(other), data)
    with pytest.raises(Corrupt, match="do not match its name"):
        await read_checked(store, pack_key(other), len(data), other)
    result: Any = await reindex(store, catalog, concurrency=1, read_data=True)
    assert result.corrupt_count == 1 and await catalog.known_packs([other]) == set()


def test_the_trailer_still_bounds_the_count() -> None:
    from datamover.chunking.pack import MAGIC, parse_trailer

    tail = b"\0" * 32 + struct.pack("<II", (1 << 24) + 1, 0) + MAGIC
    with pytest.raises(Corrupt, match="malformed"):
        parse_trailer(tail)
