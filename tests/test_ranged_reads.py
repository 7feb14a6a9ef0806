"""Ranged GETs hold no more than the range, whatever the server sends.

A server or proxy that ignores `Range` answers 200 with the whole object; one that is broken
or hostile may answer 206 with more than was asked. Before, both GET paths (aiohttp through
aiobotocore, and the threaded plain-HTTP one in direct.py) read the whole body and sliced
it: a 4 KiB read of a 256 MiB object held 256 MiB, and four of them at once got a stage
OOM-killed. The server here streams a large body made on the fly and counts the bytes it got
out before the client hung up.
"""

from __future__ import annotations

import asyncio
import random
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datamover.errors import StoreUnavailable
from datamover.storage.s3 import S3Store

MiB = 1 << 20
SIZE = 256 * MiB  # what the server claims the object holds, and sends if let
PERIOD = MiB + 3  # the body repeats with this period: any misplaced range shows
PATTERN = random.Random(7).randbytes(PERIOD)
TWICE = PATTERN + PATTERN
PIECE = 64 * 1024
#: Far more than socket buffers on both ends can hold, far less than SIZE.
SENT_BOUND = 32 * MiB


def body(offset: int, length: int) -> bytes:
    """The `length` (at most `PERIOD`) bytes at `offset` of the server's object."""
    start = offset % PERIOD
    return TWICE[start : start + min(length, SIZE - offset)]


@dataclass
class Served:
    """One GET the server answered: how many body bytes went out, on which connection."""

    client: tuple[str, int]
    sent: int = 0
    done: threading.Event = field(default_factory=threading.Event)


#: Sends the answer to a GET of bytes `first` to `last`: `answer(handler, served, first, last)`.
Answer = Callable[[BaseHTTPRequestHandler, Served, int, int], None]


@dataclass
class Server:
    """A local HTTP/1.1 server at `endpoint`; `answer` answers every GET, `served` lists them."""

    endpoint: str
    answer: Answer
    served: list[Served] = field(default_factory=list)

    async def finished(self, i: int) -> Served:
        """The `i`th GET, once its handler is done (the client read it all or hung up).
        Waits off the event loop: asyncio closes a socket on a later turn of the loop."""
        served = self.served[i]
        done = await asyncio.to_thread(served.done.wait, 20)
        assert done, "the client neither read the body nor hung up"
        return served


def stream(
    handler: BaseHTTPRequestHandler, served: Served, first: int, end: int, chunked: bool
) -> None:
    """Write the object's bytes `first` to `end` (exclusive), counting what goes out, until
    the client hangs up."""
    pos = first
    try:
        while pos < end:
            n = min(PIECE, end - pos)
            start = pos % PERIOD
            piece = TWICE[start : start + n]
            if chunked:
                handler.wfile.write(b"%x\r\n%b\r\n" % (n, piece))
            else:
                handler.wfile.write(piece)
            served.sent += n
            pos += n
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")
    except OSError:
        pass  # the client closed the connection: what we want to see
    handler.close_connection = True


def whole(handler: BaseHTTPRequestHandler, served: Served, first: int, last: int) -> None:
    """Ignore Range: 200 and the whole object."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(SIZE))
    handler.end_headers()
    stream(handler, served, 0, SIZE, chunked=False)


def too_long(chunked: bool) -> Answer:
    """206 with the Content-Range asked for, but a body running on to the object's end:
    with a Content-Length saying so, or chunked (no length given up front)."""

    def answer(handler: BaseHTTPRequestHandler, served: Served, first: int, last: int) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {first}-{last}/{SIZE}")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(SIZE - first))
        handler.end_headers()
        stream(handler, served, first, SIZE, chunked)

    return answer


@pytest.fixture
def server() -> Iterator[Server]:
    """A `Server` that answers with `whole` until a test sets another `answer`."""
    httpd: ThreadingHTTPServer
    state = Server("", whole)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            served = Served(self.client_address)
            state.served.append(served)
            try:
                spec = self.headers.get("Range", "bytes=0-").removeprefix("bytes=")
                first, _, last = spec.partition("-")
                state.answer(self, served, int(first), int(last or SIZE - 1))
            finally:
                served.done.set()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


BOTH_PATHS = pytest.mark.parametrize("direct_min", [1, 1 << 40], ids=["direct", "aiohttp"])


@pytest.fixture
def make_store(server: Server) -> Callable[[int], S3Store]:
    """`make_store(direct_min)`: an `S3Store` on `server` (the test closes it)."""

    def make(direct_min: int) -> S3Store:
        return S3Store(
            server.endpoint,
            "bucket",
            access_key="k",
            secret_key="s",
            direct_min=direct_min,
            read_timeout=10,
        )

    return make


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The direct path is taken only without a proxy set for the endpoint."""
    for scheme in ("http", "https", "all"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)


@BOTH_PATHS
async def test_a_range_answered_with_the_whole_object_reads_only_up_to_the_range(
    server: Server, make_store: Callable[[int], S3Store], direct_min: int
) -> None:
    # Before: the whole 256 MiB was read (and held) for each 4 KiB, and the connection,
    # read to its end, went back to the pool.
    store = make_store(direct_min)
    try:
        for i, offset in enumerate([3 * MiB + 5, 7]):
            assert await store.get("pack", offset, 4096) == body(offset, 4096)
            assert (await server.finished(i)).sent < SENT_BOUND
        # Each half-read connection was closed, not reused: the next GET came on a new one.
        assert server.served[0].client != server.served[1].client
    finally:
        await store.close()


@BOTH_PATHS
async def test_skipping_to_a_far_offset_holds_no_more_than_the_range(
    server: Server, make_store: Callable[[int], S3Store], direct_min: int
) -> None:
    # The bytes before the range must come over the wire, but are dropped as they arrive.
    # Before: the peak was the whole body, 256 MiB.
    store = make_store(direct_min)
    offset = 200 * MiB + 11
    try:
        await store.get("pack", 0, 16)  # the client set up, outside what is measured
        tracemalloc.start()
        try:
            data = await store.get("pack", offset, MiB)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert data == body(offset, MiB)
        assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB for a 1 MiB range"
        assert (await server.finished(1)).sent < offset + SENT_BOUND
    finally:
        await store.close()


@BOTH_PATHS
async def test_a_range_answered_with_the_whole_object_is_cut_at_its_end(
    server: Server, make_store: Callable[[int], S3Store], direct_min: int
) -> None:
    # A 200 carries the whole object, so a range running past its end, or starting beyond
    # it, is cut there, as a 206 or a 416 would have been.
    store = make_store(direct_min)
    try:
        assert await store.get("pack", SIZE - 100, 4096) == body(SIZE - 100, 100)
        assert await store.get("pack", SIZE + 5, 4096) == b""
    finally:
        await store.close()


@BOTH_PATHS
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_206_longer_than_the_range_is_refused_without_reading_it(
    server: Server, make_store: Callable[[int], S3Store], direct_min: int, chunked: bool
) -> None:
    # Before: the whole rest of the object was read, then refused.
    server.answer = too_long(chunked)
    store = make_store(direct_min)
    try:
        with pytest.raises(StoreUnavailable, match=r"bytes for a 4096-byte range") as err:
            await store.get("pack", 1000, 4096)
        assert "pack" in str(err.value)
        assert (await server.finished(0)).sent < SENT_BOUND
    finally:
        await store.close()
