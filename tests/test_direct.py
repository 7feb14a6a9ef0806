"""`DirectGetter` against HTTP servers misbehaving in ways a healthy SeaweedFS never does.

The S3 behaviour of the threaded GET path (ranges, missing keys, refused credentials, an
unreachable endpoint) runs in the store conformance suite against SeaweedFS (backend
`s3-direct`); these tests cover what only a misbehaving server or network shows: a kept-alive
connection closed by the server, a short body, a wrong `Content-Range`, a server that ignores
`Range`, and proxy detection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import botocore.exceptions as bce
import pytest

from datamover.errors import StoreUnavailable
from datamover.storage import direct
from datamover.storage.direct import DirectGetter, _Job, proxied
from datamover.storage.s3 import S3Store, _verify
from tests.fixtures_sites import MakeSite
from tests.tls import self_signed

DATA = bytes(range(256)) * 64  # 16 KiB

Behaviour = Callable[[BaseHTTPRequestHandler, int, int], None]


def _range(handler: BaseHTTPRequestHandler) -> tuple[int, int]:
    spec = handler.headers["Range"].removeprefix("bytes=")
    first, last = spec.split("-")
    return int(first), int(last)


def partial(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
    body = DATA[first : last + 1]
    handler.send_response(206)
    handler.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(DATA)}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def partial_then_close(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
    """`partial`, then the connection closed without saying so, as an idle timeout does:
    the client finds out when it next looks."""
    partial(handler, first, last)
    handler.close_connection = True


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, object]]]:
    """A local HTTP/1.1 server; `state["behaviour"]` answers each request, `state["served"]`
    counts requests and `state["connections"]` the connections they came on."""
    state: dict[str, object] = {"behaviour": partial, "served": 0, "connections": set()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state["served"] = int(state["served"]) + 1  # type: ignore[call-overload]
            state["connections"].add(self.client_address)  # type: ignore[attr-defined]
            first, last = _range(self)
            state["behaviour"](self, first, last)  # type: ignore[operator]

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/bucket/key?X-Amz-Signature=x", state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def getter() -> Iterator[DirectGetter]:
    g = DirectGetter(2, connect_timeout=2, read_timeout=2)
    yield g
    g.close()


async def test_ranges_come_back_on_one_kept_alive_connection(
    server: tuple[str, dict[str, object]], getter: DirectGetter
) -> None:
    url, state = server
    assert await getter.get(url, 0, 10) == DATA[:10]
    assert await getter.get(url, 1000, 5000) == DATA[1000:6000]
    assert await getter.get(url, 16000, 1000) == DATA[16000:]  # cut at the end
    assert state["served"] == 3
    assert len(state["connections"]) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("noticed", [True, False], ids=["noticed-idle", "closed-as-sent"])
async def test_a_connection_closed_by_the_server_is_replaced_once(
    server: tuple[str, dict[str, object]],
    getter: DirectGetter,
    noticed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Noticed while idle (`_dropped`), or closed just as the request goes out, which only
    the request finds out (`_dropped` made to miss it): replaced either way."""
    if not noticed:
        monkeypatch.setattr(direct, "_dropped", lambda conn: False)
    url, state = server

    state["behaviour"] = partial_then_close
    for i in range(4):
        assert await getter.get(url, i, 100) == DATA[i : i + 100]
    assert state["served"] == 4
    assert len(state["connections"]) == 4  # type: ignore[arg-type]


