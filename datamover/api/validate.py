"""Request parsing: JSON bodies and query parameters into checked values, or `InvalidInput`.

Each check names the field and what was wrong; unknown fields and unknown query parameters
are rejected, because a typo silently ignored (`"prioirty": "job"`, `?tennant=t2`) is a
request not honoured.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from aiohttp import web

from datamover.domain.ids import check_version_id
from datamover.domain.paths import check_logical_path
from datamover.domain.transfers import check_text, parse_time
from datamover.errors import InvalidInput

MAX_BODY = 64 * 1024


async def json_body(request: web.Request, allowed: set[str], required: set[str]) -> dict:
    """The request's JSON object, with only `allowed` keys and every `required` one."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(reason="send the request body as application/json")
    too_large = web.HTTPRequestEntityTooLarge(
        MAX_BODY, reason=f"request body is larger than {MAX_BODY} bytes"
    )
    if (request.content_length or 0) > MAX_BODY:
        raise too_large  # at once, by its length: it had waited for the body to arrive
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # `client_max_size`; aiohttp's reason names no size
        raise too_large from None
    except web.RequestPayloadError:  # `Content-Encoding: gzip` on a body that is not
        raise InvalidInput(
            "request body could not be decoded as its Content-Encoding says"
        ) from None
    except ConnectionResetError:
        # The client closed its connection before the body ended: no bug, though the
        # errors middleware would log it as one, with a traceback. The answer reaches no
        # one; aiohttp drops it quietly.
        raise InvalidInput("the connection closed before the request body ended") from None
    try:
        body = json.loads(raw, object_pairs_hook=_no_repeats)
    except _Repeated as exc:
        raise InvalidInput(f"field {exc.args[0]!r} appears twice in the request body") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON") from None
    except RecursionError:  # `[[[[...` within MAX_BODY goes deeper than the parser may
        raise InvalidInput("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidInput(f"missing field {missing[0]!r}")
    return body


class _Repeated(Exception):
    """A JSON object names one key twice (which value counts is anyone's guess)."""


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    made = dict(pairs)
    if len(made) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
    return made


def string(body: dict, name: str, *, optional: bool = False, max_len: int = 4096) -> str | None:
    """A string field (None allowed when `optional`): non-empty, at most `max_len`
    characters, no control characters, valid Unicode (`domain.transfers.check_text`)."""
    value = body.get(name)
    if value is None and optional:
        return None
    return check_text(value, f"field {name!r}", max_len)


def choice(body: dict, name: str, options: tuple[str, ...], default: str | None = None) -> str:
    """A string field restricted to `options`."""
    value = body.get(name, default)
    if value not in options:
        raise InvalidInput(f"field {name!r} must be one of {', '.join(options)}")
    return value


def flag(body: dict, name: str) -> bool:
    """A boolean field (default false)."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"field {name!r} must be true or false")
    return value


def logical_path(value: Any, name: str = "path") -> str:
    """A logical dataset path."""
    if not isinstance(value, str):
        raise InvalidInput(f"field {name!r} must be a logical path string")
    try:
        return check_logical_path(value)
    except InvalidInput as exc:
        raise InvalidInput(f"field {name!r}: {exc}") from None


def version(value: Any) -> str | None:
    """An optional version id."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput("field 'version' must be a version id string")
    return check_version_id(value)


def timestamp(value: Any, name: str) -> datetime | None:
    """An optional RFC 3339 time, converted to UTC (naive times are taken as UTC); times
    outside 1970..9999 are refused (`domain.transfers.parse_time`)."""
    if value is None:
        return None
    return parse_time(value, f"field {name!r}")


def check_query(request: web.Request, allowed: frozenset[str] = frozenset()) -> None:
    """Refuse a query parameter not in `allowed`, or one given twice: `?tennant=t2` would
    otherwise act on the caller's own tenant, `?stat=failed` list every state, and of
    `?limit=1&limit=1000` only the first would count. Every `/v1` handler calls it first."""
    seen: set[str] = set()
    for name, _ in request.query.items():  # every entry: iterating the keys skips repeats
        if name not in allowed:
            raise InvalidInput(f"unknown query parameter {name!r}")
        if name in seen:
            raise InvalidInput(f"query parameter {name!r} appears twice")
        seen.add(name)


def path_text(request: web.Request, name: str, max_len: int = 200) -> str:
    """A text segment of the URL path (`/v1/transfers/{id}`), checked like a string field:
    a NUL or another control character must be a 400, never reach the catalog."""
    return check_text(request.match_info[name], f"{name!r} in the URL", max_len)


def query_text(request: web.Request, name: str, max_len: int = 4096) -> str | None:
    """An optional free-text query parameter, checked like a string field; empty counts as
    absent."""
    raw = request.query.get(name)
    if not raw:
        return None
    return check_text(raw, f"query parameter {name!r}", max_len)


_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"[0-9.eE+-]+")  # float() then refuses a malformed one
_TRANSFER_ID = re.compile(r"tr-[0-9]{8}T[0-9]{12}-[0-9a-f]{8}")


def query_transfer_id(request: web.Request, name: str) -> str | None:
    """An optional transfer id (`tr-<time>-<hex>`, as `next` gives it) in the query."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if not _TRANSFER_ID.fullmatch(raw):
        raise InvalidInput(
            f"query parameter {name!r} must be a transfer id (tr-...), as 'next' gives it"
        )
    return raw


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within `[low, high]`."""
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() also takes a fullwidth `5`, `1_000` and ` 5 `, which no client means
    try:
        if not _INTEGER.fullmatch(raw):
            raise ValueError(raw)
        value = int(raw)  # a ValueError past 4300 digits
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be between {low} and {high}")
    return value


def query_seconds(request: web.Request, name: str, high: float) -> float:
    """A duration in seconds (decimal, `0` to `high`; 0 when absent)."""
    raw = request.query.get(name)
    if raw is None:
        return 0.0
    # ASCII only: float() also takes a fullwidth `5`, `1_0`, ` 5 `, `inf` and `nan`
    try:
        if not _DECIMAL.fullmatch(raw):
            raise ValueError(raw)
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be a number of seconds") from None
    if not 0 <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be between 0 and {high:g} seconds")
    return value


def query_choice(request: web.Request, name: str, options: tuple[str, ...]) -> str | None:
    """An optional query parameter restricted to `options`."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw not in options:
        raise InvalidInput(f"query parameter {name!r} must be one of {', '.join(options)}")
    return raw
