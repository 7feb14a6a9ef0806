"""A ranged GET answered 200 with the whole object (a server or proxy ignoring Range) whose
body has neither a Content-Length nor chunked encoding, so that only the connection's close
ends it, and that ends before the range does: the answer cannot tell a connection cut short
from the object's end, so a HEAD does. Where the object is longer, the store is unavailable
(retried), on the threaded path (direct.py) as on aiohttp's; where the body ended at the
object's end (a version document or manifest object is read one byte past its end), the
bytes are the range, cut there. Where the body's end is known (chunked), a range cut at the
object's end is returned short without a HEAD, as ever.

Before: the bytes that came were returned as the range, and the stage that asked for them
reported a corrupt chunk (exit 5) for a network fault.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datamover.errors import StoreUnavailable
from datamover.storage.s3 import S3Store

OBJECT = bytes(range(256)) * 4096  # 1 MiB
PATHS = pytest.mark.parametrize("direct_min", [1, 1 << 40], ids=["direct", "aiohttp"])


@pytest.fixture
def whole_object_server() -> Iterator[tuple[str, dict[str, object]]]:
    """A server that ignores Range and answers 200 with `state["sent"]` bytes of `OBJECT`
    (all of it if None), chunked if `state["chunked"]`, else ending the body by closing;
    a HEAD with `OBJECT`'s size (counted in `state["heads"]`)."""
    state: dict[str, object] = {"sent": None, "chunked": False, "heads": 0}

    class Whole(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None: ...

        def do_GET(self) -> None:
            sent = state["sent"]
            body = OBJECT if sent is None else OBJECT[: int(sent)]  # type: ignore[call-overload]
            self.send_response(200)
            if state["chunked"]:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            else:
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
            self.close_connection = True

        def do_HEAD(self) -> None:
            state["heads"] = int(state["heads"]) + 1  # type: ignore[call-overload]
            self.send_response(200)
            self.send_header("Content-Length", str(len(OBJECT)))
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Whole)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _store(url: str, direct_min: int) -> S3Store:
    return S3Store(url, "b", access_key="a", secret_key="b", direct_min=direct_min)


@PATHS
async def test_a_close_delimited_200_that_ends_inside_the_range_is_the_store_unavailable(
    whole_object_server: tuple[str, dict[str, object]], direct_min: int
) -> None:
    url, state = whole_object_server
    state["sent"] = 200_000  # of 1 MiB: the connection was cut
    store = _store(url, direct_min)
    try:
        with pytest.raises(StoreUnavailable, match="closed after 200000 of its 1048576 bytes"):
            await store.get("k", 100, 300_000)  # before: 199,900 bytes
        with pytest.raises(StoreUnavailable):
            await store.get("k", 300_000, 10)  # ended before the range started: b""
        state["sent"] = None  # whole: a range inside the object comes back whole
        assert await store.get("k", 100, 300_000) == OBJECT[100:300_100]
    finally:
        await store.close()


@PATHS
async def test_a_chunked_200_that_ends_inside_the_range_is_the_objects_end(
    whole_object_server: tuple[str, dict[str, object]], direct_min: int
) -> None:
    url, state = whole_object_server
    state["chunked"] = True
    store = _store(url, direct_min)
    try:
        assert await store.get("k", len(OBJECT) - 100, 300_000) == OBJECT[-100:]
    finally:
        await store.close()


@PATHS
async def test_a_whole_close_delimited_object_read_past_its_end_is_returned(
    whole_object_server: tuple[str, dict[str, object]], direct_min: int
) -> None:
    # Before: StoreUnavailable, retried until it gave up, for every version document and
    # manifest object a `Repository` read (one byte past its end) through such a server.
    url, state = whole_object_server
    store = _store(url, direct_min)
    try:
        assert await store.get("k", 0, len(OBJECT) + 1) == OBJECT
        assert await store.get("k", len(OBJECT) - 100, 300_000) == OBJECT[-100:]
        assert await store.get("k", len(OBJECT) + 10, 300_000) == b""  # past the end
        assert state["heads"] == 3
        assert await store.get("k", 100, 300_000) == OBJECT[100:300_100]
        assert state["heads"] == 3  # a range the body filled needs no HEAD
    finally:
        await store.close()
