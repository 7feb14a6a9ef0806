"""A client of the site daemon's REST API, for the CLI and the job-staging hooks.

Error responses become the same `DatamoverError` classes the library raises, so the CLI
prints one line and exits with the same code whether it worked locally or via the daemon.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from datamover.config import Config
from datamover.errors import (
    HTTP_STATUS,
    Conflict,
    DatamoverError,
    InvalidInput,
    TransientError,
    error_class,
)

_BY_STATUS = {status: cls for cls, status in reversed(HTTP_STATUS)}
TERMINAL = ("succeeded", "failed", "cancelled")


def segment(value: str) -> str:
    """`value` as one URL path segment: every reserved character percent-encoded (`/`, `?`,
    `#`, `%` included) and every `.` too, so `..` cannot climb out of its route; the daemon
    decodes it back to exactly `value`."""
    return quote(value, safe="").replace(".", "%2E")


def _checked_token(token: str, source: str) -> str | None:
    token = token.strip()
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise InvalidInput(f"{source}: the token may hold only printable ASCII characters")
    return token or None


def load_token(config: Config) -> str | None:
    """The CLI's token: `DATAMOVER_TOKEN`, else the file named by `[api] token_file`.

    Raises `InvalidInput` when the file cannot be read or the token holds characters an
    HTTP header cannot carry (a newline, a space, non-ASCII)."""
    token = os.environ.get("DATAMOVER_TOKEN")
    if token:
        return _checked_token(token, "DATAMOVER_TOKEN")
    if config.api.token_file:
        try:
            text = Path(config.api.token_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(
                f"the token file {config.api.token_file!r} is not UTF-8 text"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"cannot read the token file {config.api.token_file!r}: {exc.strerror}"
            ) from None
        return _checked_token(text, f"token file {config.api.token_file!r}")
    return None


def error_from(status: int, body: Any) -> DatamoverError:
    """The library error for an API error response."""
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") or f"daemon answered HTTP {status}"
    code = error.get("code", "")
    cls = error_class(code) or _BY_STATUS.get(status) or DatamoverError
    exc = cls(message, error.get("paths"))
    exc.code = code or exc.code
    return exc


def transfer_error(transfer: dict[str, Any]) -> DatamoverError:
    """The error a failed or cancelled transfer ended with."""
    if transfer["state"] == "cancelled":
        return Conflict(f"transfer {transfer['id']} was cancelled")
    error = transfer.get("error") or {}
    cls = error_class(error.get("code", "")) or DatamoverError
    exc = cls(
        f"transfer {transfer['id']} failed: {error.get('message', 'unknown reason')}",
        error.get("paths"),
    )
    return exc


class DaemonClient:
    """Talks to one daemon at `base_url` with `token`. Use as an async context manager."""

    def __init__(self, base_url: str, token: str | None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._seconds = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=3)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> DaemonClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def reachable(self) -> bool:
        """True when the daemon answers `/healthz` within a second."""
        assert self._session is not None
        try:
            async with self._session.get(
                self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or the mapped error. `path` is sent as it
        is (already encoded): build its variable parts with `segment`."""
        assert self._session is not None
        url = URL(self.base_url + path, encoded=True)
        try:
            async with self._session.request(
                method, url, json=body, params=params, headers=headers
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = None
                if resp.status >= 400:
                    raise error_from(resp.status, data)
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransientError(
                f"datamover daemon at {self.base_url} unreachable: {exc or type(exc).__name__}"
            ) from None

    async def submit(self, request: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """POST /v1/transfers."""
        headers = {"Idempotency-Key": key} if key else None
        return await self.call("POST", "/v1/transfers", request, headers=headers)

    async def get(self, transfer_id: str, hold: float = 0.0) -> dict[str, Any]:
        """GET /v1/transfers/{id}; with `hold`, the daemon answers once the transfer ends or
        `hold` seconds have passed (a long poll)."""
        params = {"wait": f"{hold:g}"} if hold > 0 else None
        return await self.call("GET", f"/v1/transfers/{segment(transfer_id)}", params=params)

    async def wait(
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
        loop = asyncio.get_running_loop()
        unreachable_since: float | None = None
        while True:
            asked = loop.time()
            try:
                transfer = await self.get(transfer_id, hold)
            except TransientError:
                now = loop.time()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > patience:
                    raise
                await asyncio.sleep(min(2.0, interval * 4))
                continue
            unreachable_since = None
            if on_update is not None:
                on_update(transfer)
            if transfer["state"] in TERMINAL:
                return transfer
            if loop.time() - asked < hold / 2:  # not held: poll at `interval`
                await asyncio.sleep(interval)
