"""Streamed ranges under adversity: a cancel while a file of repeated chunks is written, a
stream broken off under a bandwidth limit, a short pack, a store that cannot stream, repeated,
compressed and all-zero chunks, and a resumed stream answered by a server ignoring Range or
refusing a kept URL (review of the streamed stage)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import blake3
import pytest

from datamover.chunking.codec import Codec
from datamover.chunking.pack import pack_key
from datamover.domain.manifest import ChunkRef
from datamover.errors import Corrupt
from datamover.storage.bandwidth import ThrottledStore
from datamover.storage.base import Store
from datamover.storage.retry import RetryingStore, RetryPolicy
from datamover.storage.s3 import S3Store
from datamover.transfer import stage as stage_module
from datamover.transfer.fetch import ChunkSink, Fetcher, Range
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite
from tests.test_direct import (
    DATA,
    partial,
    server,  # noqa: F401 (fixture)
)
from tests.test_store_conformance import backend, store  # noqa: F401 (fixtures)
from tests.test_streamed_ranges import Breaking, Collect, push_then_stage

MiB = 1 << 20


async def test_cancel_of_a_file_of_repeated_chunks_does_not_block_the_loop(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file whose content repeats (0xFF padding, a repeated pattern) is one ChunkRef at
    # many offsets, all written by the stream that receives it. A cancel waits in
    # `_FdUse.close()`, on the event loop, for the writes in progress: one per stream, not
    # every offset of the chunk (which blocked the loop until the whole file was written).
    a = await make_site("site-a")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "big.bin").write_bytes(b"\xff" * (48 * MiB))
    b = await make_site("site-b", batch_bytes=4 * MiB)  # window: 4 MiB (one or two chunks)
    real = stage_module._pwrite_all
    started = threading.Event()
    calls = [0]

    def slow(fd: int, data: Any, at: int) -> int:
        calls[0] += 1
        started.set()
        time.sleep(0.1)  # a slow disk: 0.1 s per chunk written
        return real(fd, data, at)

    monkeypatch.setattr(stage_module, "_pwrite_all", slow)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        task = asyncio.create_task(stage(site_b, "/proj/ds"))
        while not started.is_set():
            await asyncio.sleep(0.01)
        gaps = [0.0]

        async def ticker() -> None:  # how long the event loop went without running it
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps[0] = max(gaps[0], now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - began
        ticking.cancel()
    finally:
        await site_a.close()
        await site_b.close()
    # 48 MiB of 4 MiB chunks: 12 writes of 0.1 s. One window's worth is 0.1-0.2 s.
    assert took < 0.6 and gaps[0] < 0.6, (
        f"the cancel waited {took:.2f} s for {calls[0]} writes of one chunk, the event loop "
        f"blocked for {gaps[0]:.2f} s"
    )


async def test_bytes_of_a_broken_off_stream_are_paid_to_the_download_pacer() -> None:
    # RetryingStore resumes after the bytes the sink took, so ThrottledStore, under it, must
    # pay for the bytes a failed attempt moved (it gave its whole booking back): 8 MiB moved
    # in 4 attempts of 2 MiB at 8 MiB/s book about 1 s on the pacer.
    inner = Breaking([2 * MiB] * 3)
    await inner.put("k", os.urandom(8 * MiB))
    paced = ThrottledStore(inner, download=8 * MiB)
    retrying = RetryingStore(paced, RetryPolicy(attempts=3, initial=0.0, maximum=0.0))
    sink = Collect(piece=65536)
    began = time.monotonic()
    assert await retrying.get_into("k", 0, 8 * MiB, sink) == 8 * MiB
    assert paced._down is not None
    booked = paced._down._next - began  # the time the pacer's timeline holds from the start
    assert booked >= 0.9, f"8 MiB at 8 MiB/s booked only {booked:.2f} s"


async def test_a_short_pack_streamed_is_corrupt_not_retried(store: Store) -> None:  # noqa: F811
    pack = os.urandom(32)
    chunks = [os.urandom(3 * MiB), os.urandom(3 * MiB)]
    body = b"".join(chunks)
    await store.put(pack_key(pack), body[: 4 * MiB])  # the second chunk cut short
    refs = [
        ChunkRef(blake3.blake3(c).digest(), pack, i * 3 * MiB, 3 * MiB, 3 * MiB, Codec.RAW)
        for i, c in enumerate(chunks)
    ]
    retried: list[str] = []
    retrying = RetryingStore(
        store, RetryPolicy(attempts=3, initial=0.0, maximum=0.0, on_retry=retried.append)
    )
    seen: list[bytes] = []
    rng = Range(pack, 0, 6 * MiB, refs)
    try:
        with pytest.raises(Corrupt, match=r"^'f': pack .* ends after 4,194,304 bytes, where"):
            await Fetcher(retrying, 2).stream(
                rng,
                ChunkSink(rng, bytearray(3 * MiB), lambda r, raw: seen.append(bytes(raw)), "f"),
                "f",
            )
    finally:
        await store.close()
    assert seen == chunks[:1] and not retried


async def test_a_store_that_cannot_stream_still_holds_at_most_max_request(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Behind a proxy (`proxied`: botocore's stack, no DirectGetter), or for any answer the
    # getter does not stream (a 200 ignoring Range, a chunked 206), `S3Store.get_into`
    # reads the range with `get`s. Ranges of a large file are planned up to 64 MiB
    # (`_STREAM_REQUEST`), whatever `max_request` says ("each ranged read is held in
    # memory"): each `get` must still hold at most `max_request` bytes.
    from datamover.storage import s3 as s3_module

    monkeypatch.setattr(s3_module, "proxied", lambda url: True)
    a = await make_site("site-a", pack_size=16 * MiB)
    (a.data / "ds").mkdir()
    source = os.urandom(32 * MiB)
    (a.data / "ds" / "big.bin").write_bytes(source)
    b = await make_site("site-b", max_request=1 * MiB)
    held: list[int] = []
    real = s3_module.S3Store.get

    async def recording(self: Any, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data: bytes = await real(self, key, offset, length)
        if key.startswith("packs/"):
            held.append(len(data))
        return data

    monkeypatch.setattr(s3_module.S3Store, "get", recording)
    await push_then_stage(a, b)
    assert (b.data / "ds" / "big.bin").read_bytes() == source
    assert max(held) <= 1 * MiB + 4 * MiB, f"one GET held {max(held) / MiB:.1f} MiB"


@pytest.mark.parametrize("sparse", [True, False])
async def test_repeated_zstd_and_zero_chunks_stage_and_restage_exactly(
    make_site: MakeSite, sparse: bool
) -> None:
    block = os.urandom(1 * MiB)
    text = (b"the quick brown fox %d\n" * 200000)[: 3 * MiB]  # compressible: zstd
    content = block * 6 + bytes(9 * MiB) + text + b"\xff" * (13 * MiB) + block * 3 + os.urandom(MiB)
    a = await make_site("site-a", pack_size=8 * MiB)
    (a.data / "ds").mkdir()
    f = a.data / "ds" / "big.bin"
    f.write_bytes(content)
    b = await make_site("site-b", sparse=sparse, batch_bytes=8 * MiB)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "big.bin").read_bytes() == content
        changed = bytearray(content)
        changed[20 * MiB : 20 * MiB + 5] = b"EDIT!"
        changed += b"\xff" * (5 * MiB) + block
        f.write_bytes(bytes(changed))
        await push(site_a, "/proj/ds")
        again = await stage(site_b, "/proj/ds")
        assert (b.data / "ds" / "big.bin").read_bytes() == bytes(changed)
        assert again.reused_bytes > 0
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_resumed_stream_answered_200_and_a_refused_kept_url_feed_each_byte_once(
    server: tuple[str, dict[str, Any]],  # noqa: F811
) -> None:
    url, state = server
    endpoint = url.split("/bucket/")[0]
    answers: list[str] = []

    def scripted(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
        what = answers.pop(0) if answers else "partial"
        if what == "cut":  # 206, body cut after 3000 bytes
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}")
            handler.send_header("Content-Length", str(last + 1 - first))
            handler.end_headers()
            handler.wfile.write(DATA[first : first + 3000])
            handler.wfile.flush()
            handler.close_connection = True
        elif what == "whole":  # Range ignored
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(DATA)))
            handler.end_headers()
            handler.wfile.write(DATA)
        elif what == "denied":
            body = b"<Error><Code>AccessDenied</Code><Message>expired</Message></Error>"
            handler.send_response(403)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        else:
            partial(handler, first, last)

    state["behaviour"] = scripted
    inner = S3Store(endpoint, "bucket", access_key="a", secret_key="b", direct_min=1)
    retrying = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.0, maximum=0.0))

    try:
        answers[:] = ["cut", "whole"]
        sink = Collect(piece=999)
        assert await retrying.get_into("key", 100, 9000, sink) == 9000
        assert bytes(sink.data) == DATA[100:9100] and not answers
        answers[:] = ["denied"]  # the kept URL refused: signed anew and sent once more
        sink = Collect(piece=999)
        assert await retrying.get_into("key", 5, 7000, sink) == 7000
        assert bytes(sink.data) == DATA[5:7005] and not answers
    finally:
        await retrying.close()
