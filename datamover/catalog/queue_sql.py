"""SQL pieces of the transfer queue's rules: which transfers overlap, which are ahead of
which, what putting one back in the queue writes. `catalog.transfers` builds its queries
from them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, or_

from datamover.catalog.engine import path_under
from datamover.catalog.models import Transfer
from datamover.domain.transfers import State

T = Transfer
OTHER = T.alias("other")


def requeued(at: datetime) -> dict[str, Any]:
    """UPDATE values that put a running transfer back in the queue, or cancel it when a
    cancel was requested while it ran (a queued transfer with that flag is never claimed)."""
    return {
        "state": case((T.c.cancel_requested, State.CANCELLED.value), else_=State.QUEUED.value),
        "finished_at": case((T.c.cancel_requested, at), else_=T.c.finished_at),
    }


def running_over(path: Any) -> Any:
    """SQL: a transfer runs on `path` or on a path above or below it."""
    return exists().where(OTHER.c.state == State.RUNNING.value, overlaps(OTHER.c.path, path))


def queued_above(path: str, rank: datetime, transfer_id: str) -> Any:
    """SQL: a transfer on `path` or a path above it is queued ahead of the one at (`rank`,
    `transfer_id`) (the SQL form of the rule `Transfers._first_free` applies)."""
    return exists().where(
        OTHER.c.path.in_(sorted(lineage(path))),
        OTHER.c.state == State.QUEUED.value,
        ~OTHER.c.cancel_requested,
        precedes(OTHER.c.rank_time, OTHER.c.id, rank, transfer_id),
    )


def precedes(rank_a: Any, id_a: Any, rank_b: Any, id_b: Any) -> Any:
    """SQL: (`rank_a`, `id_a`) comes before (`rank_b`, `id_b`) in queue order."""
    return or_(rank_a < rank_b, and_(rank_a == rank_b, id_a < id_b))


def after_in_queue(rank: datetime, transfer_id: str) -> Any:
    """SQL: a transfer comes after the one at (`rank`, `transfer_id`) in queue order, the
    keyset condition of the claim's next page.

    `rank_time >= rank` is implied by `precedes` but stated on its own: it is the bound the
    queue index (`state`, `rank_time`) can seek to. With the OR alone both engines read the
    index from the queue's start on every page, so a claim behind N blocked transfers read
    N^2/128 rows (4-7 s with 40,000 stages of one path waiting behind its running one)."""
    return and_(T.c.rank_time >= rank, precedes(rank, transfer_id, T.c.rank_time, T.c.id))


def lineage(path: str) -> set[str]:
    """`path` and every path above it: `{"/p", "/p/a"}` for `/p/a`."""
    parts = path.split("/")
    return {"/".join(parts[:i]) for i in range(2, len(parts) + 1)}


def overlaps(a: Any, b: Any) -> Any:
    """SQL: paths `a` and `b` are equal or one lies below the other (component-wise; plain
    string functions, so `%` and `_` in names need no escaping)."""
    return or_(
        a == b,
        func.substr(b, 1, func.length(a) + 1) == a + "/",
        func.substr(a, 1, func.length(b) + 1) == b + "/",
    )


def top(path: str) -> str:
    """The first component of a logical path (`/proj` of `/proj/a/b`): the claim lock's key."""
    return "/" + path.split("/")[1]


def under(prefix: str) -> Any:
    """SQL: a transfer's path is `prefix` or lies below it (`engine.path_under`)."""
    return path_under(T.c.path, prefix)
