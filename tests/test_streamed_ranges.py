"""Streamed ranges (`storage.base.get_into`): every store, the threaded HTTP path, the
retrying wrapper's resume, `ChunkSink`, and a large file's stage reading each pack in one
request.

The S3 stores are a real SeaweedFS (the conformance suite's `store` fixture); what only a
misbehaving server shows (a body cut short, a server ignoring Range) uses `test_direct`'s
local HTTP server.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import blake3
import pytest

from datamover.chunking.codec import Codec
from datamover.domain.manifest import ChunkRef
from datamover.errors import Corrupt, ObjectNotFound, StoreUnavailable
from datamover.storage.base import SinkFailed, Store, feed, get_into
from datamover.storage.direct import DirectGetter, Unstreamable
from datamover.storage.memory import MemoryStore
from datamover.storage.retry import RetryingStore, RetryPolicy
from datamover.transfer import stage as stage_module
from datamover.transfer.fetch import ChunkSink, Fetcher, Range
from datamover.transfer.push import push
from datamover.transfer.stage import StageResult, stage
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.test_direct import DATA, getter, partial, server  # noqa: F401 (fixtures)
from tests.test_store_conformance import backend, store  # noqa: F401 (fixtures)

MiB = 1 << 20


class Collect:
    """A `ByteSink` keeping what it takes, in views of at most `piece` bytes; it raises
    `fail` once it holds `fail_after` bytes or more."""

    def __init__(
        self, piece: int = 1000, fail_after: int | None = None, fail: Exception | None = None
    ) -> None:
        self.buf = bytearray(piece)
        self.data = bytearray()
        self.fail_after, self.fail = fail_after, fail

    def view(self) -> memoryview:
        return memoryview(self.buf)

    def took(self, n: int) -> None:
        self.data += self.buf[:n]
        if self.fail_after is not None and len(self.data) >= self.fail_after:
            assert self.fail is not None
            raise self.fail


# -- every store ----------------------------------------------------------------------------


async def test_get_into_streams_the_range_cut_at_the_end(store: Store) -> None:  # noqa: F811
    data = os.urandom(3 * MiB + 17)
    await store.put("k/obj", data)
    try:
        for offset, length in [(0, len(data)), (12345, 2 * MiB + 1), (len(data) - 10, 100)]:
            sink = Collect(piece=65536 + 3)
            got = await get_into(store, "k/obj", offset, length, sink)
            assert bytes(sink.data) == data[offset : offset + length]
            assert got == len(sink.data)
        sink = Collect()
        assert await get_into(store, "k/obj", 5, 0, sink) == 0 and not sink.data
        with pytest.raises(ObjectNotFound):
            await get_into(store, "k/missing", 0, 10, Collect())
    finally:
        await store.close()


async def test_a_sinks_own_error_reaches_the_caller_unchanged(store: Store) -> None:  # noqa: F811
    # A full disk while a stream is written is the disk's error, not the store's: it must
    # not be retried or reported as the store unavailable.
    await store.put("k/obj", os.urandom(2 * MiB))
    try:
        full = OSError(28, "No space left on device")
        sink = Collect(piece=65536, fail_after=MiB, fail=full)
        with pytest.raises(OSError) as caught:
            await get_into(store, "k/obj", 0, 2 * MiB, sink)
        assert caught.value is full
        assert not isinstance(caught.value, StoreUnavailable)
    finally:
        await store.close()


# -- the threaded HTTP path -----------------------------------------------------------------


async def test_direct_stream_fills_the_sink_and_keeps_the_connection(
    server: tuple[str, dict[str, Any]],  # noqa: F811
    getter: DirectGetter,  # noqa: F811
) -> None:
    url, state = server
    for offset, length in [(0, len(DATA)), (100, 5000)]:
        sink = Collect(piece=777)
        assert await getter.stream(url, offset, length, sink) == length
        assert bytes(sink.data) == DATA[offset : offset + length]
    assert state["served"] == 2 and len(state["connections"]) == 1


async def test_direct_stream_leaves_an_answer_it_does_not_stream_untouched(
    server: tuple[str, dict[str, Any]],  # noqa: F811
    getter: DirectGetter,  # noqa: F811
) -> None:
    url, state = server

    def whole(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
        handler.send_response(200)  # Range ignored
        handler.send_header("Content-Length", str(len(DATA)))
        handler.end_headers()
        handler.wfile.write(DATA)

    state["behaviour"] = whole
    sink = Collect()
    with pytest.raises(Unstreamable):
        await getter.stream(url, 10, 100, sink)
    assert not sink.data


async def test_direct_stream_cut_short_is_unavailable_after_the_bytes_that_came(
    server: tuple[str, dict[str, Any]],  # noqa: F811
    getter: DirectGetter,  # noqa: F811
) -> None:
    url, state = server

    def cut(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
        handler.send_header("Content-Length", str(last + 1 - first))
        handler.end_headers()
        handler.wfile.write(DATA[first : first + 3000])
        handler.wfile.flush()
        handler.close_connection = True

    state["behaviour"] = cut
    sink = Collect(piece=1000)
    with pytest.raises(StoreUnavailable):
        await getter.stream(url, 0, 8000, sink)
    assert bytes(sink.data) == DATA[:3000]


async def test_direct_stream_raises_the_sinks_error_as_sink_failed(
    server: tuple[str, dict[str, Any]],  # noqa: F811
    getter: DirectGetter,  # noqa: F811
) -> None:
    url, _ = server
    full = OSError(28, "No space left on device")
    with pytest.raises(SinkFailed) as caught:
        await getter.stream(url, 0, 8000, Collect(piece=1000, fail_after=2000, fail=full))
    assert caught.value.error is full


# -- resumed after a fault ------------------------------------------------------------------


class Breaking(MemoryStore):
    """Streams (its own `get_into`) that break off after `cuts[i]` bytes, one per call."""

    def __init__(self, cuts: list[int]) -> None:
        super().__init__()
        self.cuts = cuts
        self.calls: list[tuple[int, int]] = []

    async def get_into(self, key: str, offset: int, length: int, sink: Any, hold: int = 0) -> int:
        self.calls.append((offset, length))
        data = await self.get(key, offset, length)
        cut = self.cuts.pop(0) if self.cuts else None
        view = memoryview(data)
        fed = 0
        while fed < len(view) and (cut is None or fed < cut):
            dst = sink.view()
            n = min(len(dst), len(view) - fed, (cut - fed) if cut is not None else len(view))
            dst[:n] = view[fed : fed + n]
            sink.took(n)
            fed += n
        if cut is not None:
            raise StoreUnavailable(f"connection reset after {cut} bytes")
        return fed


async def test_a_retried_stream_resumes_after_the_bytes_the_sink_took() -> None:
    inner = Breaking([1500, 0, 2500])
    data = os.urandom(10000)
    await inner.put("k", data)
    retrying = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.001, maximum=0.01))
    sink = Collect(piece=700)
    assert await retrying.get_into("k", 100, 9000, sink) == 9000
    assert bytes(sink.data) == data[100:9100]
    # Each try starts where the sink stopped; the try that made no progress counts
    # towards the limit, the one after progress starts the count again.
    assert inner.calls == [(100, 9000), (1600, 7500), (1600, 7500), (4100, 5000)]


async def test_a_stream_that_makes_no_progress_gives_up() -> None:
    inner = Breaking([0, 0, 0])
    await inner.put("k", b"x" * 5000)
    retrying = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.001, maximum=0.01))
    with pytest.raises(StoreUnavailable, match="reset after 0 bytes"):
        await retrying.get_into("k", 0, 5000, Collect())
    assert len(inner.calls) == 3


# -- ChunkSink ------------------------------------------------------------------------------


def _range(chunks: Sequence[bytes], gaps: Sequence[int]) -> tuple[Range, bytes]:
    """A raw-coded range of `chunks`, `gaps[i]` bytes of filler before chunk i; the pack
    bytes from the range's start."""
    pack, body, refs, at = b"p" * 32, b"", [], 1000
    start = at + gaps[0]
    for chunk, gap in zip(chunks, gaps, strict=True):
        body += b"\xee" * gap
        at += gap
        refs.append(
            ChunkRef(blake3.blake3(chunk).digest(), pack, at, len(chunk), len(chunk), Codec.RAW)
        )
        body += chunk
        at += len(chunk)
    return Range(pack, start, at, refs), body[gaps[0] :]


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_chunk_sink_hands_on_each_verified_chunk_and_drops_the_gaps(piece: int) -> None:
    chunks = [os.urandom(n) for n in (3000, 1, 5000, 4096)]
    rng, body = _range(chunks, [0, 17, 1, 9000])
    seen: list[bytes] = []
    sink = ChunkSink(rng, bytearray(5000), lambda ref, raw: seen.append(bytes(raw)), "f")

    class Pieces:  # hands the sink at most `piece` bytes at a time
        def view(self) -> memoryview:
            return sink.view()[:piece]

        def took(self, n: int) -> None:
            sink.took(n)

    feed(Pieces(), body)
    assert seen == chunks


