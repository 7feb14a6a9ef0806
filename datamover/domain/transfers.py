"""Transfer states, priorities and the table of allowed transitions. Pure.

A transfer is a durable job (push or stage of one dataset). Its state changes only through
`catalog.transfers.transition`, which checks this table inside the same UPDATE that makes
the change, so two workers can never both move one transfer out of the same state.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime, timedelta

from datamover.errors import InvalidInput


class State(enum.StrEnum):
    """Where a transfer is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Kind(enum.StrEnum):
    """What a transfer does."""

    PUSH = "push"
    STAGE = "stage"


class Priority(enum.StrEnum):
    """Priority classes, highest first: a job waiting to start, a person waiting, the rest."""

    JOB = "job"
    INTERACTIVE = "interactive"
    BULK = "bulk"


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})

#: state -> states it may move to. RUNNING -> QUEUED is a retry, a drain or a takeover.
ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.CANCELLED}),
    State.RUNNING: frozenset({State.QUEUED, State.SUCCEEDED, State.FAILED, State.CANCELLED}),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}


def sources(target: State) -> frozenset[State]:
    """The states from which `target` may be entered."""
    return frozenset(s for s, nxt in ALLOWED.items() if target in nxt)


# Aging by construction: a transfer is ordered by a virtual time, its creation time shifted
# by its class. A bulk transfer waiting longer than the shift overtakes fresh job staging,
# so nothing starves. A deadline pulls a transfer forward to shortly before it is due, on
# its class's clock too: unshifted, a job transfer's deadline (-1 h) mattered only once it
# was 50 minutes past, and an interactive one's only within 10 minutes of it. A deadline
# moves a transfer ahead by at most the lead: one already past when submitted counts as due
# then, so a deadline of 1970 cannot put a bulk transfer before every job transfer.
_SHIFT = {
    Priority.JOB: timedelta(hours=-1),
    Priority.INTERACTIVE: timedelta(0),
    Priority.BULK: timedelta(hours=1),
}
_DEADLINE_LEAD = timedelta(minutes=10)


def rank_time(created: datetime, priority: Priority, deadline: datetime | None) -> datetime:
    """The ordering key of a queued transfer: smaller runs first.

    `min(created, deadline - 10 min)`, shifted by the class (job -1 h, bulk +1 h): within a
    class the transfer due first runs first (those without a deadline count from their
    creation), and a class keeps its precedence over the next, whose deadline is as far as
    the shifts apart. A deadline already past at submission counts as due then
    (`created - 10 min` at the earliest): unbounded, a deadline of 1970 put a transfer of
    any class before every transfer of every class. The key is computed once, at
    submission: changing this rule leaves the stored keys of transfers already queued as
    they are."""
    rank = created
    if deadline is not None:
        rank = min(rank, max(deadline, created) - _DEADLINE_LEAD)
    return rank + _SHIFT[priority]


def retry_delay(attempt: int) -> float:
    """Seconds to wait before attempt number `attempt + 1` after a transient failure."""
    return float(min(300, 2 ** min(attempt, 12)))


# -- input checks shared by the API and the CLI (pure, so the CLI needs no aiohttp) --------

#: Deadlines and other times a user gives must fall in this range: earlier or later ones are
#: typos, and at the edges of `datetime`'s range `rank_time` arithmetic would overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def check_text(value: object, what: str, max_len: int = 200) -> str:
    """Return `value` if it is a usable identifier-like string (a pin, a tenant, a transfer
    id), else raise `InvalidInput` naming `what`: non-empty, at most `max_len` characters,
    no control characters (C0, DEL, C1), encodable as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty string")
    if len(value) > max_len:
        raise InvalidInput(f"{what} is longer than {max_len} characters")
    for c in value:
        o = ord(c)
        if o < 32 or 127 <= o <= 159:
            raise InvalidInput(f"{what} contains the control character U+{o:04X}")
        if 0xD800 <= o <= 0xDFFF:
            raise InvalidInput(f"{what} is not valid Unicode (a lone surrogate)")
    return value


def check_idempotency_key(key: str) -> str:
    """Return `key` if it is 1-200 printable ASCII characters (it travels as an HTTP header),
    else raise `InvalidInput`."""
    if not 0 < len(key) <= 200 or any(not 0x21 <= ord(c) <= 0x7E for c in key):
        raise InvalidInput("Idempotency-Key must be 1-200 printable ASCII characters, no spaces")
    return key


_DATE_ONLY = re.compile(r"[0-9]{4}-?[0-9]{2}-?[0-9]{2}")
#: RFC 3339's date-time (section 5.6; a space for the `T` as its note allows), the offset
#: optional: ISO 8601's other forms, which `fromisoformat` takes too (week dates, ordinal
#: dates, no seconds, no separators), are not what a client means to send.
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)


def with_offset(value: str, what: str) -> str:
    """`value`, checked as `parse_time` checks it, with its offset made explicit: to a user
    at a terminal a date-time without one is a local time (08:00 typed in Tokyo is 08:00
    there), so it gets the local offset; the API takes such a time as UTC."""
    parse_time(value, what)
    match = _DATE_TIME.fullmatch(value.strip())
    if match is None or match.group(2) is not None:
        return value
    return datetime.fromisoformat(value.strip()).astimezone().isoformat()


def parse_time(value: object, what: str) -> datetime:
    """An RFC 3339 date-time string as an aware UTC datetime, else `InvalidInput` naming
    `what`. A time without an offset is taken as UTC; an offset is converted, not dropped;
    fractions of a second have at most 6 digits (none is cut off); times outside
    1970..9999 are refused."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be an RFC 3339 date-time string")
    text = value.strip()
    if _DATE_ONLY.fullmatch(text):  # midnight where? a deadline needs its time of day
        raise InvalidInput(
            f"{what} {value!r} has no time of day: give an RFC 3339 date-time, such as "
            f"{text}T00:00:00Z"
        )
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        if not _DATE_TIME.fullmatch(value.strip()):
            raise ValueError(value)
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{what} is not an RFC 3339 date-time (such as 2026-12-01T22:00:00Z): {value!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:
        parsed = None  # type: ignore[assignment]
    if parsed is None or not EARLIEST <= parsed <= LATEST:
        raise InvalidInput(f"{what} {value!r} is outside 1970-01-01 .. 9999-12-31")
    return parsed
