"""Transfer states, priorities and the table of allowed transitions. Pure.

A transfer is a durable job (push or stage of one dataset). Its state changes only through
`catalog.transfers.transition`, which checks this table inside the same UPDATE that makes
the change, so two workers can never both move one transfer out of the same state.
"""

from __future__ import annotations

import enum
from datetime import datetime, timedelta


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
# so nothing starves; a deadline pulls a transfer forward to shortly before it is due.
_SHIFT = {
    Priority.JOB: timedelta(hours=-1),
    Priority.INTERACTIVE: timedelta(0),
    Priority.BULK: timedelta(hours=1),
}
_DEADLINE_LEAD = timedelta(minutes=10)


def rank_time(created: datetime, priority: Priority, deadline: datetime | None) -> datetime:
    """The ordering key of a queued transfer: smaller runs first."""
    rank = created + _SHIFT[priority]
    if deadline is not None:
        rank = min(rank, deadline - _DEADLINE_LEAD)
    return rank


def retry_delay(attempt: int) -> float:
    """Seconds to wait before attempt number `attempt + 1` after a transient failure."""
    return float(min(300, 2 ** min(attempt, 12)))
