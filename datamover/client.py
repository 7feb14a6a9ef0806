"""A client of the site daemon's REST API, for the CLI and the job-staging hooks.

Synchronous, on the standard library's `http.client`: a job's prolog runs `datamover stage
--wait` once per dataset, and an event loop and aiohttp would add about 0.15 s of imports
to every such call for nothing (the client makes a handful of requests, one at a time).
One keep-alive connection carries them all.

Error responses become the same `DatamoverError` classes the library raises, so the CLI
prints one line and exits with the same code whether it worked locally or via the daemon.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl  # http.client imports it anyway; only a context costs (see `_connection`)
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from datamover.config import Config, read_regular_file
from datamover.errors import (
    HTTP_STATUS,
    Cancelled,
    DatamoverError,
    InvalidInput,
    TransientError,
    Unauthorized,
    error_class,
)

_BY_STATUS = {status: cls for cls, status in reversed(HTTP_STATUS)}
TERMINAL = ("succeeded", "failed", "cancelled")
TRANSFER = ("id", "state", "kind", "path")  # keys of every transfer the daemon answers
_MAX_ANSWER = 16 * 1024 * 1024  # no API answer comes near this; a larger one is not the daemon
_CONNECT_SECONDS = 3.0
# A reused keep-alive connection the daemon has closed meanwhile (a restart) fails like this
# before any answer; a request that cannot take effect twice (idempotent, or a POST with an
# Idempotency-Key) is then sent once more, on a fresh connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_IDEMPOTENT = ("GET", "HEAD", "DELETE")
# TLS failures a retry may cure: the connection closed or broke during the handshake (a
# daemon or proxy restarting). Every other `ssl.SSLError` (a certificate that fails
# verification, no protocol or cipher in common, a plain-HTTP server at an https URL) comes
# back the same on every try.
_TLS_TRANSIENT = (
    ssl.SSLEOFError,
    ssl.SSLSyscallError,
    ssl.SSLZeroReturnError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


def segment(value: str) -> str:
    """`value` as one URL path segment: every reserved character percent-encoded (`/`, `?`,
    `#`, `%` included) and every `.` too, so `..` cannot climb out of its route; the daemon
    decodes it back to exactly `value`."""
    return quote(value, safe="").replace(".", "%2E")


def _checked_token(token: str, source: str) -> str | None:
    token = token.strip()
    if token.lower().startswith("bearer "):
        raise InvalidInput(f"{source}: give the token alone, without 'Bearer '")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise InvalidInput(
            f"{source}: the token may hold only printable ASCII characters, no spaces"
        )
    return token or None


def load_token(config: Config) -> str | None:
    """The CLI's token: `DATAMOVER_TOKEN`, else the file named by `[api] token_file`.

    Raises `InvalidInput` when the file cannot be read, is not a regular file or is empty, or
    the token holds characters an HTTP header cannot carry (a newline, a space, non-ASCII)."""
    token = os.environ.get("DATAMOVER_TOKEN")
    if token:
        return _checked_token(token, "DATAMOVER_TOKEN")
    if config.api.token_file:
        shown = f"the token file {config.api.token_file!r}"
        try:
            text = read_regular_file(config.api.token_file, shown).decode()
        except UnicodeDecodeError:
            raise InvalidInput(
                f"the token file {config.api.token_file!r} is not UTF-8 text"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"cannot read the token file {config.api.token_file!r}: {exc.strerror}"
            ) from None
        if not text.strip():
            raise InvalidInput(f"{shown} is empty")
        return _checked_token(text, f"token file {config.api.token_file!r}")
    return None


def error_from(status: int, body: Any, where: str = "the daemon") -> DatamoverError:
    """The library error for an API error response. An answer without datamover's error
    object comes from something else at that address: a gateway's 502-504 is transient
    (a restart behind a proxy), any other is `InvalidInput` pointing at `[api] url`, not
    a "not found" a hook would take for a missing dataset."""
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        if status in (502, 503, 504):
            return TransientError(f"{where} answered HTTP {status} (a gateway or proxy?)")
        return not_the_daemon(where, status, "a datamover error")
    error = body["error"]
    message = error.get("message") or f"daemon answered HTTP {status}"
    code = error.get("code", "")
    cls = error_class(code) or _BY_STATUS.get(status) or DatamoverError
    exc = cls(message, error.get("paths"))
    exc.code = code or exc.code
    return exc


def _daemons(body: dict[str, Any]) -> bool:
    """Whether an error answer carries datamover's error object (not a proxy's)."""
    error = body.get("error")
    return isinstance(error, dict) and error.get("code") == "unauthorized"


def not_the_daemon(where: str, status: int, without: str) -> InvalidInput:
    """The error for an answer no datamover daemon gives (an HTML page, a redirect, another
    service's JSON): `[api] url` leads elsewhere, which no retry or local run mends."""
    return InvalidInput(
        f"{where} answered HTTP {status} without {without}: is [api] url the address of a "
        "datamover daemon?"
    )


def transfer_error(transfer: dict[str, Any]) -> DatamoverError:
    """The error a failed or cancelled transfer ended with."""
    if transfer["state"] == "cancelled":
        return Cancelled(f"transfer {transfer['id']} was cancelled")
    error = transfer.get("error") or {}
    cls = error_class(error.get("code", "")) or DatamoverError
    exc = cls(
        f"transfer {transfer['id']} failed: {error.get('message', 'unknown reason')}",
        error.get("paths"),
    )
    return exc


class DaemonClient:
    """Talks to one daemon at `base_url` (`http://` or `https://`, optionally with a path
    prefix) with `token`, over one keep-alive connection. Use as a context manager.

    `timeout` bounds every wait for the daemon (a connection is given 3 s of it at most);
    a long poll asks the daemon to answer well within it. Raises `InvalidInput` for a URL
    that is not an http(s) URL with a host.
    """

    def __init__(
        self, base_url: str, token: str | None, timeout: float = 30.0, site: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.site = site
        self._site_checked = site is None  # `_same_site`, before the first `call`
        self._seconds = timeout
        try:
            parts = urlsplit(self.base_url)
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"[api] url {base_url!r} is not a URL: {exc}") from None
        if parts.username is not None or parts.password is not None:
            # Not shown: it may hold a password, and the line goes to logs and job records.
            shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
            raise InvalidInput(
                f"[api] url {shown!r} must not carry a user or password (the daemon takes a "
                "bearer token: DATAMOVER_TOKEN or [api] token_file)"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"[api] url {base_url!r}: expected http://HOST[:PORT][/PREFIX]")
        if any(c.isspace() or not c.isprintable() for c in base_url):
            # http.client refuses such a URL on every try; it was "unreachable" (exit 6),
            # which a job's prolog retried for an hour.
            raise InvalidInput(f"[api] url {base_url!r} holds a space or a control character")
        if parts.query or parts.fragment:
            raise InvalidInput(f"[api] url {base_url!r} must not carry a query or a fragment")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._answered = False  # whether the daemon has answered this client yet
        self._port = port
        self._prefix = parts.path
        self._conn: http.client.HTTPConnection | None = None
        #: Why the last `reachable()` said False, for the caller's message.
        self.unreachable_because = ""

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if one is open."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """The open connection with `timeout` set, and whether it served a request before."""
        conn = self._conn
        if conn is None:
            if self._https:
                import ssl  # only for a daemon behind TLS: creating a context costs 10+ ms

                conn = http.client.HTTPSConnection(
                    self._host, self._port, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port)
            self._conn = conn
        reused = conn.sock is not None
        if not reused:
            conn.timeout = min(timeout, _CONNECT_SECONDS)
            conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        return conn, reused

    def _exchange(
        self, method: str, target: str, data: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        """Send one request and read its whole answer; sent once more on a fresh connection
        when a reused one turns out closed and the request cannot take effect twice."""
        for attempt in (1, 2):
            reused = False
            try:
                conn, reused = self._connection(timeout)
                conn.request(method, target, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read(_MAX_ANSWER + 1)
                if len(raw) > _MAX_ANSWER or resp.will_close or not resp.isclosed():
                    self.close()
                return resp.status, raw
            except _STALE:
                self.close()
                again = method in _IDEMPOTENT or "Idempotency-Key" in headers
                if not (reused and attempt == 1 and again):
                    raise
            except BaseException:
                self.close()  # a half-read answer would be taken for the next one's
                raise
        raise AssertionError("unreachable")

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """One request; its status and decoded JSON answer (None if it is not JSON).
        Raises `TransientError` when the daemon cannot be reached or stops answering."""
        target = self._prefix + path + ("?" + urlencode(params) if params else "")
        sent = {"Accept": "application/json", **(headers or {})}
        if self.token:
            sent["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        try:
            status, raw = self._exchange(method, target, data, sent, timeout or self._seconds)
            self._answered = True
        except (OSError, http.client.HTTPException) as exc:
            wrong = self._misconfigured(exc)
            if wrong is not None:
                raise InvalidInput(wrong) from None
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            raise TransientError(
                f"datamover daemon at {self.base_url} unreachable: {reason or type(exc).__name__}"
            ) from None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    def _misconfigured(self, exc: BaseException) -> str | None:
        """The one-line message when `exc`, met reaching the daemon, is one that no retry
        cures and `[api] url` or the host's TLS setup must change: a certificate that fails
        verification (or another TLS refusal, not one of `_TLS_TRANSIENT`), a host name that
        does not exist. None for failures worth retrying (refused, reset, timed out, a name
        server not answering: EAI_AGAIN)."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = exc.verify_message or exc.reason or str(exc)
            return (
                f"[api] url {self.base_url}: the daemon's TLS certificate failed verification "
                f"({why}): check the URL's host name and the trusted CA certificates "
                "(SSL_CERT_FILE)"
            )
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, _TLS_TRANSIENT):
            return (
                f"[api] url {self.base_url}: the TLS handshake failed ({exc.reason or exc}): "
                "is a TLS server at that address, and does it accept this client?"
            )
        # A name that resolved before in this client (a wait after its submission) and now
        # does not is a resolver's gap (split DNS, a VPN reconnecting): worth waiting out.
        if (
            isinstance(exc, socket.gaierror)
            and exc.errno == socket.EAI_NONAME
            and not self._answered
        ):
            return f"[api] url {self.base_url}: unknown host {self._host!r} ({exc.strerror or exc})"
        return None

    def reachable(self) -> bool:
        """True when the daemon answers `/healthz` within a second with its own answer, 200
        `{"status": "ok"}` (naming `site`, when given and the daemon names one, else
        `InvalidInput`); False when nothing answers in time or the answer is a server
        error (a daemon starting or stopping), with the cause in `unreachable_because`. Any
        other answer (a redirect, a proxy's 401 or 404, a web server's page), a TLS
        certificate that fails verification and a host name that does not exist are
        `InvalidInput`: `[api] url` leads to something other than the daemon, which no
        retry or local run mends."""
        self.unreachable_because = ""
        try:
            status, data = self.request("GET", "/healthz", timeout=1.0)
        except TransientError as exc:
            self.unreachable_because = exc.message
            return False
        if status == 200:
            if isinstance(data, dict) and data.get("status") == "ok":
                self._same_site(data)
                return True
            raise not_the_daemon(
                f"{self.base_url}/healthz", status, 'the daemon\'s {"status": "ok"}'
            )
        if status >= 500 or status == 429:
            self.unreachable_because = (
                f"datamover daemon at {self.base_url} unreachable: /healthz answered HTTP {status}"
            )
            return False
        raise InvalidInput(
            f"{self.base_url}/healthz answered HTTP {status}, not a datamover daemon's 200: "
            "check [api] url (a redirect or a proxy in between?)"
        )

    def _same_site(self, health: dict[str, Any]) -> None:
        """`InvalidInput` if `/healthz` answer `health` names another site than `site`: its
        work would be done at that site's paths, from that site's tree."""
        served = health.get("site")
        if self.site is not None and isinstance(served, str) and served != self.site:
            raise InvalidInput(
                f"[api] url {self.base_url} is the daemon of site {served!r}, not of "
                f"{self.site!r} ([site] name): check [api] url"
            )
        self._site_checked = True

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """One request; the decoded JSON object of a 2xx answer holding every key of
        `expect`, or the mapped error of an error answer. Any other answer (a redirect, an
        HTML page, JSON without those keys) is `InvalidInput` (`not_the_daemon`), not
        handed to a caller that would fail on it. `path` is sent as it is (already encoded):
        build its variable parts with `segment`. Before the first, unless `reachable`
        has: the daemon's `/healthz` must not name another site than `site`."""
        if not self._site_checked:
            status, health = self.request("GET", "/healthz")
            if status == 200 and isinstance(health, dict):
                self._same_site(health)
            self._site_checked = True  # another answer: the call below meets its cause
        status, data = self.request(method, path, body, params, headers)
        if status == 401 and not self.token and isinstance(data, dict) and _daemons(data):
            # The daemon's own "a bearer token is required" speaks of an HTTP header.
            raise Unauthorized(
                f"the daemon at {self.base_url} needs a token and this command has none: "
                "write one `datamover token create` printed to the file [api] token_file "
                "names (or set DATAMOVER_TOKEN)"
            )
        if not 200 <= status < 300:
            raise error_from(status, data, self.base_url)
        if not isinstance(data, dict):
            raise not_the_daemon(self.base_url, status, "a JSON object")
        missing = [key for key in expect if key not in data]
        if missing:
            raise not_the_daemon(self.base_url, status, f"the daemon's {missing[0]!r}")
        return data

    def submit(self, request: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """POST /v1/transfers."""
        headers = {"Idempotency-Key": key} if key else None
        return self.call("POST", "/v1/transfers", request, headers=headers, expect=TRANSFER)

    def get(self, transfer_id: str, hold: float = 0.0) -> dict[str, Any]:
        """GET /v1/transfers/{id}; with `hold`, the daemon answers once the transfer ends or
        `hold` seconds have passed (a long poll)."""
        params = {"wait": f"{hold:g}"} if hold > 0 else None
        path = f"/v1/transfers/{segment(transfer_id)}"
        return self.call("GET", path, params=params, expect=TRANSFER)

    def wait(
        self,
        transfer_id: str,
        on_update: Callable[[dict[str, Any]], None] | None = None,
        hold: float = 20.0,
        interval: float = 0.25,
        patience: float = 180.0,
    ) -> dict[str, Any]:
        """Long-poll until the transfer ends; return its final state.

        Each request may be held by the daemon up to `hold` seconds, so the end is seen at
        once without asking several times a second; `on_update` sees the transfer after
        every answer (give a short `hold`, e.g. 0.5, to draw progress). A daemon that
        answers a running transfer early (one that ignores `wait`) is asked again after
        `interval`. The transfer is durable, so a daemon restart (an upgrade, a crash) does
        not end it: while the daemon is unreachable this keeps trying for up to `patience`
        seconds.
        """
        if not 0 <= hold <= self._seconds - 5:
            raise ValueError(f"hold {hold} s does not fit the client's {self._seconds} s time-out")
        unreachable_since: float | None = None
        while True:
            asked = time.monotonic()
            try:
                transfer = self.get(transfer_id, hold)
            except TransientError:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > patience:
                    raise
                time.sleep(min(2.0, interval * 4))
                continue
            unreachable_since = None
            if on_update is not None:
                on_update(transfer)
            if transfer["state"] in TERMINAL:
                return transfer
            if time.monotonic() - asked < hold / 2:  # not held: poll at `interval`
                time.sleep(interval)
