"""Structured logs: one JSON object per line, carrying the transfer id being worked on.

The transfer id travels in a context variable, so every log line emitted while a worker
runs a transfer (in the worker, the store wrappers, push or stage) names it without being
passed around.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

_transfer: contextvars.ContextVar[str | None] = contextvars.ContextVar("transfer", default=None)


@contextlib.contextmanager
def transfer_context(transfer_id: str) -> Iterator[None]:
    """Log lines inside this block carry `transfer_id`."""
    token = _transfer.set(transfer_id)
    try:
        yield
    finally:
        _transfer.reset(token)


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "transfer"?, "error"?}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        transfer = _transfer.get()
        if transfer:
            entry["transfer"] = transfer
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class MalformedRequests(logging.Filter):
    """aiohttp logs every request its HTTP parser refuses as an error with a traceback whose
    message quotes the offending line: an `Authorization` header with a stray control
    character put its bearer token in the log. The client has its 400 already; keep one
    warning naming the problem, without the quoted bytes. Likewise for a body that does
    not decode as its `Content-Encoding` says, which aiohttp logs with a traceback when it
    drains the body after the answer (the route has answered 400, 401 or whatever it
    would)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError
        from aiohttp.web import RequestPayloadError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = re.split(r"[:'\"\n]", str(exc.message), maxsplit=1)[0].strip()
            record.msg = "refused a malformed HTTP request from %s: %s"
            record.args = (*(record.args or ()), reason or type(exc).__name__)
        elif isinstance(exc, RequestPayloadError):
            # A body that does not decode as its `Content-Encoding` says, met again as
            # aiohttp drains it after the answer (a 400, or whatever the route said).
            record.msg = "a request body did not decode as its Content-Encoding says"
            record.args = ()
        else:
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup_json_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON lines (the daemon's log format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiobotocore", "botocore", "aiohttp.access", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequests())
