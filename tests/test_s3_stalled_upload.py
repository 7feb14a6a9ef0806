"""An upload to a server that stops taking it: a stopped SeaweedFS (SIGSTOP), or one that
accepts the connection and then neither reads nor answers. aiohttp times no part of sending
a request body, and waited for botocore's `Expect: 100-continue` answer with no timeout, so
such a PUT waited for ever: a push hung, silent, for as long as the server was stopped.
Now a body the socket takes none of for `read_timeout` seconds is the store unavailable
(retried, then exit 6), no `Expect` header is sent, and a body that went out whole waits
for its answer under the read timeout as before.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from datamover.embedded import EmbeddedSeaweed
from datamover.errors import StoreUnavailable
from datamover.storage.s3 import S3Store
from datamover.transfer.push import push
from tests.fixtures_sites import SiteEnv

MiB = 1 << 20


@pytest.fixture
def silent_server(raw_server: tuple[str, list]) -> str:
    """A server that accepts connections and never reads from them nor answers."""
    return raw_server[0]  # nothing planned: every connection is held unread


@pytest.fixture
def stalling_parts_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A server that starts multipart uploads and answers a small PutObject 200, but takes
    no byte of an UploadPart's body (it sleeps until the client gives up); each request's
    headers are kept in the list."""
    headers: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None: ...

        def do_POST(self) -> None:
            headers.append(dict(self.headers))
            body = (
                b"<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>"
                b"<UploadId>u1</UploadId></InitiateMultipartUploadResult>"
            )
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:
            headers.append(dict(self.headers))
            if "partNumber" in self.path:
                self.close_connection = True
                time.sleep(5)  # not a byte read: the client's socket buffers fill
                return
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("ETag", '"0"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_DELETE(self) -> None:  # the abort of the upload
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", headers
    finally:
        server.shutdown()
        server.server_close()


def _read_request_head(conn: socket.socket) -> int:
    """Read a request's head from `conn`; return its Content-Length."""
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(65536)
        if not data:
            return 0
        head += data
    lines = head.split(b"\r\n\r\n")[0].split(b"\r\n")
    fields = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
    return int(fields.get(b"Content-Length", b"0")) - len(head.split(b"\r\n\r\n", 1)[1])


@pytest.fixture
def raw_server() -> Iterator[tuple[str, list]]:
    """A server whose connections are served, in turn, by the functions the test puts in
    the list (each takes the connection); a connection beyond them is held unread."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    plan: list = []
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn = srv.accept()[0]
            except TimeoutError:
                continue
            held.append(conn)
            if plan:
                threading.Thread(target=plan.pop(0), args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", plan
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        srv.close()


async def test_a_body_sent_again_after_a_close_is_watched_again(
    raw_server: tuple[str, list],
) -> None:
    """aiohttp sends a PUT's body again, the same payload, on a new connection when the
    first closed before answering: the second send must be watched as the first was.
    Before, the first send's end left the body marked sent, and the second, which the
    server never read, waited for ever."""
    url, plan = raw_server

    def read_all_then_close(conn: socket.socket) -> None:
        left = _read_request_head(conn)
        while left > 0:
            got = conn.recv(min(left, 1 << 20))
            if not got:
                break
            left -= len(got)
        conn.close()

    plan.append(read_all_then_close)  # the second connection: held, never read
    await _ends_stalled(_store(url, multipart_threshold=100 * MiB), 40 * MiB, "PutObject")


async def test_a_slow_server_that_keeps_reading_is_no_stall(raw_server: tuple[str, list]) -> None:
    """A server taking 0.75 MiB a second for the body's first 4 MiB, less than one 1 MiB
    slice of it per `read_timeout` (1 s), then the rest at once: the socket's send queue
    goes down all the while, so the upload is not stalled, and it succeeds. Before, the
    watch saw only whole slices go, and called it stalled after a second."""
    url, plan = raw_server
    size = 12 * MiB
    got_all: list[int] = []

    def slow_then_answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        left = _read_request_head(conn)
        total = 0
        while left > 0:
            data = conn.recv(min(left, 48 << 10))
            if not data:
                return
            left -= len(data)
            total += len(data)
            if total < 4 * MiB:
                time.sleep(len(data) / (0.75 * MiB))
        got_all.append(total)
        conn.sendall(b'HTTP/1.1 200 OK\r\nETag: "0"\r\nContent-Length: 0\r\n\r\n')

    plan.append(slow_then_answer)
    store = _store(url, multipart_threshold=100 * MiB)
    try:
        await asyncio.wait_for(store.put("k", os.urandom(size)), 60)
    finally:
        await store.close()
    assert got_all and got_all[0] > 11 * MiB  # the head's share of the first read aside


async def _ends_stalled(store: S3Store, size: int, op: str) -> None:
    """A put of `size` bytes through `store` ends, within seconds, as stalled during `op`."""
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match=f"stalled during {op} of 'k'"):
            await asyncio.wait_for(store.put("k", os.urandom(size)), 30)
    finally:
        await store.close()
    assert time.monotonic() - started < 10


def _store(url: str, **kw: int) -> S3Store:
    return S3Store(
        url, "b", access_key="a", secret_key="s", read_timeout=1, connect_timeout=1, **kw
    )


@pytest.mark.parametrize("size", [200, 2 * MiB, 40 * MiB], ids=["200B", "2MiB", "40MiB"])
async def test_a_put_to_a_server_that_neither_reads_nor_answers_ends(
    silent_server: str, size: int
) -> None:
    """200 bytes and 2 MiB fit the sockets' buffers (the answer's read timeout ends them);
    40 MiB do not (nothing is taken for a second: stalled). Before: each waited for ever
    (for `100 Continue`)."""
    store = _store(silent_server, multipart_threshold=100 * MiB)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(store.put("k", os.urandom(size)), 30)
    finally:
        await store.close()
    assert time.monotonic() - started < 10
    if size == 40 * MiB:
        assert "stalled during PutObject of 'k': it took none of the body for 1 s" in str(
            caught.value
        )


async def test_a_part_the_server_takes_nothing_of_ends_the_put(
    stalling_parts_server: tuple[str, list[dict[str, str]]],
) -> None:
    url, headers = stalling_parts_server
    store = _store(url, multipart_threshold=16 * MiB, multipart_chunk=16 * MiB)
    await _ends_stalled(store, 32 * MiB, "UploadPart")
    parts = [h for h in headers if "Content-Length" in h and int(h["Content-Length"]) > MiB]
    assert parts and not [h for h in headers if "Expect" in h or "expect" in h]


async def test_a_put_sends_no_expect_header(
    stalling_parts_server: tuple[str, list[dict[str, str]]],
) -> None:
    url, headers = stalling_parts_server
    store = _store(url)
    try:
        await store.put("k", os.urandom(2 * MiB))
    finally:
        await store.close()
    (put,) = headers
    assert int(put["Content-Length"]) == 2 * MiB
    assert not {name.lower() for name in put} & {"expect"}


async def test_a_push_to_a_stopped_seaweedfs_fails_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SeaweedFS of this test's own is stopped (SIGSTOP) as the push sends its first pack:
    the push fails as the store unavailable within its retries' time instead of waiting
    for the server; continued, the next push publishes the version."""
    with EmbeddedSeaweed(tmp_path / "weed") as server:
        server.create_bucket("stalled")
        env = SiteEnv("site-a", tmp_path / "data", tmp_path / "state", tmp_path / "site.toml")
        (env.data / "ds").mkdir(parents=True)
        (env.data / "ds" / "big.bin").write_bytes(os.urandom(24 * MiB))
        env.config_path.write_text(
            "\n".join(
                [
                    "[site]",
                    'name = "site-a"',
                    f'catalog = "sqlite:///{tmp_path}/catalog.db"',
                    f'state_dir = "{env.state}"',
                    "[store]",
                    f'endpoint = "{server.endpoint}"',
                    'bucket = "stalled"',
                    f'access_key = "{server.access_key}"',
                    f'secret_key = "{server.secret_key}"',
                    "read_timeout = 1",
                    "retry_attempts = 2",
                    "[namespace]",
                    f'"/proj" = "{env.data}"',
                ]
            )
            + "\n"
        )
        assert server._proc is not None
        pid = server._proc.pid
        real_put = S3Store.put
        stopped: list[str] = []

        async def stop_at_first_pack(self: S3Store, key: str, data: bytes | memoryview) -> None:
            if key.startswith("packs/") and not stopped:
                stopped.append(key)
                os.kill(pid, signal.SIGSTOP)
            await real_put(self, key, data)

        monkeypatch.setattr(S3Store, "put", stop_at_first_pack)
        site = await env.open()
        try:
            started = time.monotonic()
            try:
                with pytest.raises(StoreUnavailable):
                    await asyncio.wait_for(push(site, "/proj/ds"), 60)
            finally:
                os.kill(pid, signal.SIGCONT)
            assert stopped and time.monotonic() - started < 30
            monkeypatch.setattr(S3Store, "put", real_put)
            result = await push(site, "/proj/ds")
            assert result.version and result.bytes == 24 * MiB
        finally:
            await site.close()
