"""A ranged GET answered 200 with the whole object (a server or proxy ignoring Range) whose
body has neither a Content-Length nor chunked encoding, so that only the connection's close
ends it: one that ends before the range does is the store unavailable (retried), on the
threaded path (direct.py) as on aiohttp's, since a connection cut short cannot be told from
the object's end. Where the body's end is known (chunked), a range cut at the object's end
is still returned short, as ever.

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
    (all of it if None), chunked if `state["chunked"]`, else ending the body by closing."""
    state: dict[str, object] = {"sent": None, "chunked": False}

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
        with pytest.raises(StoreUnavailable, match="cannot be told from the object's end"):
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