async def test_a_connection_the_server_closed_while_idle_is_never_sent_a_request(
    server: tuple[str, dict[str, object]], getter: DirectGetter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle timeout on the server's side: the next GET notices the closed connection
    before it sends anything, rather than sending, finding it dead and sending again."""
    url, state = server

    state["behaviour"] = partial_then_close
    requests: list[str] = []
    reused: list[bool] = []
    request, connection = DirectGetter._request, DirectGetter._connection

    def spy_request(self: DirectGetter, conn: Any, target: str, headers: dict[str, str]) -> Any:
        requests.append(headers["Range"])
        return request(self, conn, target, headers)

    def spy_connection(self: DirectGetter, *args: Any, **kwargs: Any) -> Any:
        conn, was_reused = connection(self, *args, **kwargs)
        reused.append(was_reused)
        return conn, was_reused

    monkeypatch.setattr(DirectGetter, "_request", spy_request)
    monkeypatch.setattr(DirectGetter, "_connection", spy_connection)
    for i in range(4):
        assert await getter.get(url, i, 100) == DATA[i : i + 100]
        await asyncio.sleep(0.05)  # the server's close reaches the client meanwhile
    assert state["served"] == 4
    assert len(requests) == 4  # none sent twice
    assert reused == [False] * 4  # each closed connection was noticed, none handed out


@pytest.mark.parametrize(
    ("name", "behaviour", "match"),
    [
        (
            "short body",
            lambda h, first, last: (
                h.send_response(206),
                h.send_header("Content-Range", f"bytes {first}-{last}/{len(DATA)}"),
                h.send_header("Content-Length", str(last - first + 1)),
                h.end_headers(),
                h.wfile.write(DATA[first:last]),  # one byte short, then the connection ends
                setattr(h, "close_connection", True),
            ),
            "IncompleteRead",
        ),
        (
            "wrong range",
            lambda h, first, last: partial(h, first + 1, last + 1),
            "Content-Range",
        ),
        (
            "too long",
            lambda h, first, last: partial(h, first, last + 10),
            "bytes for a",
        ),
    ],
)
async def test_a_bad_answer_is_store_unavailable(
    server: tuple[str, dict[str, object]],
    getter: DirectGetter,
    name: str,
    behaviour: Behaviour,
    match: str,
) -> None:
    url, state = server
    state["behaviour"] = behaviour
    with pytest.raises(StoreUnavailable, match=match) as err:
        await getter.get(url, 100, 50)
    assert "GetObject" in str(err.value) and "/bucket/key" in str(err.value), name


async def test_a_server_ignoring_range_still_gives_the_range(
    server: tuple[str, dict[str, object]], getter: DirectGetter
) -> None:
    url, state = server

    def whole(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(DATA)))
        handler.end_headers()
        handler.wfile.write(DATA)

    state["behaviour"] = whole
    assert await getter.get(url, 300, 20) == DATA[300:320]


async def test_an_s3_error_answer_is_a_client_error(
    server: tuple[str, dict[str, object]], getter: DirectGetter
) -> None:
    url, state = server

    def denied(handler: BaseHTTPRequestHandler, first: int, last: int) -> None:
        body = b"<Error><Code>AccessDenied</Code><Message>no way</Message></Error>"
        handler.send_response(403)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    state["behaviour"] = denied
    with pytest.raises(bce.ClientError) as err:
        await getter.get(url, 0, 10)
    assert err.value.response["Error"] == {"Code": "AccessDenied", "Message": "no way"}
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_proxied_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for scheme in ("http", "https", "all", "no"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    assert not proxied("http://s3.example.org:8333")
    monkeypatch.setenv("http_proxy", "http://proxy.example.org:3128")
    assert proxied("http://s3.example.org:8333")
    assert not proxied("https://s3.example.org")  # no https proxy set
    monkeypatch.setenv("no_proxy", "example.org")
    assert not proxied("http://s3.example.org:8333")
    monkeypatch.delenv("http_proxy")
    monkeypatch.delenv("no_proxy")
    monkeypatch.setenv("ALL_PROXY", "socks5://proxy.example.org:1080")
    assert proxied("https://s3.example.org")


def test_plain_http_endpoints_load_no_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    for scheme in ("http", "https", "all", "no"):
        monkeypatch.delenv(f"{scheme}_proxy", raising=False)
        monkeypatch.delenv(f"{scheme.upper()}_PROXY", raising=False)
    assert _verify("http://127.0.0.1:8333") is False
    assert _verify("HTTP://s3.example.org") is False
    assert _verify("https://s3.example.org") is None  # botocore's configured verification
    assert _verify(None) is None  # AWS itself: https
    monkeypatch.setenv("HTTP_PROXY", "https://proxy.example.org:3128")
    assert _verify("http://s3.example.org") is None  # the proxy may speak TLS


async def test_a_plain_http_client_builds_its_pool_without_the_ca_bundle(
    seaweed: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real client, against SeaweedFS: its first request works, with no CA file read."""
    loaded: list[object] = []
    original = ssl.SSLContext.load_verify_locations

    def spy(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loaded.append(args or kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", spy)
    store = S3Store(
        seaweed.endpoint, bucket, access_key=seaweed.access_key, secret_key=seaweed.secret_key
    )
    try:
        await store.put("probe", b"x")
        assert await store.get("probe") == b"x"
    finally:
        await store.close()
    assert loaded == []


@pytest.fixture
def stalling(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`url(tls)`: a server that takes each request and never answers (a stuck store); over
    TLS with a self-signed certificate (the getter is given it) when `tls`. `url.held`
    lists the connections whose request came."""
    listeners: list[socket.socket] = []
    held: list[socket.socket] = []
    stop = threading.Event()
    cert, key = self_signed(tmp_path)

    def serve(listener: socket.socket, tls: bool, begin: bool) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                if tls:
                    conn = context.wrap_socket(conn, server_side=True)
                conn.recv(65536)  # the request, then silence
                if begin:  # or the start of an answer that its connection's close ends
                    conn.sendall(
                        b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\n"
                        b"Content-Range: bytes 0-999/16384\r\nContent-Length: 1000\r\n\r\n"
                        + DATA[:500]
                    )
            except OSError:
                continue
            held.append(conn)

    def url(tls: bool, begin: bool = False) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)
        threading.Thread(target=serve, args=(listener, tls, begin), daemon=True).start()
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/bucket/key?X-Amz-Signature=x"

    url.held = held  # type: ignore[attr-defined]
    yield url
    stop.set()
    for sock in listeners + held:
        sock.close()


@pytest.mark.parametrize(("tls", "begin"), [(False, False), (True, False), (True, True)])
async def test_a_cancelled_get_ends_its_wait_and_close_does_not_wait(
    stalling: Callable[..., str], tmp_path: Path, tls: bool, begin: bool
) -> None:
    # Before: the thread waited for the server until the read timeout, whatever happened to
    # the task, and `close` (a command's or the daemon's end) waited for the thread: Ctrl-C
    # on a stuck store took 28 s to end a command. `begin`: the server stalls inside an
    # answer its connection's close ends, which `http.client` reads after dropping the
    # socket from the connection (the abort found no socket to shut down).
    url = stalling(tls, begin)
    getter = DirectGetter(2, ca_bundle=str(tmp_path / "cert.pem"), read_timeout=30)
    task = asyncio.create_task(getter.get(url, 0, 1000))
    queued = asyncio.create_task(getter.get(url, 0, 1000))
    late = asyncio.create_task(getter.get(url, 0, 1000))  # waits for a thread
    held: list[socket.socket] = stalling.held  # type: ignore[attr-defined]
    for _ in range(100):
        if len(held) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(held) == 2 and not task.done()  # both threads wait for the server
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    while len(held) < 3:  # the cancelled GET's thread is free: the waiting GET is sent
        assert time.monotonic() - started < 2, "the cancelled GET still holds its thread"
        await asyncio.sleep(0.02)
    await asyncio.to_thread(getter.close)  # the rest: both running, abandoned
    assert time.monotonic() - started < 3
    for other in (queued, late):
        with pytest.raises(StoreUnavailable):
            await other
    assert not getter._running


async def test_a_get_after_close_is_abandoned(
    server: tuple[str, dict[str, object]],
) -> None:
    # Before: RuntimeError ("cannot schedule new futures after shutdown"), which the store
    # does not map, where a GET retried on a getter closed meanwhile.
    url, _ = server
    getter = DirectGetter(2)
    assert await getter.get(url, 0, 10) == DATA[:10]
    getter.close()
    with pytest.raises(StoreUnavailable, match="its store was closed"):
        await getter.get(url, 0, 10)


async def test_a_connection_kept_for_the_next_get_is_no_longer_its_gets(
    server: tuple[str, dict[str, object]], getter: DirectGetter
) -> None:
    # A cancel in the window between the connection going back to the idle ones and the
    # thread's last step shut the kept connection down: the next GET, cancelled by no one,
    # failed on it under TLS (SSLEOFError). Kept, a connection is one an abort cannot reach.
    url, state = server
    job = _Job()
    reachable: list[object] = []

    class Idle(list):  # type: ignore[type-arg]
        def append(self, conn: object) -> None:
            super().append(conn)
            reachable.append(getattr(job, "sock", getattr(job, "conn", None)))

    getter._idle = Idle()
    assert await asyncio.to_thread(getter._get, job, url, 0, 10, None) == DATA[:10]
    assert reachable == [None]
    getter._abort(job)
    assert await getter.get(url, 10, 10) == DATA[10:20]
    assert state["served"] == 2 and len(state["connections"]) == 1  # type: ignore[arg-type]


async def test_a_sites_store_takes_every_ranged_get_to_the_threads(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: ranges under 4 MiB (every batch of small files a stage fetches, every manifest
    # read) went through botocore on the event loop, 1.6-3 ms of its CPU each.
    a = await make_site("a", download_concurrency=24)
    site = await a.open()
    threaded: list[tuple[str, int, int]] = []
    taken = S3Store._direct_get

    async def spy(self: S3Store, direct: DirectGetter, key: str, offset: int, length: int) -> bytes:
        threaded.append((key, offset, length))
        return await taken(self, direct, key, offset, length)

    monkeypatch.setattr(S3Store, "_direct_get", spy)
    try:
        await site.store.put("t/small", DATA)
        assert await site.store.get("t/small", 100, 10) == DATA[100:110]
        assert await site.store.get("t/small", 0, 1) == DATA[:1]
        assert await site.store.get("t/small") == DATA  # no length: a plain GET, as before
        assert threaded == [("t/small", 100, 10), ("t/small", 0, 1)]
        inner = site.store
        while not isinstance(inner, S3Store):
            inner = inner.inner
        # one thread for each GET two transfers at once send (`[api] workers` = 2, by default)
        assert inner._direct is not None and inner._direct._pool._max_workers == 48
    finally:
        await site.close()
