"""Version ids: sortable by time, carrying the pushing site, unique without coordination.

Form: `20261129T181500.123456Z-hpc-a-3f9a1c0b`. The greatest id is a dataset's latest
version; two sites publishing at once both succeed and the later id wins "latest".
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

from datamover.errors import Corrupt, InvalidInput

# ASCII only (`\d` would match every Unicode digit) and anchored with `\Z` by `fullmatch`
# (`$` also matches before a final newline).
SITE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
VERSION_RE = re.compile(
    r"([0-9]{8}T[0-9]{6}\.[0-9]{6}Z)-([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)-[0-9a-f]{8}", re.ASCII
)
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def check_site_name(name: str) -> str:
    """Return `name` if it is a valid site name (lowercase DNS label), else `InvalidInput`."""
    if not isinstance(name, str) or not SITE_RE.fullmatch(name):
        raise InvalidInput(
            f"invalid site name {name!r}: use 1-63 lowercase letters, digits and '-'"
        )
    return name


def check_version_id(version: str) -> str:
    """Return `version` if well-formed, else raise `InvalidInput` naming it.

    Well-formed: `<time>Z-<site>-<8 hex>` in ASCII, the time a real UTC instant (a month
    13 or a 30 February would sort like any other id but could never be followed).
    """
    match = VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise InvalidInput(f"invalid version id {version!r}")
    try:
        datetime.strptime(match.group(1), _TIME_FORMAT)
    except ValueError:
        raise InvalidInput(f"invalid version id {version!r}: no such time") from None
    return version


def version_time(version: str) -> datetime:
    """The creation time encoded in a version id (`InvalidInput` if it is not one)."""
    check_version_id(version)
    return datetime.strptime(version[:23], _TIME_FORMAT).replace(tzinfo=UTC)


def new_version_id(site: str, after: str | None = None, now: datetime | None = None) -> str:
    """A fresh id for `site`, strictly greater than `after` (the parent) even if clocks skew.

    Raises `Corrupt` if `after` is dated at the last representable microsecond (only a
    hostile or broken store holds such an id: nothing can follow it).
    """
    stamp = (now or datetime.now(UTC)).astimezone(UTC)
    if after is not None:
        try:
            floor = version_time(after) + timedelta(microseconds=1)
        except OverflowError:
            raise Corrupt(
                f"version {after} is dated at the end of time: no version can follow it"
            ) from None
        stamp = max(stamp, floor)
    # Not `strftime`: it writes years before 1000 with fewer than four digits.
    s = stamp
    text = (
        f"{s.year:04d}{s.month:02d}{s.day:02d}T{s.hour:02d}{s.minute:02d}{s.second:02d}"
        f".{s.microsecond:06d}Z"
    )
    # os.urandom is what `secrets` uses; importing `secrets` (hmac, hashlib) cost the CLI's
    # thin client 5 ms of its start.
    return f"{text}-{check_site_name(site)}-{os.urandom(4).hex()}"
