"""Version ids: sortable by time, carrying the pushing site, unique without coordination.

Form: `20261129T181500.123456Z-hpc-a-3f9a1c0b`. The greatest id is a dataset's latest
version; two sites publishing at once both succeed and the later id wins "latest".
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta

from datamover.errors import InvalidInput

SITE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
VERSION_RE = re.compile(
    r"^(\d{8}T\d{6}\.\d{6}Z)-([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)-[0-9a-f]{8}$"
)
_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


def check_site_name(name: str) -> str:
    """Return `name` if it is a valid site name (lowercase DNS label), else `InvalidInput`."""
    if not isinstance(name, str) or not SITE_RE.match(name):
        raise InvalidInput(
            f"invalid site name {name!r}: use 1-63 lowercase letters, digits and '-'"
        )
    return name


def check_version_id(version: str) -> str:
    """Return `version` if well-formed, else raise `InvalidInput` naming it."""
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidInput(f"invalid version id {version!r}")
    return version


def version_time(version: str) -> datetime:
    """The creation time encoded in a version id."""
    match = VERSION_RE.match(check_version_id(version))
    assert match is not None
    return datetime.strptime(match.group(1), _TIME_FORMAT).replace(tzinfo=UTC)


def new_version_id(site: str, after: str | None = None, now: datetime | None = None) -> str:
    """A fresh id for `site`, strictly greater than `after` (the parent) even if clocks skew."""
    stamp = now or datetime.now(UTC)
    if after is not None:
        floor = version_time(after) + timedelta(microseconds=1)
        stamp = max(stamp, floor)
    return f"{stamp.strftime(_TIME_FORMAT)}-{check_site_name(site)}-{secrets.token_hex(4)}"