def test_chunk_sink_names_the_file_of_a_corrupt_chunk() -> None:
    chunks = [os.urandom(2000), os.urandom(2000)]
    rng, body = _range(chunks, [0, 0])
    damaged = bytearray(body)
    damaged[2500] ^= 1
    seen: list[bytes] = []
    sink = ChunkSink(rng, bytearray(2000), lambda ref, raw: seen.append(bytes(raw)), "dir/f")

    with pytest.raises(Corrupt, match=r"'dir/f'.*the data is corrupt"):
        feed(sink, damaged)
    assert seen == chunks[:1]  # the good chunk before it was handed on, the bad one not
    with pytest.raises(ValueError):
        ChunkSink(rng, bytearray(1999), lambda ref, raw: None, "f")


def test_writes_refuse_to_start_once_the_file_is_closed_and_close_waits() -> None:
    use = stage_module._FdUse()
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with use:
            inside.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    assert inside.wait(10)
    threading.Timer(0.3, release.set).start()
    began = time.monotonic()
    use.close()  # waits for the write in progress
    assert time.monotonic() - began >= 0.25 and release.is_set()
    with pytest.raises(stage_module._FdClosed), use:
        pass
    t.join(10)


# -- a large file's stage -------------------------------------------------------------------


async def push_then_stage(a: SiteEnv, b: SiteEnv) -> StageResult:
    """Push `/proj/ds` at site `a`, stage it at site `b`; the stage's result."""
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        return await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()


