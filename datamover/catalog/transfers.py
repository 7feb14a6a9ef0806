"""The transfer queue in the catalog: submit, claim with leases, heartbeat, transition.

Every state change goes through `Transfers.transition`: one UPDATE whose WHERE clause holds
the allowed source states (from `domain.transfers.ALLOWED`) and, for a running transfer, the
lease owner. If another worker got there first the UPDATE changes no row and the caller gets
a `Conflict`, so no transfer can be run, finished or cancelled twice.

Claiming takes the first queued transfer in `rank_time` order whose `not_before` has passed
and whose tree is free (`Transfers._first_free`), locked with `FOR UPDATE SKIP LOCKED` on
PostgreSQL so several processes never wait on each other; the guarded UPDATE makes it safe
on SQLite too. A running transfer whose lease lapsed (its worker died) is put back in the
queue first and resumes from its checkpoint; one whose cancel was requested while it ran is
cancelled instead of queued again.

A claim that found nothing free is remembered: the next claims answer None without reading
the queue until this process changes it so that something may be free (a transfer ends or
goes back in the queue, one is queued on a tree no running transfer blocks), a retry's time
comes, or `recheck` seconds passed (for what other processes change).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Executable,
    delete,
    false,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from datamover.catalog.queue_sql import (
    T,
    after_in_queue,
    lineage,
    queued_above,
    requeued,
    running_over,
    top,
    under,
)
from datamover.catalog.transfer_rows import (
    KeyReused,
    Submission,
    TransferRow,
    aware,
    new_transfer_id,
    now,
    succeeded_values,
)
from datamover.domain.transfers import TERMINAL, State, rank_time, sources
from datamover.errors import CatalogUnavailable, Conflict, NotFound, RunsExhausted

log = logging.getLogger(__name__)

_CLAIM_PAGE = 64  # queued transfers read at a time while looking for one to claim
_ANSWER_BATCH = 500  # stages answered in one transaction (`Transfers.answer_stages`)
#: Ended transfers deleted per statement, each in a transaction of its own: a first prune of
#: millions holds SQLite's write lock, or one PostgreSQL transaction, for a batch at a time.
PRUNE_BATCH = 1000
_LIVE = sorted(s.value for s in State if s not in TERMINAL)  # states a transfer may leave
# First key of the claim's two-key advisory lock, so its keys (the second, a hash of the
# path's first component) cannot meet one-key advisory locks of other users of the database.
_LOCK_SPACE = 0x646D  # "dm"
#: Seconds a claim that found nothing free holds for other claims of this process, as to
#: what other processes sharing the catalog change (what this process changes ends it).
RECHECK = 0.5


@dataclass
class _Scan:
    """What a claim's scan of the queue met, besides what it took: the paths of queued
    transfers a running one blocks, the first time a transfer waiting out a retry is due
    (catalog clock), and whether it skipped one another process was claiming."""

    busy: set[str] = field(default_factory=set)
    next_due: datetime | None = None
    skipped: bool = False


@dataclass(frozen=True)
class _NothingFree:
    """A claim found nothing free: no claim of this process need read the queue again
    before `until` (monotonic) unless this process changes it. A transfer queued on one of
    `busy`, paths a running transfer blocks, is blocked too, and changes nothing."""

    until: float
    busy: frozenset[str]


class Transfers:
    """Queries over the `transfers` table."""

    def __init__(self, engine: AsyncEngine, max_attempts: int = 5) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.max_attempts = max_attempts
        self.answer_batch = _ANSWER_BATCH  # stages `answer_stages` answers at a time
        self.recheck = RECHECK  # seconds a claim that found nothing free holds (see `claim`)
        self._nothing_free: _NothingFree | None = None
        self._changes = 0  # changes this process made that may have freed a transfer

    def _changed(self) -> None:
        """This process changed the queue so that a transfer may be free now: the next claim
        reads it. Called after the change was committed, so a claim reading the queue
        since sees it; one that began before may not, and is not remembered."""
        self._nothing_free = None
        self._changes += 1

    async def get(self, transfer_id: str) -> TransferRow:
        """One transfer; `NotFound` if there is none with that id."""
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(T).where(T.c.id == transfer_id))).first()
        if r is None:
            raise NotFound(f"no transfer {transfer_id!r}")
        return TransferRow.from_row(r)

    async def stage_ended_since_asked(self, transfer: TransferRow) -> TransferRow | None:
        """The stage of `transfer`'s path that succeeded last, if it finished at or after
        `transfer` was submitted (both times on the catalog's clock), else None."""
        asked = select(T.c.created_at).where(T.c.id == transfer.id).scalar_subquery()
        query = (
            select(T)
            .where(
                T.c.path == transfer.path,
                T.c.kind == "stage",
                T.c.state == State.SUCCEEDED.value,
                T.c.id != transfer.id,
                T.c.finished_at >= asked,
            )
            .order_by(T.c.finished_at.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            r = (await conn.execute(query)).first()
        return TransferRow.from_row(r) if r is not None else None

    async def _by_key(self, tenant: str, key: str) -> TransferRow | None:
        query = select(T).where(T.c.tenant == tenant, T.c.idempotency_key == key)
        async with self.engine.connect() as conn:
            r = (await conn.execute(query)).first()
        return TransferRow.from_row(r) if r is not None else None

    async def submit(self, sub: Submission) -> tuple[TransferRow, bool]:
        """Queue a transfer; return it and whether it is new.

        With an idempotency key, a repeated submission returns the first transfer; reusing a
        key for a different request is a `KeyReused` conflict.
        """
        if sub.idempotency_key:
            existing = await self._by_key(sub.tenant, sub.idempotency_key)
            if existing is not None:
                return self._check_same(sub, existing), False
        at = await self.clock()
        values = {
            "id": new_transfer_id(at),
            "tenant": sub.tenant,
            "kind": sub.kind,
            "path": sub.path,
            "version": sub.version,
            "priority": sub.priority,
            "deadline": sub.deadline,
            "pin": sub.pin,
            "options": sub.stored_options(),
            "state": State.QUEUED.value,
            "rank_time": rank_time(at, sub.priority, sub.deadline),  # type: ignore[arg-type]
            "not_before": at,
            "attempts": 0,
            "max_attempts": self.max_attempts,
            "cancel_requested": False,
            "created_at": at,
            "updated_at": at,
            "files_done": 0,
            "bytes_done": 0,
            "bytes_moved": 0,
            "rate": 0.0,
            "idempotency_key": sub.idempotency_key,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(T.insert().values(**values))
        except IntegrityError:
            # Two retries of one request raced; the other insert won.
            existing = await self._by_key(sub.tenant, sub.idempotency_key or "")
            if existing is None:
                raise
            return self._check_same(sub, existing), False
        nothing = self._nothing_free
        if nothing is None or sub.path not in nothing.busy:  # it may be free
            self._changed()
        return await self.get(values["id"]), True

    @staticmethod
    def _check_same(sub: Submission, row: TransferRow) -> TransferRow:
        if not sub.same_request(row):
            exc = KeyReused(
                f"idempotency key {sub.idempotency_key!r} was used for a different request"
            )
            exc.existing = row
            raise exc
        return row

    async def list(
        self,
        *,
        tenant: str | None = None,
        prefixes: list[str] | None = None,
        state: str | None = None,
        kind: str | None = None,
        path_prefix: str | None = None,
        after: str | None = None,
        limit: int = 100,
        newest: bool = False,
    ) -> list[TransferRow]:
        """Transfers in id (creation) order, newest last (with `newest`, first), filtered;
        `after` is the cursor: the listing goes on past that id, in its order."""
        query = select(T)
        if tenant is not None:
            query = query.where(T.c.tenant == tenant)
        if prefixes is not None:
            query = query.where(or_(*(under(p) for p in prefixes)) if prefixes else false())
        if state:
            query = query.where(T.c.state == state)
        if kind:
            query = query.where(T.c.kind == kind)
        if path_prefix:
            query = query.where(under(path_prefix))
        if after:
            query = query.where(T.c.id < after if newest else T.c.id > after)
        query = query.order_by(T.c.id.desc() if newest else T.c.id).limit(limit)
        async with self.engine.connect() as conn:
            return [TransferRow.from_row(r) for r in await conn.execute(query)]

    async def clock(self) -> datetime:
        """The time leases, backoffs and queue order are reckoned in: PostgreSQL's own clock
        (`now()`), one for every host sharing the catalog, so a host whose clock runs ahead
        cannot take other hosts' live leases for lapsed; SQLite serves one process, whose
        clock it is."""
        if self.dialect != "postgresql":
            return now()
        async with self.engine.connect() as conn:
            at = await conn.scalar(text("SELECT now()"))
        return aware(at) or now()

    async def transition(
        self,
        transfer_id: str,
        target: State,
        *,
        owner: str | None = None,
        retry_in: float | None = None,
        **values: Any,
    ) -> TransferRow:
        """The one way to change a transfer's state; see the module docstring. `retry_in`
        seconds (on the catalog's clock) must pass before a requeued transfer is claimed."""
        allowed = [s.value for s in sources(target)]
        at = await self.clock()
        if retry_in is not None:
            values["not_before"] = at + timedelta(seconds=retry_in)
        stmt = update(T).where(T.c.id == transfer_id, T.c.state.in_(allowed))
        if owner is not None:
            stmt = stmt.where(T.c.lease_owner == owner)
        fields: dict[str, Any] = {"state": target.value, "updated_at": at, **values}
        if target == State.QUEUED:
            fields.update(requeued(at))
        if target in (State.SUCCEEDED, State.FAILED, State.CANCELLED):
            fields.setdefault("finished_at", at)
            fields.setdefault("lease_owner", None)
            fields.setdefault("lease_expires", None)
        try:
            async with self.engine.begin() as conn:
                changed = (await conn.execute(stmt.values(**fields))).rowcount
        finally:
            # Also when nothing changed or the answer was lost (a commit it may not have
            # seen): a claim then reads the queue again rather than trust a "nothing free"
            # this may have ended, for up to `recheck` seconds.
            self._changed()
        current = await self.get(transfer_id)
        if not changed:
            raise Conflict(
                f"transfer {transfer_id} is {current.state}"
                + (f" (held by {current.lease_owner})" if current.lease_owner else "")
                + f"; it cannot become {target.value}"
            )
        return current

    async def requeue_expired(
        self,
        also_owners: Sequence[str] = (),
        on_ended: Callable[[str, str], None] | None = None,
    ) -> int:
        """Put running transfers whose lease lapsed (or whose owner is known dead) back in
        the queue (or cancel them, if that was asked meanwhile); return how many it moved.

        One run `max_attempts` times already fails instead (`RunsExhausted`): a run that
        kills its process (the OOM killer, a crash in a compiled library) or never renews
        its lease would otherwise be run again after every restart, forever, taking every
        other running transfer down with it each time. `on_ended(kind, state)` is called
        for each transfer this ends, `failed` or `cancelled`, so its outcome is counted:
        no worker is left to count it."""
        at = await self.clock()
        lapsed = (
            T.c.state == State.RUNNING.value,
            or_(T.c.lease_expires < at, T.c.lease_owner.in_(list(also_owners))),
        )
        free = {"lease_owner": None, "lease_expires": None, "updated_at": at}
        spent = (
            select(T.c.id, T.c.kind)
            .where(*lapsed, T.c.attempts >= self.max_attempts, ~T.c.cancel_requested)
            .with_for_update(skip_locked=True)
        )
        asked = select(T.c.id, T.c.kind).where(*lapsed, T.c.cancel_requested)
        problem = RunsExhausted(
            f"run {self.max_attempts} times, the last run cut off (the process running it "
            "died or lost its lease); not run again (see the site's log)"
        )
        failed: list[Any] = []
        cancelled: list[Any] = []
        async with self.engine.begin() as conn:
            # Row by row (a handful: the runs of dead workers), each counted only if its
            # own UPDATE changed it: on SQLite, where FOR UPDATE is not, the worker may
            # have ended it between the SELECT and the UPDATE, and then counted it itself.
            for row in (await conn.execute(spent)).all():
                ended = update(T).where(T.c.id == row.id, *lapsed)
                ended = ended.values(
                    state=State.FAILED.value,
                    finished_at=at,
                    error_code=problem.code,
                    error_message=problem.message,
                    error_paths="[]",
                    **free,
                )
                if (await conn.execute(ended)).rowcount:
                    failed.append(row)
            for row in (await conn.execute(asked.with_for_update(skip_locked=True))).all():
                ended = update(T).where(T.c.id == row.id, *lapsed, T.c.cancel_requested)
                ended = ended.values(not_before=at, **free, **requeued(at))
                if (await conn.execute(ended)).rowcount:
                    cancelled.append(row)
            # What lapsed since (or another process holds locked): back in the queue only;
            # one asked to be cancelled is left to the next pass, which counts it.
            again = update(T).where(*lapsed, ~T.c.cancel_requested)
            again = again.values(not_before=at, **free, **requeued(at))
            moved = (await conn.execute(again)).rowcount
        if failed or cancelled or moved:
            self._changed()
        for row in failed:
            log.warning("failed %s %s: %s", row.kind, row.id, problem.message)
        for row in cancelled:
            log.info("cancelled %s %s: its run was cut off", row.kind, row.id)
        if on_ended is not None:
            for row in failed:
                on_ended(row.kind, State.FAILED.value)
            for row in cancelled:
                on_ended(row.kind, State.CANCELLED.value)
        return len(failed) + len(cancelled) + moved

    async def claim(self, owner: str, lease: float) -> TransferRow | None:
        """Take the next runnable transfer for `owner`, with a lease of `lease` seconds.

        The first queued transfer in queue order whose tree is free (`_first_free`). On
        PostgreSQL the pick is locked with SKIP LOCKED (a transfer another process is
        claiming counts as queued ahead), and an advisory lock on the path's first component
        makes the final check and the claim one step across processes (claims under one
        top-level prefix take turns, for the milliseconds a claim lasts); SQLite has one
        writer anyway.

        A claim that found nothing free holds for the claims after it: they answer None at
        once until this process changes the queue so that something may be free
        (`_changed`: a transfer ends, goes back in the queue or is queued on a tree no
        running transfer blocks), a transfer waiting out a retry is due, or `recheck`
        seconds passed (transfers other processes queue or end). Each claim read the whole
        queue: with N stages of one dataset queued behind its running one, each of them
        waking the workers, that was N^2/2 rows read by each worker.
        """
        nothing = self._nothing_free
        if nothing is not None and time.monotonic() < nothing.until:
            return None
        changes = self._changes
        asked = time.monotonic()
        at = await self.clock()
        for _ in range(8):
            scan = _Scan()
            async with self.engine.begin() as conn:
                row = await self._first_free(conn, at, scan)
                if row is None:
                    if not scan.skipped and changes == self._changes:
                        until = asked + self.recheck
                        if scan.next_due is not None:
                            until = min(until, asked + (scan.next_due - at).total_seconds())
                        self._nothing_free = _NothingFree(until, frozenset(scan.busy))
                    return None
                picked, path, rank = row
                if self.dialect == "postgresql":
                    await conn.execute(
                        text("SELECT pg_advisory_xact_lock(:space, hashtext(:p))"),
                        {"space": _LOCK_SPACE, "p": top(path)},
                    )
                stmt = (
                    update(T)
                    .where(
                        T.c.id == picked,
                        T.c.state == State.QUEUED.value,
                        ~running_over(path),
                        ~queued_above(path, rank, picked),
                    )
                    .values(
                        state=State.RUNNING.value,
                        lease_owner=owner,
                        lease_expires=at + timedelta(seconds=lease),
                        attempts=T.c.attempts + 1,
                        started_at=func.coalesce(T.c.started_at, at),
                        updated_at=at,
                    )
                )
                if (await conn.execute(stmt)).rowcount:
                    break
        else:
            return None
        return await self.get(picked)

    async def _first_free(self, conn: AsyncConnection, at: datetime, scan: _Scan) -> Any:
        """`(id, path, rank_time)` of the first queued transfer, in queue order, that may run
        now, or None; what else it met is noted in `scan`.

        One may not run while another transfer runs on its path or a path above or below it
        (nested datasets share a tree: two runs writing one tree at once would fight over
        it), nor while one on its path or a path above it is queued ahead of it (in retry
        backoff too), so a stream of later `/p/a/...` transfers cannot keep a queued `/p`
        waiting forever. Queued descendants need not block: a later ancestor of a waiting
        transfer overlaps whatever blocks that one. A transfer whose cancel is pending
        blocks nothing. The queue is read in pages in queue order and checked here, not in
        one SQL statement: a correlated "nothing queued ahead overlaps" made PostgreSQL,
        before it had statistics on a new table, compare every queued pair (90 ms a claim
        with 1,000 queued).
        """
        busy = running_over(T.c.path).label("busy")
        page = (
            select(T.c.id, T.c.path, T.c.rank_time, T.c.not_before, busy)
            .where(T.c.state == State.QUEUED.value, ~T.c.cancel_requested)
            .order_by(T.c.rank_time, T.c.id)
            .limit(_CLAIM_PAGE)
        )
        ahead: set[str] = set()
        after: tuple[Any, str] | None = None
        while True:
            query = page
            if after is not None:
                rank, last = after
                query = query.where(after_in_queue(rank, last))
            rows = (await conn.execute(query)).all()
            for row in rows:
                due = aware(row.not_before)
                if row.busy:
                    scan.busy.add(row.path)
                elif due is not None and due > at:
                    scan.next_due = due if scan.next_due is None else min(scan.next_due, due)
                elif due is not None and ahead.isdisjoint(lineage(row.path)):
                    if await self._lock(conn, row.id):
                        return row.id, row.path, row.rank_time
                    scan.skipped = True  # another process is claiming it
                ahead.add(row.path)
            if len(rows) < _CLAIM_PAGE:
                return None
            after = (rows[-1].rank_time, rows[-1].id)

    async def _lock(self, conn: AsyncConnection, transfer_id: str) -> bool:
        """Lock a queued transfer's row for this claim (PostgreSQL; SKIP LOCKED: False if
        another process is claiming it). SQLite has one writer: always True."""
        if self.dialect != "postgresql":
            return True
        query = (
            select(T.c.id)
            .where(T.c.id == transfer_id, T.c.state == State.QUEUED.value)
            .with_for_update(skip_locked=True)
        )
        return (await conn.execute(query)).first() is not None

    async def heartbeat(
        self, transfer_id: str, owner: str, lease: float, **progress: Any
    ) -> tuple[bool, bool]:
        """Renew the lease and record progress; return `(still ours, cancel requested)`."""
        at = await self.clock()
        stmt = (
            update(T)
            .where(
                T.c.id == transfer_id, T.c.lease_owner == owner, T.c.state == State.RUNNING.value
            )
            .values(lease_expires=at + timedelta(seconds=lease), updated_at=at, **progress)
        )
        async with self.engine.begin() as conn:
            ours = bool((await conn.execute(stmt)).rowcount)
            flag = (
                await conn.execute(select(T.c.cancel_requested).where(T.c.id == transfer_id))
            ).scalar()
        return ours, bool(flag)

    async def cancel(self, transfer_id: str) -> tuple[TransferRow, bool]:
        """Cancel: a queued transfer at once, a running one at its next heartbeat. Return
        the transfer and whether this call ended it (so its outcome is counted once: no
        worker will count it, and two cancels racing must not both count it).

        One conditional UPDATE decides on the row as it is when written, so a worker that
        claims or requeues the transfer meanwhile cannot make the cancel be lost: a queued
        transfer becomes cancelled, a running one gets `cancel_requested` (which wins over a
        later requeue). Cancelling a cancelled transfer is harmless; a finished one is a
        `Conflict`; an unknown id is `NotFound`."""
        at = await self.clock()
        mine = T.c.id == transfer_id
        queued = update(T).where(mine, T.c.state == State.QUEUED.value)
        queued = queued.values(state=State.CANCELLED.value, finished_at=at, updated_at=at)
        running = update(T).where(mine, T.c.state == State.RUNNING.value)
        running = running.values(cancel_requested=True, updated_at=at)
        # Two guarded UPDATEs, so this call knows whether it ended the transfer (a single
        # UPDATE would need RETURNING, which SQLite has only from 3.35: RHEL 9 ships 3.34).
        # A worker requeueing the transfer between them makes both miss: then again.
        for _ in range(8):
            async with self.engine.begin() as conn:
                ended = bool((await conn.execute(queued)).rowcount)
                flagged = not ended and bool((await conn.execute(running)).rowcount)
            if ended:  # it no longer holds back the transfers queued after it on its tree
                self._changed()
            # Read after the transaction: holding its connection while taking another from
            # the pool deadlocks once every pooled connection is held so.
            row = await self.get(transfer_id)
            if ended or flagged:
                return row, ended
            if row.state == State.CANCELLED:
                return row, False
            if row.state in TERMINAL:
                raise Conflict(
                    f"transfer {transfer_id} already {row.state}; it cannot be cancelled"
                )
        raise CatalogUnavailable(f"transfer {transfer_id} kept changing state; try again")

    async def prune(self, age: timedelta, limit: int = PRUNE_BATCH) -> int:
        """Delete up to `limit` transfers that ended (succeeded, failed or cancelled) more
        than `age` ago on the catalog's clock, oldest first, in one short transaction; return
        how many. The caller repeats it while it returns `limit`.

        Queued and running transfers are never deleted, whatever their times: the state is
        checked, and an ended transfer never changes state again, so no claim, heartbeat or
        cancel can race the delete. No row refers to another by a key; a later stage's
        `satisfied_by` may name a deleted one (its id then answers 404, as an unknown id
        does). On PostgreSQL the rows another daemon is deleting are skipped, not waited for.
        """
        before = await self.clock() - age
        # The states are named as those a transfer may still leave: no index serves a NOT
        # IN, so both engines read the end-time index, in order, and stop after `limit`
        # rows. With `state IN` the ended ones, SQLite (which has no statistics) took the
        # queue index, reading and sorting every ended row for each batch (0.5 s a batch at
        # 500,000); checked again in the DELETE's own WHERE, it did so for the DELETE.
        pick = (
            select(T.c.id)
            .where(T.c.finished_at < before, T.c.state.not_in(_LIVE))
            .order_by(T.c.finished_at)
            .limit(limit)
        )
        if self.dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        stmt = delete(T).where(T.c.id.in_(pick))
        async with self.engine.begin() as conn:
            return (await conn.execute(stmt)).rowcount

    async def depth(self) -> dict[tuple[str, str], int]:
        """Number of queued and running transfers per (state, priority), for metrics. Only
        those: ended transfers accumulate for `[api] history_days` (the outcome counters
        count them), and the queue index finds these two states without reading the rest."""
        query = (
            select(T.c.state, T.c.priority, func.count())
            .where(T.c.state.in_([State.QUEUED.value, State.RUNNING.value]))
            .group_by(T.c.state, T.c.priority)
        )
        async with self.engine.connect() as conn:
            return {(s, p): n for s, p, n in await conn.execute(query)}

    async def stage_queued(self, path: str) -> bool:
        """True when a stage of `path` is queued (one indexed read; `answer_stages` has
        nothing to do otherwise)."""
        query = select(T.c.id).where(
            T.c.path == path, T.c.state == State.QUEUED.value, T.c.kind == "stage"
        )
        async with self.engine.connect() as conn:
            return (await conn.execute(query.limit(1))).first() is not None

    async def answer_stages(
        self,
        done: TransferRow,
        version: str,
        latest: bool,
        result: dict[str, Any],
        pin: Callable[[Sequence[str]], Executable] | None = None,
    ) -> list[TransferRow]:
        """Succeed at once, with `result`, the queued stages of `done.path` that `done` (a
        stage that succeeded, bringing the tree to `version`) has already done, those of
        `done`'s tenant with `satisfied_by` naming it too (another tenant's transfer ids are
        not shown: they answer 404 there, so ids do not leak): plain ones
        (no `delete` or `checksum` option), submitted no later than `done` finished, asking
        for `version`, or for the latest when `latest` says `version` is the latest now
        (`scheduler.satisfied` says why that answers them). Return them (at most `answer_batch`;
        ask again while that many come back).

        Queue order holds: the stages are taken in queue order among the queued transfers
        on `done.path` or a path above it (those a claim would make them wait for), and the
        first that is not such a stage ends the batch, so none is answered ahead of a
        transfer it would have run after (a push, a `--delete` stage). Nothing is answered
        while a transfer runs over the tree. `pin(ids)` is the statement that pins the
        dataset under the pins of those of `ids` that carry one (`Access.pins_for_transfers`),
        run in the same transaction for the stages this answers, and only those (one
        cancelled meanwhile gets no pin), before they are seen to succeed. One transaction; on
        PostgreSQL under the claims' advisory lock of the path, so no claim of the tree
        comes between the check and the update, and without waiting for a row lock (a stage
        a claim has locked is skipped), so it cannot deadlock with one.
        """
        if done.finished_at is None:
            return []
        finished = datetime.fromisoformat(done.finished_at)
        at = await self.clock()
        ahead = (
            select(T)
            .where(
                T.c.state == State.QUEUED.value,
                ~T.c.cancel_requested,
                T.c.path.in_(sorted(lineage(done.path))),
            )
            .order_by(T.c.rank_time, T.c.id)
            .limit(self.answer_batch)
        )
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:space, hashtext(:p))"),
                    {"space": _LOCK_SPACE, "p": top(done.path)},
                )
            if (await conn.execute(select(running_over(done.path)))).scalar():
                return []
            ids: list[str] = []
            ours: set[str] = set()  # of done's tenant
            for r in await conn.execute(ahead):
                options = json.loads(r.options)
                answered = (
                    r.kind == "stage"
                    and r.path == done.path
                    and not options.get("delete")
                    and not options.get("checksum")
                    and (r.version == version or (r.version is None and latest))
                    and r.created_at is not None
                    and aware(r.created_at) <= finished
                )
                if not answered:
                    break
                ids.append(r.id)
                if r.tenant == done.tenant:
                    ours.add(r.id)
            if ids and self.dialect == "postgresql":
                # A claim locks its pick's row, then waits for the advisory lock held here:
                # waiting for that row would be a deadlock. A stage being claimed is left
                # to that claim (`already_staged` answers it).
                locking = (
                    select(T.c.id)
                    .where(T.c.id.in_(ids), T.c.state == State.QUEUED.value)
                    .with_for_update(skip_locked=True)
                )
                free = set((await conn.execute(locking)).scalars())
                ids = [i for i in ids if i in free]
            if not ids:
                return []
            answered = await self._succeed_answered(conn, ids, ours, done.id, result, at)
            if answered and pin is not None:
                await conn.execute(pin([r.id for r in answered]))
        if answered:
            self._changed()
        return answered

    async def _succeed_answered(
        self,
        conn: AsyncConnection,
        ids: list[str],
        ours: set[str],
        done_id: str,
        result: dict[str, Any],
        at: datetime,
    ) -> list[TransferRow]:
        """Succeed those of the queued stages `ids` that are still queued, with `result`
        (and `satisfied_by` naming `done_id` for those in `ours`), finished at `at`; return
        the rows this moved, in id order.

        Only what the guarded UPDATE moved counts: on SQLite the queue was read before the
        write transaction began (pysqlite begins at the first write), so a cancel or another
        worker's claim may have taken a stage since. The first UPDATE takes SQLite's write
        lock (on PostgreSQL the rows are locked already), so what the SELECT after it sees
        stays so until the commit; `finished_at` tells this answer's rows from those another
        worker answering the same path may have succeeded meanwhile."""
        named = {**result, "satisfied_by": done_id}
        for group, values in (([i for i in ids if i in ours], named), (ids, result)):
            if not group:
                continue
            await conn.execute(
                update(T)
                .where(T.c.id.in_(group), T.c.state == State.QUEUED.value)
                .values(
                    state=State.SUCCEEDED.value,
                    attempts=T.c.attempts + 1,
                    started_at=func.coalesce(T.c.started_at, at),
                    finished_at=at,
                    updated_at=at,
                    **succeeded_values(values),
                )
            )
        moved = (
            select(T)
            .where(T.c.id.in_(ids), T.c.state == State.SUCCEEDED.value, T.c.finished_at == at)
            .order_by(T.c.id)
        )
        return [TransferRow.from_row(r) for r in await conn.execute(moved)]
