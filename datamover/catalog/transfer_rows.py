"""Transfers as values: the row the API shows (`TransferRow`), what a client asks for
(`Submission`), the columns of a success (`succeeded_values`), ids and times. No queries:
`catalog.transfers` runs those."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from datamover.domain.transfers import State
from datamover.errors import Conflict

#: The key of the `options` column that keeps the pin as submitted; never an option shown.
SUBMITTED_PIN = "submitted_pin"


def now() -> datetime:
    """The current UTC time (the catalog stores aware datetimes)."""
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """`value` as an aware UTC datetime: SQLite hands back naive ones, written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def new_transfer_id(at: datetime | None = None) -> str:
    """`tr-<UTC time>-<random>`: sortable by creation, unique without coordination."""
    stamp = (at or now()).strftime("%Y%m%dT%H%M%S%f")
    return f"tr-{stamp}-{secrets.token_hex(4)}"


def iso(value: datetime | None) -> str | None:
    """`2026-11-29T18:15:00.123456Z`, as the API shows times."""
    value = aware(value)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value is not None else None


@dataclass(frozen=True)
class TransferRow:
    """A transfer as the API shows it."""

    id: str
    tenant: str
    kind: str
    path: str
    version: str | None
    priority: str
    deadline: str | None
    pin: str | None
    options: dict[str, Any]
    state: str
    attempts: int
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str
    files_done: int
    files_total: int | None
    bytes_done: int
    bytes_total: int | None
    bytes_moved: int
    rate: float
    eta_seconds: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    lease_owner: str | None
    submitted_pin: str | None  # `pin` as submitted: a release takes it off `pin` only

    @classmethod
    def from_row(cls, r: Any) -> TransferRow:
        """Build from a `transfers` row."""
        eta = None
        if r.state == State.RUNNING and r.rate > 0 and r.bytes_total is not None:
            eta = round(max(r.bytes_total - r.bytes_done, 0) / r.rate, 1)
        options = json.loads(r.options)
        # Rows written before the submitted pin was kept there hold it in `pin` only.
        submitted_pin = options.pop(SUBMITTED_PIN, r.pin)
        error = None
        if r.error_code:
            error = {
                "code": r.error_code,
                "message": r.error_message,
                "paths": json.loads(r.error_paths or "[]"),
            }
        return cls(
            id=r.id,
            tenant=r.tenant,
            kind=r.kind,
            path=r.path,
            version=r.version,
            priority=r.priority,
            deadline=iso(r.deadline),
            pin=r.pin,
            options=options,
            state=r.state,
            attempts=r.attempts,
            cancel_requested=bool(r.cancel_requested),
            created_at=iso(r.created_at) or "",
            started_at=iso(r.started_at),
            finished_at=iso(r.finished_at),
            updated_at=iso(r.updated_at) or "",
            files_done=r.files_done,
            files_total=r.files_total,
            bytes_done=r.bytes_done,
            bytes_total=r.bytes_total,
            bytes_moved=r.bytes_moved,
            rate=round(r.rate, 1),
            eta_seconds=eta,
            result=json.loads(r.result) if r.result else None,
            error=error,
            lease_owner=r.lease_owner,
            submitted_pin=submitted_pin,
        )

    def to_json(self) -> dict[str, Any]:
        """The API representation (the lease owner and the submitted pin are internal)."""
        data = asdict(self)
        del data["lease_owner"], data["submitted_pin"]
        return data


@dataclass(frozen=True)
class Submission:
    """What a client asks for (validated by the API before it gets here)."""

    tenant: str
    kind: str
    path: str
    version: str | None = None
    priority: str = "interactive"
    deadline: datetime | None = None
    pin: str | None = None
    options: dict[str, Any] | None = None
    idempotency_key: str | None = None

    def stored_options(self) -> str:
        """The `options` column: the options, and the pin as submitted (`SUBMITTED_PIN`),
        which a release leaves there when it takes the pin off the `pin` column."""
        options = dict(self.options or {})
        if self.pin is not None:
            options[SUBMITTED_PIN] = self.pin
        return json.dumps(options, sort_keys=True)

    def same_request(self, row: TransferRow) -> bool:
        """True when `row` was created by an equal request (for idempotent retries): by
        the pin submitted, which a release since then has not changed."""
        return (
            row.kind == self.kind
            and row.path == self.path
            and row.version == self.version
            and row.priority == self.priority
            and row.deadline == iso(self.deadline)
            and row.submitted_pin == self.pin
            and row.options == (self.options or {})
        )


class KeyReused(Conflict):
    """An idempotency key of the tenant already names the transfer `existing`, made by a
    different request. The message does not name that transfer: the caller, a token of
    the tenant for other paths, may not be allowed to see it; the API names it to one who
    may."""

    existing: TransferRow | None = None


def succeeded_values(
    result: dict[str, Any], files_done: int = 0, bytes_done: int = 0
) -> dict[str, Any]:
    """The columns of a transfer that succeeded with `result` (its command's JSON): its
    counts (else the progress counted, `files_done` and `bytes_done`), the bytes it moved,
    the result itself, and no error: an earlier attempt's error (kept to say why it waited
    to retry) is not how it ended."""
    return {
        "files_done": result.get("files", files_done),
        "bytes_done": result.get("bytes", bytes_done),
        "files_total": result.get("files"),
        "bytes_total": result.get("bytes"),
        "bytes_moved": result.get("uploaded_bytes", result.get("downloaded_bytes", 0)),
        "result": json.dumps(result, sort_keys=True),
        "error_code": None,
        "error_message": None,
        "error_paths": None,
    }