def _record_streams(monkeypatch: pytest.MonkeyPatch) -> list[Range]:
    """The ranges `Fetcher.stream` is asked for from now on, in order."""
    streams: list[Range] = []
    real = Fetcher.stream

    async def recording(self: Fetcher, rng: Range, sink: Any, owner: Any = None) -> None:
        streams.append(rng)
        await real(self, rng, sink, owner)

    monkeypatch.setattr(Fetcher, "stream", recording)
    return streams


async def test_a_large_files_packs_are_read_in_one_request_each(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 24 MiB in packs of about 4 MiB: with ranges held in memory (max_request 1 MiB) the
    # stage sent 24 or more requests, cutting every pack's run (and the server's own
    # chunks) into pieces; streamed, it sends one per pack.
    a = await make_site("site-a", pack_size=4 * MiB)
    (a.data / "ds").mkdir()
    source = os.urandom(24 * MiB)
    (a.data / "ds" / "big.bin").write_bytes(source)
    b = await make_site("site-b", max_request=1 * MiB)
    streams = _record_streams(monkeypatch)
    result = await push_then_stage(a, b)
    packs = {r.pack for r in streams}
    assert len(streams) == len(packs) >= 5, [(r.pack.hex()[:8], r.start, r.end) for r in streams]
    assert (b.data / "ds" / "big.bin").read_bytes() == source
    assert result.fetched_bytes == len(source) and result.downloaded_bytes >= len(source)


async def test_a_damaged_chunk_in_a_streamed_pack_fails_the_stage_naming_the_file(
    make_site: MakeSite, tmp_path: Path
) -> None:
    a = await make_site("site-a", pack_size=4 * MiB)
    (a.data / "ds").mkdir()
    (a.data / "ds" / "big.bin").write_bytes(os.urandom(12 * MiB))
    b = await make_site("site-b")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ds")
        packs = [info async for info in site_a.store.list("packs/")]
        victim = packs[len(packs) // 2]
        data = bytearray(await site_a.store.get(victim.key))
        data[len(data) // 3] ^= 0xFF  # inside a chunk's bytes, not the index trailer
        await site_a.store.put(victim.key, bytes(data))
    finally:
        await site_a.close()
    site_b = await b.open()
    try:
        with pytest.raises(Corrupt, match=r"'big\.bin'.*the data is corrupt"):
            await stage(site_b, "/proj/ds")
    finally:
        await site_b.close()
    assert not (b.data / "ds" / "big.bin").exists()


async def test_a_large_file_is_planned_window_by_window(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chunks planned at once are bounded (a GiB's worth; 3 MiB here): a file of many
    # windows comes out whole, no range crossing a window's end.
    monkeypatch.setattr(stage_module, "_STREAM_WINDOW", 3 * MiB)
    a = await make_site("site-a", pack_size=8 * MiB)
    (a.data / "ds").mkdir()
    # Seeded: with random bytes, chunks of up to 4 MiB made windows of up to 7 MiB, and 20
    # MiB came out in 5 windows now and then (the test failed about one run in many).
    source = random.Random(20261207).randbytes(20 * MiB + 12345)
    (a.data / "ds" / "big.bin").write_bytes(source)
    b = await make_site("site-b")
    streams = _record_streams(monkeypatch)
    await push_then_stage(a, b)
    assert (b.data / "ds" / "big.bin").read_bytes() == source
    assert len(streams) >= 6  # 20 MiB in windows of 3 MiB or a little more (whole chunks)
    assert max(r.end - r.start for r in streams) < 8 * MiB
