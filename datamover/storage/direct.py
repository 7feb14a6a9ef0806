"""Large ranged GETs on worker threads, off the event loop.

One event loop receives at most about 500 MB/s here: every byte passes through aiohttp's
protocol callbacks, its stream reader and a join, all under the GIL. A multi-GiB file staged
in 16 MiB ranges is bound by that, while the receiving itself (`recv` into a buffer) needs no
GIL at all. `DirectGetter` therefore fetches large ranges with plain blocking HTTP
(`http.client`) on a small thread pool: each GET reads its whole body with one buffered read
straight into the result (one kernel copy, no Python per packet), and several run at once on
several cores.

Requests are authorised by a presigned URL (SigV4 query signing by the botocore client, on
the event loop; `S3Store` reuses one per object for a while, as a range is not part of the
signature), so signing and credentials stay botocore's.
TLS uses the CA bundle botocore would (`ca_bundle` / `AWS_CA_BUNDLE`, else certifi's).

Contract of `get`: exactly `length` bytes from `offset`, or b"" if the range starts at or
beyond the end (HTTP 416); an S3 error answer is raised as `botocore.exceptions.ClientError`
(so the store maps it like any other), a failed connect (refused, a host name that does not
resolve, no route), a broken connection, a timeout or an answer that is not the range as
`StoreUnavailable`, as on the aiohttp path; TLS refusing the server (a certificate that
fails verification, a failed handshake) as `PermanentError`, as botocore's `SSLError` is.
A 200 without Content-Length or chunked encoding (only the connection's close ends its
body) that ends before the range does raises `UnknownEnd`, a `StoreUnavailable` carrying
the bytes that came: a connection cut short is not told from the object's end here, so the
caller, which can learn the object's size, decides (`S3Store` asks with a HEAD).
It never holds more than `length` bytes of a body, plus one piece of `_PIECE` bytes,
whatever the server sends: a 206 announcing or sending more than the range is refused
unread, and of a 200 (a server or proxy ignoring Range sends the whole object) the bytes
before `offset` are dropped as they arrive and the rest is left unread.
Connections are kept alive and reused, except one whose body was not read to its end (it is
closed: it cannot carry the next request). An idle connection the server has closed meanwhile
is noticed before it is reused (`_dropped`) and replaced; one it closes just as the request
goes out is replaced once, transparently. A GET whose task is cancelled, or that is still
running or waiting for a thread when the getter is closed, is abandoned (`Abandoned`): its
connection is shut down, so its thread does not wait for the server until the read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn
from urllib.parse import urlsplit

import botocore.exceptions as bce

from datamover.errors import PermanentError, StoreUnavailable
from datamover.storage.base import ByteSink, SinkFailed

_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,300})</Message>")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: Bytes read at a time of a body that is dropped (the part of a 200 before the range).
_PIECE = 1 << 20
#: Bytes read at most of an error answer's body (or a 416's): enough for S3's XML.
_ERROR_READ = 65536


class UrlExpired(StoreUnavailable):
    """A presigned URL's deadline passed before its GET was sent (`DirectGetter.get`): a
    new URL is needed, and a retry may sign one."""


class Abandoned(StoreUnavailable):
    """A GET abandoned by its caller (`DirectGetter.get` cancelled, or the getter closed)
    before or while its thread ran it; no one waits for this error."""


def _closed() -> Abandoned:
    return Abandoned("the GET was abandoned: its store was closed")


class UnknownEnd(StoreUnavailable):
    """A 200 answer to a range (the whole object: Range ignored) whose body has neither a
    Content-Length nor chunked encoding, so that only the connection's close ended it, and
    that ended before the range did. Either the connection was cut short, or the object ends
    there: `received` bytes of the body came in all, `data` the part of them in the range
    (b"" if the body ended before `offset`). Where the object's size is `received`, `data` is
    the range, cut at the object's end; else the connection was cut (the store unavailable,
    as this is taken by anyone who does not look)."""

    def __init__(self, message: str, data: bytes, received: int) -> None:
        super().__init__(message)
        self.data = data
        self.received = received


class Unstreamable(Exception):
    """An answer `DirectGetter.stream` does not stream (see there); nothing of it reached
    the sink and its connection is closed."""


def _stream_body(resp: http.client.HTTPResponse, offset: int, length: int, sink: ByteSink) -> int:
    """Read the body of `resp`, a 206 to the `length`-byte range at `offset`, into `sink`
    (`DirectGetter.stream`); `length`."""
    if resp.status != 206:
        if resp.status >= 400 and resp.status != 416:
            _raise_error(resp)
        raise Unstreamable(f"HTTP {resp.status}")
    if resp.length != length or range_mismatch(
        resp.getheader("Content-Range"), offset, length, length
    ):
        raise Unstreamable("not exactly the range")
    got = 0
    while got < length:
        try:
            view = sink.view()
        except Exception as exc:
            raise SinkFailed(exc) from exc
        n = resp.readinto(view[: length - got])
        if not n:  # `readinto` returns 0 where the body ends early; `read` would raise this
            raise http.client.IncompleteRead(b"", length - got)
        try:
            sink.took(n)
        except Exception as exc:
            raise SinkFailed(exc) from exc
        got += n
    return got


def proxied(url: str) -> bool:
    """True if the environment routes `url` through a proxy (then the caller keeps to
    botocore's own HTTP stack, which honours it)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if parts.scheme not in proxies and "all" not in proxies:
        return False
    return not urllib.request.proxy_bypass_environment(parts.hostname or "", proxies)


class _Job:
    """One GET on a thread, which the event loop may abandon (`DirectGetter._abort`): its
    connection is then shut down, so the thread's wait for the server ends at once instead
    of at the read timeout, and no thread outlives the GET's task for long."""

    __slots__ = ("aborted", "sock")

    def __init__(self) -> None:
        self.aborted = False
        # The connection's socket, not the connection: `http.client` drops the socket from
        # a connection whose answer ends with its close, while the answer still reads it.
        self.sock: socket.socket | None = None


class DirectGetter:
    """Blocking ranged GETs of presigned URLs on `threads` threads; see the module docstring.

    `ca_bundle` is a CA file for https (None: certifi's), `connect_timeout` and `read_timeout`
    are in seconds (the read timeout applies to each wait for data). `close` drops idle
    connections and stops the threads.
    """

    def __init__(
        self,
        threads: int,
        *,
        ca_bundle: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dm-get")
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ca_bundle = ca_bundle
        self._ssl: ssl.SSLContext | None = None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._running: set[_Job] = set()
        self._closed = False

    async def get(self, url: str, offset: int, length: int, deadline: float | None = None) -> bytes:
        """The `length` bytes at `offset` of the object at presigned `url`. With a
        `deadline` (wall-clock time, `time.time()`: the clock the server checks the URL's
        expiry by) the request is not sent once it has passed, as when the GET waited that
        long for a thread: `UrlExpired`. Cancelled, the GET is abandoned: one not started
        never runs, one running has its connection shut down (`_Job`)."""
        data: bytes = await self._run(url, offset, length, deadline, None)
        return data

    async def stream(
        self, url: str, offset: int, length: int, sink: ByteSink, deadline: float | None = None
    ) -> int:
        """Stream the `length` bytes at `offset` of the object at presigned `url` into `sink`
        as they arrive, on one of the threads; return `length`. Only a 206 whose
        Content-Length and Content-Range are exactly the range is streamed: any other answer
        but an S3 error (a server ignoring Range, a chunked body, a 416) raises `Unstreamable`
        before a byte reaches the sink, and the caller takes the range with `get`, which
        knows them all. A body that breaks off raises `StoreUnavailable` after the sink took
        what came (the caller may resume after it); the sink's own exception is raised as
        `SinkFailed`. Deadline and cancel as `get`'s."""
        got: int = await self._run(url, offset, length, deadline, sink)
        return got

    async def _run(
        self, url: str, offset: int, length: int, deadline: float | None, sink: ByteSink | None
    ) -> Any:
        """`_get` on a thread, abandoned (`_abort`) if the caller is cancelled."""
        loop = asyncio.get_running_loop()
        job = _Job()
        if self._closed:
            raise _closed()
        try:
            running = loop.run_in_executor(
                self._pool, self._get, job, url, offset, length, deadline, sink
            )
        except RuntimeError:  # closed meanwhile: the pool takes no more work
            raise _closed() from None
        try:
            return await running
        except BaseException:
            self._abort(job)
            raise

    def close(self) -> None:
        """Abandon the GETs still running or waiting for a thread (`Abandoned`; a running
        one's connection is shut down), close idle connections and stop the threads, which
        end at once."""
        with self._lock:
            self._closed = True
            running = list(self._running)
        for job in running:
            self._abort(job)
        self._pool.shutdown(wait=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _abort(self, job: _Job) -> None:
        """Mark `job` abandoned and shut its connection down, waking its thread's wait."""
        with self._lock:
            job.aborted = True
            sock = job.sock
        if sock is not None:
            # The plain socket's shutdown, also under TLS: `SSLSocket.shutdown` would drop
            # the TLS state another thread is reading with. The read then fails, and the
            # thread closes the connection.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _hold(self, job: _Job, conn: http.client.HTTPConnection) -> None:
        """On the thread: `conn` is `job`'s from now on (to be shut down if it is abandoned);
        `Abandoned` if it was already."""
        with self._lock:
            if not job.aborted:
                job.sock = conn.sock
                return
        conn.close()
        raise Abandoned("the GET was abandoned")

    # -- on a worker thread --------------------------------------------------------------

    def _get(
        self,
        job: _Job,
        url: str,
        offset: int,
        length: int,
        deadline: float | None,
        sink: ByteSink | None = None,
    ) -> Any:
        with self._lock:
            if job.aborted or self._closed:
                raise Abandoned("the GET was abandoned")
            self._running.add(job)
        try:
            return self._get_running(job, url, offset, length, deadline, sink)
        finally:
            with self._lock:
                self._running.discard(job)
                job.sock = None

    def _get_running(
        self,
        job: _Job,
        url: str,
        offset: int,
        length: int,
        deadline: float | None,
        sink: ByteSink | None,
    ) -> Any:
        parts = urlsplit(url)
        if deadline is not None and time.time() >= deadline:
            raise UrlExpired(
                f"S3 endpoint {parts.scheme}://{parts.netloc}: the presigned URL of a GetObject "
                f"of {parts.path!r} expired before the request could be sent"
            )
        https = parts.scheme == "https"
        host, port = parts.hostname or "", parts.port or (443 if https else 80)
        target = f"{parts.path}?{parts.query}" if parts.query else parts.path
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        endpoint = f"{parts.scheme}://{parts.netloc}"
        conn: http.client.HTTPConnection | None = None
        connecting = True
        try:
            conn, reused = self._connection(https, host, port)
            self._hold(job, conn)
            connecting = False
            try:
                resp = self._request(conn, target, headers)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                if not reused or job.aborted:
                    raise
                conn.close()  # the server closed an idle keep-alive connection: once more
                connecting = True
                conn, reused = self._connection(https, host, port, fresh=True)
                self._hold(job, conn)
                connecting = False
                resp = self._request(conn, target, headers)
            if sink is not None:
                data, received = _stream_body(resp, offset, length, sink), None
            else:
                data, received = self._body(resp, offset, length)
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            if _tls_refused(exc, connecting):
                # As botocore's SSLError on the aiohttp path: no retry makes it pass.
                raise PermanentError(f"TLS with S3 endpoint {endpoint} failed: {exc}") from exc
            what = str(exc) or type(exc).__name__
            raise StoreUnavailable(
                f"S3 endpoint {endpoint} unavailable during GetObject of {parts.path!r}: {what}"
            ) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        with self._lock:
            # A body left unread (a 200 cut at the range) would be read as the next answer;
            # a connection shut down by `_abort` carries none. Kept, it is no longer the
            # job's: a cancel from now on must not shut down what the next GET uses.
            keep = not (resp.will_close or not resp.isclosed() or job.aborted)
            job.sock = None
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        if received is not None:
            raise UnknownEnd(
                f"S3 endpoint {endpoint} {cut_or_ended(offset, length, len(data))} during "
                f"GetObject of {parts.path!r}",
                data,
                received,
            )
        return data

    def _request(
        self, conn: http.client.HTTPConnection, target: str, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        conn.request("GET", target, headers=headers)
        return conn.getresponse()

    def _body(
        self, resp: http.client.HTTPResponse, offset: int, length: int
    ) -> tuple[bytes, int | None]:
        """The range from answer `resp`, reading no more of its body than the range (see the
        module docstring), and None; or, for a 200 whose body only the connection's close
        ended before the range did, the bytes of it in the range and the bytes that came in
        all (`UnknownEnd`). A bad answer raises `HTTPException`, an error answer `ClientError`."""
        status = resp.status
        if status == 206:
            return _partial(resp, offset, length), None
        if status == 200:  # the server ignored Range and sends the whole object
            skipped = _skip(resp, offset)
            data = _read_at_most(resp, length)
            if len(data) < length and resp.length is None and not resp.chunked:
                return data, skipped + len(data)
            return data, None
        if status == 416:
            _read_at_most(resp, _ERROR_READ)  # to reuse the connection; a longer body closes it
            return b"", None
        _raise_error(resp)

    def _connection(
        self, https: bool, host: str, port: int, *, fresh: bool = False
    ) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept-alive connection to `host:port` (reused=True), else a new one."""
        conn: http.client.HTTPConnection | None
        while not fresh and (conn := self._take_idle(host, port)) is not None:
            if not _dropped(conn):
                return conn, True
            conn.close()  # closed by the server while idle: never sent a request
        if https:
            conn = http.client.HTTPSConnection(
                host, port, timeout=self._connect_timeout, context=self._context()
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout)
        try:
            conn.connect()
        except BaseException:
            conn.close()  # a socket connected whose TLS handshake failed
            raise
        assert conn.sock is not None
        conn.sock.settimeout(self._read_timeout)
        return conn, False

    def _take_idle(self, host: str, port: int) -> http.client.HTTPConnection | None:
        """The idle connection to `host:port` kept last, taken out of the pool; or None."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                if (self._idle[i].host, self._idle[i].port) == (host, port):
                    return self._idle.pop(i)
        return None

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                if self._ca_bundle is None:
                    from botocore.httpsession import where

                    self._ca_bundle = where()
                self._ssl = ssl.create_default_context(cafile=self._ca_bundle)
            return self._ssl


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection can no longer carry a request: its socket is
    gone, or readable. An idle connection has nothing to read unless the server closed it
    (the idle timeout servers and proxies have; nginx's is 75 s unless set) or sent
    something unasked, which would be taken for the next answer.
    Checked without waiting (`poll`, which takes any descriptor number, unlike `select`),
    so a daemon's first GETs after a pause are not sent on dead connections and sent again
    (seen with SeaweedFS: after two idle minutes, 7 of a stage's 8 first GETs were).
    A TLS connection with a record still unread (a session ticket) is taken for dropped
    too: a new connection costs a handshake, never a wrong answer."""
    sock = conn.sock
    if sock is None:
        return True
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # a socket closed meanwhile
        return True


def _tls_refused(exc: BaseException, connecting: bool) -> bool:
    """Whether `exc` is TLS refusing the server, which no retry changes: its certificate
    failed verification, or the handshake (`connecting`) failed for another reason than
    the connection ending (a server that speaks no TLS there, no common protocol)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    ended = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    return connecting and isinstance(exc, ssl.SSLError) and not isinstance(exc, ended)


def _partial(resp: http.client.HTTPResponse, offset: int, length: int) -> bytes:
    """The body of 206 answer `resp` to a `length`-byte range at `offset`, refused (as
    `HTTPException`) when it is not that range: one announcing more is not read at all, one
    without a Content-Length (chunked, or up to the close) is read up to one byte more."""
    declared = resp.length  # the Content-Length, None if it gave none
    if declared is not None and declared > length:
        raise http.client.HTTPException(range_overrun(offset, length, declared))
    # With a Content-Length (now at most `length`): one buffered read straight into the
    # result, IncompleteRead if the body ends early.
    data = resp.read() if declared is not None else _read_at_most(resp, length + 1)
    if len(data) > length:
        raise http.client.HTTPException(range_overrun(offset, length))
    problem = range_mismatch(resp.getheader("Content-Range"), offset, length, len(data))
    if problem is not None:
        raise http.client.HTTPException(problem)
    return data


def _pieces(resp: http.client.HTTPResponse, limit: int, piece: int) -> Iterator[bytes]:
    """Consecutive pieces of at most `piece` bytes of `resp`'s body, `limit` bytes in all,
    fewer only where the body ends. A body that ends before its Content-Length raises
    `IncompleteRead`, as `read()` does (`read(amt)` would return it short, silently)."""
    while limit > 0:
        data = resp.read(min(limit, piece))
        if not data:
            if resp.length:  # the Content-Length promised more
                raise http.client.IncompleteRead(b"", resp.length)
            return
        limit -= len(data)
        yield data


def _read_at_most(resp: http.client.HTTPResponse, limit: int) -> bytes:
    """The next `limit` bytes of `resp`'s body, fewer only where it ends; the rest unread.
    Usually one read, straight into the result (`_pieces`)."""
    return b"".join(_pieces(resp, limit, limit))


def _skip(resp: http.client.HTTPResponse, count: int) -> int:
    """Read and drop the next `count` bytes of `resp`'s body (fewer if it ends first),
    holding at most `_PIECE` of them at a time; how many there were."""
    return sum(len(piece) for piece in _pieces(resp, count, _PIECE))


def cut_or_ended(offset: int, length: int, got: int) -> str:
    """What is wrong with a 200 answer to a `length`-byte range at `offset` whose body
    ended after `got` bytes of the range: with neither a Content-Length nor chunked
    encoding, only the connection's close ends the body, so a connection cut short is not
    told from the object's end by the answer (`UnknownEnd`). Such short data, taken as the
    range, would be read as a damaged chunk."""
    return (
        f"answered a {length}-byte range at {offset} with the whole object, of unknown size, "
        f"which ended {got} bytes into the range: a connection cut short cannot be told "
        "from the object's end"
    )


def cut_short(offset: int, length: int, received: int, size: int) -> str:
    """Why a 200 answer to a `length`-byte range at `offset` whose body only the
    connection's close ended, after `received` bytes, is refused: the object holds `size`
    bytes, so the connection was cut."""
    return (
        f"answered a {length}-byte range at {offset} with the whole object, whose connection "
        f"closed after {received} of its {size} bytes: a connection cut short"
    )


def range_overrun(offset: int, length: int, declared: int | None = None) -> str:
    """Why a 206 answer to a `length`-byte range at `offset` is refused: its Content-Length
    `declared` is larger, or (None) its body ran on past `length` bytes. Such a body is not
    read to its end: a server could make it any size."""
    if declared is None:
        return f"sent more than {length} bytes for a {length}-byte range at {offset}"
    return f"sent a Content-Length of {declared} bytes for a {length}-byte range at {offset}"


def range_mismatch(
    content_range: str | None, offset: int, length: int | None, got: int
) -> str | None:
    """Why a 206 answer with `got` body bytes and `content_range` is not exactly the
    `length` bytes (None: all the rest) at `offset`, cut at the object's end; None if it is.

    A range may come back short only where the object ends, which the total in
    Content-Range proves; a server or proxy that answers short anywhere else (a cap on
    range sizes, a body cut to a consistent length) would otherwise hand back too few
    bytes, silently. An unknown total (`*`) proves nothing, so it passes only a full range.
    """
    match = _CONTENT_RANGE.fullmatch(content_range or "")
    if match is None or int(match.group(1)) != offset:
        return f"answered a range request with Content-Range {content_range!r}"
    last, total = int(match.group(2)), match.group(3)
    end = None if length is None else offset + length  # exclusive
    if total != "*":
        end = int(total) if end is None else min(end, int(total))
    if got != last + 1 - offset or last + 1 != end:
        span = "the rest" if length is None else f"a {length}-byte range"
        return f"sent {got} bytes for {span} at {offset} (Content-Range {content_range!r})"
    return None


def _raise_error(resp: http.client.HTTPResponse) -> NoReturn:
    """Raise an S3 error answer as botocore would."""
    body = resp.read(_ERROR_READ)
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    error = {
        "Code": code.group(1).decode(errors="replace") if code else str(resp.status),
        "Message": message.group(1).decode(errors="replace") if message else resp.reason,
    }
    raise bce.ClientError(
        {"Error": error, "ResponseMetadata": {"HTTPStatusCode": resp.status}},  # type: ignore[typeddict-item]
        "GetObject",
    )
