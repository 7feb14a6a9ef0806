"""`datamover serve`: the site daemon. Composition root of API, workers and metrics.

Start-up puts back in the queue the transfers that a dead process on this host still held
(their checkpoints let them resume), then serves the API and runs `[api] workers` transfer
workers; transfers that ended more than `[api] history_days` ago are deleted as it runs
(`scheduler.history`), and with `[api] reindex_minutes` the chunks of packs other sites
stored are indexed that often (`scheduler.reindexing`), and with `[api] trash_days` the
trash runs older than that are removed hourly (`scheduler.trash_retention`). SIGTERM or
SIGINT drains: the API stops, running transfers are stopped and returned to the queue (push
and stage are resumable), and the process exits. A loop of the daemon (a worker, the
metrics) that ends while it runs is one error line, and starts again (`runner.Loops`).
Several processes may share a PostgreSQL catalog; on SQLite lock files, one in the state
directory and one beside the database, keep it to one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path

from aiohttp import web

from datamover.api.app import Context, make_app
from datamover.catalog.access import Access
from datamover.catalog.queries import owner_alive, owner_id
from datamover.catalog.transfers import Transfers
from datamover.config import Config, listen_address
from datamover.errors import CatalogError, Conflict, DatamoverError, InvalidInput
from datamover.metrics import Metrics
from datamover.scheduler.endings import Endings
from datamover.scheduler.history import History
from datamover.scheduler.reindexing import Reindexer
from datamover.scheduler.runner import Doorbell, Loops, run_loop
from datamover.scheduler.trash_retention import TrashRetention
from datamover.scheduler.worker import Worker
from datamover.site import Site, make_state_dir
from datamover.transfer import procpool

log = logging.getLogger(__name__)

#: Seconds after which a daemon loop that ended while the daemon runs is started again.
LOOP_RESTART_SECONDS = 5.0


def _single_process_lock(config: Config) -> list[int]:
    """On a SQLite catalog, the descriptors holding this process's exclusive locks: one on
    `serve.lock` in the state directory, and one on `<database>.serve.lock` beside the
    database file, so that a second `serve` with another state directory (another account's
    default, `DATAMOVER_SITE_STATE_DIR`) is refused too. `Conflict` when another process
    holds either; `CatalogError` when the one beside the database cannot be opened (a
    symbolic link there is refused). None taken on PostgreSQL, which several share."""
    if not config.catalog_url.startswith("sqlite"):
        return []
    held: list[int] = []
    try:
        held.append(_flock(Path(config.state_dir) / "serve.lock", config))
        database = config.sqlite_file
        if database is not None:
            # Beside the file itself: two spellings of its path (a symlinked directory) meet.
            real = Path(os.path.realpath(database))
            try:
                real.parent.mkdir(parents=True, exist_ok=True)  # as the catalog's engine does
            except OSError as exc:
                raise CatalogError(
                    f"the SQLite catalog's directory {str(real.parent)!r} cannot be created: "
                    f"{exc.strerror or exc}"
                ) from None
            held.append(_flock(real.with_name(real.name + ".serve.lock"), config))
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return held


def _flock(path: Path, config: Config) -> int:
    """A descriptor of `path` (created if missing, never through a symbolic link) holding an
    exclusive lock; `Conflict` when another process holds it."""
    flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, os.O_RDWR | flags, 0o644)
        except PermissionError:  # another account's lock file: reading it is enough to lock
            fd = os.open(path, os.O_RDONLY | flags)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
        raise CatalogError(f"cannot open the lock file {str(path)!r}: {why}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Conflict(
            f"another datamover serve already uses the SQLite catalog of {config.site.name!r} "
            f"(it holds {str(path)!r}); use PostgreSQL for several processes"
        ) from None
    return fd


def _listen_error(listen: str, exc: OSError) -> DatamoverError:
    """The one-line error for a listen address the daemon cannot bind."""
    message = f"cannot listen on {listen}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return Conflict(message + " (is another process using it?)")
    return InvalidInput(message + " (check [api] listen)")


def _dead_owner(owner: str | None) -> bool:
    """At start-up: `owner` is a process on this host that is gone. One naming this very
    process is its predecessor's (a container's daemon is PID 1 again after a restart, on
    the same host name): no worker of this process has claimed anything yet."""
    if not owner:
        return False
    return owner.partition("/")[0] == owner_id() or not owner_alive(owner)


async def _reclaim_dead(transfers: Transfers, metrics: Metrics) -> None:
    running = await transfers.list(state="running", limit=10_000)
    dead = sorted({r.lease_owner for r in running if _dead_owner(r.lease_owner)})
    if dead:
        n = await transfers.requeue_expired(dead, _count_ended(metrics))
        log.info("took back %d transfers of dead workers", n)


def _count_ended(metrics: Metrics) -> Callable[[str, str], None]:
    """What `Transfers.requeue_expired` calls for a transfer it ends (fails or cancels):
    count the outcome."""
    return lambda kind, state: metrics.finished(kind, state, 0, {})


async def _warm(site: Site) -> None:
    """Pay the first transfer's start-up costs now, in the background: the store's client
    (one HeadBucket, which also tells the operator at once if the store does not answer) and
    the fork server of the reader and writer processes (`procpool.warm`)."""
    try:
        await site.store.check()
    except DatamoverError as exc:
        log.warning("the store does not answer yet: %s", exc)
    try:
        await asyncio.to_thread(procpool.warm)
    except OSError as exc:  # a locked-down container: transfers fall back to threads
        log.warning("cannot start the fork server of reader and writer processes: %s", exc)


async def serve(config: Config, ready: asyncio.Event | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    if not config.api.listen:
        raise InvalidInput(f"{config.source}: [api] listen is not set; nothing to serve on")
    make_state_dir(config)
    locks = _single_process_lock(config)
    metrics = Metrics(config.site.name)
    site = await Site.open(config, on_retry=metrics.store_retry)
    engine = site.catalog.engine
    transfers = Transfers(engine, config.api.max_attempts)
    access = Access(engine)
    open_paths = {"/healthz", "/readyz", "/v1/openapi.json"}
    if config.api.open_metrics:
        open_paths.add("/metrics")
    wake = Doorbell()  # each submission wakes one idle worker
    endings = Endings()
    app = make_app(Context(site, transfers, access, metrics, frozenset(open_paths), wake, endings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP too: a daemon started from a terminal that closes drains like any other stop.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)

    base = owner_id()
    workers = [
        Worker(site, transfers, access, f"{base}/w{i}", metrics, config.api.lease_seconds, endings)
        for i in range(config.api.workers)
    ]
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    host, port = listen_address(config.api.listen)  # checked by `load_config`
    try:
        await _reclaim_dead(transfers, metrics)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:  # port taken, host unknown (gaierror), address not ours
            raise _listen_error(config.api.listen, exc) from None
        log.info(
            "serving %s on %s with %d workers", config.site.name, config.api.listen, len(workers)
        )

        async def refresh() -> bool:
            metrics.set_queue(await transfers.depth())
            metrics.cache.labels(config.site.name).set(await site.catalog.replica_bytes())
            return False

        async def requeue() -> bool:  # a loop of its own: no failure of the metrics stops it
            await transfers.requeue_expired(on_ended=_count_ended(metrics))
            return False

        loops = Loops(stop, LOOP_RESTART_SECONDS)
        for i, w in enumerate(workers):
            loops.start(
                f"worker {i}", partial(run_loop, f"worker {i}", w.run_once, stop, wake=wake)
            )
        loops.start("requeue", partial(run_loop, "requeue", requeue, stop, idle=5.0))
        loops.start("metrics", partial(run_loop, "metrics", refresh, stop, idle=5.0))
        if config.api.history_days > 0:  # 0: ended transfers are kept for ever
            history = History(transfers, config.api.history_days, metrics)
            loops.start(
                "history", partial(run_loop, "history", history.run_once, stop, idle=history.every)
            )
        if config.api.reindex_minutes > 0:  # 0: only `datamover db rebuild` indexes packs
            reindexer = Reindexer(site, config.api.reindex_minutes, metrics)
            runs = partial(  # it reads the store too: a bare connection error is no outage
                run_loop,
                "reindex",
                reindexer.run_once,
                stop,
                idle=reindexer.every,
                catalog_only=False,
            )
            loops.start("reindex", runs)
        retention = TrashRetention(Path(config.state_dir), config.api.trash_days, metrics)
        if config.api.trash_days > 0:  # 0: only `datamover trash --empty` empties it
            emptying = partial(run_loop, "trash", retention.run_once, stop, idle=retention.every)
            loops.start("trash", partial(emptying, catalog_only=False))
        warming = asyncio.create_task(_warm(site))
        if ready is not None:
            ready.set()
        await loops.supervise()  # until stopped; a loop that ends meanwhile starts again
        log.info("draining: stopping running transfers so they resume later")
        endings.close()  # held long polls answer now
        warming.cancel()  # a store that never answered: its retries end here
        loops.cancel("reindex")  # a first run over a big bucket takes long; the next resumes
        retention.stop()  # so is a first emptying of a big trash; the next one finishes it
        loops.cancel("trash")
        for w in workers:
            w.drain()
        await asyncio.gather(loops.wait(), warming, return_exceptions=True)
    finally:
        await runner.cleanup()
        await site.close()
        for fd in locks:
            with contextlib.suppress(OSError):
                os.close(fd)
    log.info("stopped")
