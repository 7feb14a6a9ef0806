"""The transfer worker: claim one transfer, run it under a lease, record how it ended.

While a transfer runs, a heartbeat renews its lease and records progress every
`lease / 3` seconds. If the lease was lost (another worker took over after a stall) the run
is abandoned without touching the transfer; if a cancel was requested, the run is stopped
and the transfer cancelled; if the worker is draining (SIGTERM), the run is stopped and the
transfer goes back to the queue, to resume from its checkpoint elsewhere or after restart.
A run stopped for a cancel or because the catalog did not renew its lease in time keeps its
lease renewed until it is over (its cleanup can take a while), so no second run of it
starts meanwhile, as long as the catalog answers again before the lease lapses.

Transient failures are retried with backoff up to `max_attempts`; anything else fails the
transfer at once with its reason and the files concerned.

Recording how a run ended (succeeded, failed, put back for a retry or by a drain, cancelled)
is tried again while the catalog is unavailable for a moment (a PostgreSQL restart, a
locked SQLite file, no free pooled connection), until one heartbeat interval before the
lease would lapse: lost, a finished run would be taken for one cut off, and on its last
attempt a transfer that succeeded would fail as `runs_exhausted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_before_delay,
    wait_random_exponential,
)

from datamover.catalog.access import Access
from datamover.catalog.engine import catalog_outage, first_line, unreachable
from datamover.catalog.transfer_rows import TransferRow, succeeded_values
from datamover.catalog.transfers import Transfers
from datamover.domain.transfers import Kind, State, retry_delay
from datamover.errors import (
    Busy,
    CatalogUnavailable,
    Conflict,
    DatamoverError,
    InternalError,
    TransientError,
)
from datamover.logs import transfer_context
from datamover.metrics import Metrics
from datamover.scheduler.endings import Endings
from datamover.scheduler.satisfied import already_staged, answer_waiting
from datamover.site import Site

log = logging.getLogger(__name__)

#: Runs a transfer gets that find its dataset held by another process (`Busy`), at least:
#: with the backoff (2 s doubling to 5 minutes) about 23 minutes of waiting, past the 15
#: minutes after which the claim of a holder that died where that cannot be seen (another
#: host, another PID namespace) is taken over.
BUSY_ATTEMPTS = 12


class TransferProgress:
    """A `Progress` that the heartbeat reads: totals, counts done, and a smoothed rate."""

    def __init__(self) -> None:
        self.files_total: int | None = None
        self.bytes_total: int | None = None
        self.files_done = 0
        self.bytes_done = 0
        self._started = time.monotonic()

    def total(self, files: int | None, nbytes: int | None) -> None:
        """Record the totals."""
        self.files_total, self.bytes_total = files, nbytes

    def advance(self, files: int, nbytes: int) -> None:
        """Count work done."""
        self.files_done += files
        self.bytes_done += nbytes

    def fields(self) -> dict[str, Any]:
        """Columns for the heartbeat."""
        elapsed = max(time.monotonic() - self._started, 1e-3)
        return {
            "files_done": self.files_done,
            "bytes_done": self.bytes_done,
            "files_total": self.files_total,
            "bytes_total": self.bytes_total,
            "rate": self.bytes_done / elapsed,
        }


@dataclass
class _Stop:
    reason: str | None = None  # "cancel", "lost", "lapsed", "drain"


class Worker:
    """Runs transfers for one site; `run_once` is one claim-and-run step."""

    def __init__(
        self,
        site: Site,
        transfers: Transfers,
        access: Access,
        owner: str,
        metrics: Metrics,
        lease: float = 30.0,
        endings: Endings | None = None,
    ) -> None:
        self.site = site
        self.transfers = transfers
        self.access = access
        self.owner = owner
        self.metrics = metrics
        self.lease = lease
        self.endings = endings or Endings()
        self._draining = False
        self._current: asyncio.Task[Any] | None = None
        self._stop = _Stop()
        self._lease_until = 0.0  # monotonic: when the lease held now lapses, at the latest

    @property
    def _interval(self) -> float:
        """Seconds between heartbeats, and the margin kept before a lease lapses."""
        return max(min(self.lease / 3, 2.0), 0.2)

    def drain(self) -> None:
        """Stop the running transfer (it goes back to the queue) and claim nothing more; a
        transfer whose claim is under way when this is called goes back unrun."""
        self._draining = True
        if self._current is not None:
            self._stop.reason = "drain"
            self._current.cancel()

    async def run_once(self) -> bool:
        """Claim and run one transfer; False when there was nothing to run (or draining)."""
        if self._draining:
            return False
        asked = time.monotonic()  # the lease runs from the claim's UPDATE, not its answer
        row = await self.transfers.claim(self.owner, self.lease)
        if row is None:
            return False
        self._lease_until = asked + self.lease
        with transfer_context(row.id):
            if self._draining:  # SIGTERM came while claiming: do not start it
                await self._unclaim(row)
                return False
            try:
                await self._execute(row, asked)
            finally:
                self.endings.ended(row.id)  # whatever the outcome: long polls read it again
        return True

    async def _unclaim(self, row: TransferRow) -> None:
        """Put a transfer just claimed back in the queue as it was: no attempt counted."""
        first = {"started_at": None} if row.attempts <= 1 else {}
        moved = await self._requeue(
            row, "was released unrun", attempts=max(row.attempts - 1, 0), **first
        )
        if moved is not None:
            log.info("released %s %s unrun (draining)", row.kind, row.path)

    async def _requeue(self, row: TransferRow, what: str, **fields: Any) -> TransferRow | None:
        """Give up this worker's claim: the transfer goes back in the queue with `fields`
        (a cancel asked meanwhile wins, see `Transfers.transition`). Return it as it is
        now; None if the catalog stayed unavailable (`_record`, which logs that this run
        `what`); `Conflict` if this worker no longer holds it."""
        moved = await self._record(
            row,
            what,
            lambda: self.transfers.transition(
                row.id,
                State.QUEUED,
                owner=self.owner,
                lease_owner=None,
                lease_expires=None,
                **fields,
            ),
            lambda now: now.state in (State.QUEUED, State.CANCELLED) and now.lease_owner is None,
        )
        if moved is not None and moved.state == State.CANCELLED and moved.cancel_requested:
            # A cancel asked while it ran won over the requeue: no one else counts it. One
            # the API made of the queued transfer (after a write of ours whose answer was
            # lost, `_record`) was counted there, and carries no `cancel_requested`.
            self.metrics.finished(row.kind, "cancelled", 0, {})
        return moved

    async def _record(
        self,
        row: TransferRow,
        what: str,
        call: Callable[[], Awaitable[TransferRow]],
        done: Callable[[TransferRow], bool],
    ) -> TransferRow | None:
        """`call()`, which records how this run of `row` ended, tried again while the
        catalog is unavailable (a transient outage, `catalog_outage`) until one heartbeat
        interval before this worker's lease lapses: then another worker may take the
        transfer, and the guarded update would refuse this one anyway. Return what `call`
        returned; None when the outage outlasted that (or the catalog cannot be used at
        all), after one error line saying the run `what` and was not recorded: the
        transfer goes back in the queue when its lease lapses, as a run cut off.

        A try whose write was committed but whose answer was lost (the connection dropped
        as it came) makes the next one a `Conflict`: if the transfer is then as this run
        left it (`done`), that is the record. Any other `Conflict` is raised."""
        tries = 0

        async def once() -> TransferRow:
            nonlocal tries
            tries += 1
            try:
                return await call()
            except Conflict:
                if tries > 1:
                    current = await self.transfers.get(row.id)
                    if done(current):
                        return current
                raise

        def retried(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            outage = catalog_outage(exc, catalog_only=True) if exc else None
            log.warning(
                "%s %s %s, but recording it failed (%s); trying again",
                row.kind,
                row.path,
                what,
                outage.message if outage else exc,
            )

        budget = self._lease_until - self._interval - time.monotonic()
        retrying = AsyncRetrying(
            stop=stop_before_delay(max(budget, 0.0)),
            wait=wait_random_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception(_transient),
            reraise=True,
            before_sleep=retried,
        )
        try:
            return await retrying(once)
        except Conflict:
            raise
        except Exception as exc:
            outage = catalog_outage(exc, catalog_only=True)
            if outage is None:
                raise
            log.error(
                "%s %s %s, but that could not be recorded (%s); it goes back in the queue "
                "when its lease lapses, as a run cut off",
                row.kind,
                row.path,
                what,
                outage.message,
            )
            return None

    async def _execute(self, row: TransferRow, claimed: float) -> None:
        log.info("running %s %s (attempt %d)", row.kind, row.path, row.attempts)
        progress = TransferProgress()
        self._stop = _Stop()
        started = time.monotonic()
        runner = asyncio.create_task(self._run(row, progress))
        self._current = runner
        beat = asyncio.create_task(self._heartbeat(row, progress, runner, claimed))
        try:
            result = await runner
        except asyncio.CancelledError as exc:
            this = asyncio.current_task()
            if self._stop.reason is None and not (this and this.cancelling()):
                # Not stopped by this worker nor by cancelling it: the run awaited something
                # other code cancelled (a future, a concurrent.futures one of an executor shut
                # down). A bug of the run, which ends it; the worker goes on.
                log.error(
                    "transfer %s failed unexpectedly (cancelled inside)", row.id, exc_info=exc
                )
                problem = "internal error: an operation it awaited was cancelled"
                await self._failed(row, progress, InternalError(problem))
                return
            await self._stopped(row, progress)
            if self._stop.reason is None:
                raise  # cancelled from outside (daemon shutting down hard)
            return
        except DatamoverError as exc:
            await self._failed(row, progress, exc)
            return
        except Exception as exc:
            outage = catalog_outage(exc)
            if outage is None and unreachable(exc):
                # A connection refused, reset or timed out, unwrapped: asyncpg's while
                # PostgreSQL restarts (the store's errors come wrapped). Worth another try
                # whoever's it was, not an internal error that ends the transfer.
                outage = TransientError(f"connection lost while it ran: {first_line(exc)}")
            if outage is not None:  # the catalog restarted: retried like a store outage
                await self._failed(row, progress, outage)
                return
            log.exception("transfer %s failed unexpectedly", row.id)
            await self._failed(row, progress, InternalError(f"internal error: {exc}"))
            return
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            self._current = None
        fields = progress.fields()
        fields.update(succeeded_values(result, fields["files_done"], fields["bytes_done"]))

        async def succeed() -> TransferRow:
            if row.kind == Kind.STAGE and row.pin:  # an upsert: the same when tried again
                await self.access.pin_for_transfer(row.id, row.path, result.get("version"))
            return await self.transfers.transition(
                row.id, State.SUCCEEDED, owner=self.owner, **fields
            )

        try:
            ended = await self._record(
                row, "succeeded", succeed, lambda now: now.state == State.SUCCEEDED
            )
        except Conflict:
            # The lease lapsed as the run ended and the transfer went back in the queue (or
            # to another worker): its next run finds the work done. Not an error of ours.
            log.warning(
                "%s %s finished after its lease lapsed; it is queued again, and its next run "
                "finds the work done",
                row.kind,
                row.path,
            )
            return
        if ended is None:
            return
        self.metrics.finished(row.kind, "succeeded", time.monotonic() - started, result)
        log.info("succeeded %s %s: %s", row.kind, row.path, result.get("version"))
        if row.kind == Kind.STAGE:
            await self._answer_waiting(ended)

    async def _answer_waiting(self, done: TransferRow) -> None:
        """Answer the queued stages `done` has already done (`satisfied.answer_waiting`).
        A failure here is only logged: `done` succeeded, and each of them is still checked
        on its own when it is claimed (`already_staged`)."""
        try:
            answered = await answer_waiting(self.site, self.transfers, self.access, done)
        except Exception as exc:
            log.warning("could not answer the stages waiting for %s: %s", done.path, exc)
            return
        for t in answered:
            self.metrics.finished(t.kind, "succeeded", 0.0, t.result or {})
            self.endings.ended(t.id)
        if answered:
            log.info(
                "answered %d stage(s) of %s asked for while %s ran",
                len(answered),
                done.path,
                done.id,
            )

    async def _run(self, row: TransferRow, progress: TransferProgress) -> dict[str, Any]:
        from datamover.transfer.push import push
        from datamover.transfer.stage import stage

        options = row.options
        if row.kind == Kind.PUSH:
            pushed = await push(
                self.site,
                row.path,
                checksum=bool(options.get("checksum")),
                force=bool(options.get("force")),
                progress=progress,
            )
            return pushed.to_json()
        done = await already_staged(self.site, self.transfers, row)
        if done is not None:
            return done
        staged = await stage(
            self.site,
            row.path,
            version=row.version,
            delete=bool(options.get("delete")),
            checksum=bool(options.get("checksum")),
            progress=progress,
            pin=(row.pin or "", row.tenant),
            force="tenant" if options.get("force") == "tenant" else bool(options.get("force")),
        )
        return staged.to_json()

    async def _heartbeat(
        self,
        row: TransferRow,
        progress: TransferProgress,
        runner: asyncio.Task[Any],
        claimed: float | None = None,
    ) -> None:
        """Renew the lease every `interval` s; stop the run when the lease is lost, when a
        cancel is requested, or when the catalog has not renewed it (failing or hanging) by
        one interval before it lapses: another worker could then take the transfer, and two
        runs on one tree must not happen. `claimed` is when the claim was asked for (its
        lease counts from then, however late the answer came); default now.

        A run stopped for a cancel or a lapsing lease does not end at once (a stage waits
        for its writer processes' current batches and puts directory modes back): the lease
        is renewed until it has (`_renew_until_over`), so that no other run of the transfer
        can start on the same tree meanwhile while the catalog answers."""
        interval = self._interval
        deadline = (time.monotonic() if claimed is None else claimed) + self.lease - interval
        while not runner.done():
            await asyncio.sleep(max(min(interval, deadline - time.monotonic()), 0.0))
            sent = time.monotonic()
            call = asyncio.ensure_future(
                self.transfers.heartbeat(row.id, self.owner, self.lease, **progress.fields())
            )
            call.add_done_callback(_consume)  # it may outlive this loop (a hanging catalog)
            await asyncio.wait({call}, timeout=max(deadline - sent, 0.0))
            try:
                if not call.done():
                    raise TimeoutError("no answer from the catalog")
                ours, cancel = call.result()
            except Exception as exc:  # failed, or still waiting on a locked catalog
                log.warning("heartbeat failed: %s", exc)
                if time.monotonic() >= deadline:
                    self._stop.reason = self._stop.reason or "lapsed"
                    runner.cancel()
                    await self._renew_until_over(row, progress, runner, (call, sent))
                    return
                continue
            deadline = sent + self.lease - interval
            self._lease_until = sent + self.lease
            if not ours:
                self._stop.reason = "lost"
                runner.cancel()
                return
            if cancel:
                self._stop.reason = "cancel"
                runner.cancel()
                await self._renew_until_over(row, progress, runner)
                return

    async def _renew_until_over(
        self,
        row: TransferRow,
        progress: TransferProgress,
        runner: asyncio.Task[Any],
        pending: tuple[asyncio.Future[Any], float] | None = None,
    ) -> None:
        """Renew the lease of a run just stopped (`runner` cancelled) until that run is over:
        every `interval` s, one call at a time (`pending`, a call still under way and when
        it was sent, is waited for first: a hanging catalog does not pile them up). Each
        renewal moves `_lease_until` (counted from when its call was sent), which tells
        `_stopped` whether the lease is held again. Stops at the first answer saying the
        transfer is no longer this worker's."""
        while not runner.done():
            if pending is None:
                call = asyncio.ensure_future(
                    self.transfers.heartbeat(row.id, self.owner, self.lease, **progress.fields())
                )
                call.add_done_callback(_consume)
                pending = (call, time.monotonic())
            call, sent = pending
            await asyncio.wait({call, runner}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                return  # the run is over; the call finishes on its own (`_consume`)
            try:
                ours, _ = call.result()
            except Exception as exc:
                log.warning("heartbeat failed while the stopped run ends: %s", exc)
            else:
                if not ours:
                    return
                self._lease_until = sent + self.lease
            pending = None
            await asyncio.wait({runner}, timeout=self._interval)

    async def _stopped(self, row: TransferRow, progress: TransferProgress) -> None:
        reason = self._stop.reason or "drain"
        if reason == "lost":
            log.warning("lease on %s was lost; another worker has it", row.id)
            return
        if reason == "lapsed" and self._lease_until - self._interval > time.monotonic():
            # Renewed while the run ended (`_renew_until_over`): the catalog is back and the
            # transfer still this worker's. Retried like a run the catalog's outage failed.
            await self._failed(
                row,
                progress,
                TransientError("stopped: its lease could not be renewed (catalog unavailable)"),
            )
            return
        if reason == "lapsed":
            log.error(
                "stopped %s: its lease could not be renewed (catalog unavailable); it goes "
                "back in the queue when the lease lapses",
                row.id,
            )
            return
        with contextlib.suppress(DatamoverError):
            if reason == "cancel":
                cancelled = await self._record(
                    row,
                    "was cancelled",
                    lambda: self.transfers.transition(
                        row.id, State.CANCELLED, owner=self.owner, **progress.fields()
                    ),
                    lambda now: now.state == State.CANCELLED,
                )
                if cancelled is not None:
                    self.metrics.finished(row.kind, "cancelled", 0, {})
                    log.info("cancelled %s %s", row.kind, row.path)
            else:  # stopped, not failed: the run does not count among its attempts
                fields = progress.fields()
                what = "was stopped by the drain"
                if await self._requeue(row, what, attempts=row.attempts - 1, **fields):
                    log.info("released %s %s for a later run (draining)", row.kind, row.path)

    async def _failed(
        self, row: TransferRow, progress: TransferProgress, exc: DatamoverError
    ) -> None:
        """Record that this run failed with `exc`: back in the queue after a backoff if it
        is worth another try, else failed. The failure is logged and counted only once that
        is recorded: if the lease lapsed meanwhile and the transfer is no longer this
        worker's (queued again, another worker's, or ended by a cancel or by running out of
        runs), the catalog refuses it (`Conflict`) and one warning says so instead."""
        fields = progress.fields()
        error = {
            "error_code": exc.code,
            "error_message": exc.message,
            "error_paths": json.dumps(exc.paths[:100]),
        }
        tries = self.transfers.max_attempts
        if isinstance(exc, Busy):
            tries = max(tries, BUSY_ATTEMPTS)
        retry = exc.retryable and row.attempts < tries
        delay = retry_delay(row.attempts)
        what = f"failed ({exc.message})"
        try:
            if retry:
                moved = await self._requeue(row, what, retry_in=delay, **error, **fields)
            else:
                moved = await self._record(
                    row,
                    what,
                    lambda: self.transfers.transition(
                        row.id, State.FAILED, owner=self.owner, **error, **fields
                    ),
                    lambda now: now.state == State.FAILED and now.lease_owner is None,
                )
        except Conflict as lost:
            # As for a run that succeeds too late: whoever holds the transfer now decides
            # how it ends, and this run's failure is not the transfer's.
            log.warning(
                "%s %s failed after its lease lapsed (%s); not recorded: %s",
                row.kind,
                row.path,
                exc.message,
                lost.message,
            )
            return
        if moved is None:
            return
        self.metrics.error(row.kind, exc.code)
        if moved.state == State.FAILED:
            self.metrics.finished(row.kind, "failed", 0, {})
            log.error("failed %s %s: %s", row.kind, row.path, exc.message)
        elif moved.state == State.QUEUED:
            self.metrics.retry(row.kind)
            log.warning(
                "attempt %d of %s failed (%s); retrying in %.0f s",
                row.attempts,
                row.id,
                exc.message,
                delay,
            )
        else:  # a cancel asked during the run won over the retry (`_requeue` counted it)
            log.info("cancelled %s %s (its attempt failed: %s)", row.kind, row.path, exc.message)


def _consume(call: asyncio.Future[Any]) -> None:
    """Retrieve a finished heartbeat's exception, so none is reported as never retrieved."""
    if not call.cancelled():
        call.exception()


def _transient(exc: BaseException) -> bool:
    """Whether recording a run's end that raised `exc` is worth another try: the catalog
    is unavailable for now (not a catalog that cannot be used, not a bug)."""
    return isinstance(catalog_outage(exc, catalog_only=True), CatalogUnavailable)
