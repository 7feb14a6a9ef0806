"""Worker processes for the Python-bound halves of push and stage.

Reading thousands of small files per second (push) and decoding and writing them (stage) cost
tens of microseconds of interpreter time each; threads would serialise on the GIL (measured:
two threads writing 4 KiB files took 75 us per file against 39 us for one), processes do not.
Workers come from a fork server, never by forking this process: it has threads (the event
loop's executors, the catalog driver's) whose locks a plain fork would copy mid-use.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from datamover import gctune
from datamover.errors import TransientError

#: Imported once by the fork server, so a worker starts with them loaded.
PRELOAD = ["datamover.transfer.readers", "datamover.transfer.writers"]


def _ready() -> None:
    """A job that does nothing: submitting one per worker makes the pool start them all."""


def start(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, all of them started (blocks until the fork server runs).

    The executor starts a process only when no idle one is left, so with quick jobs one
    worker would do everything; starting all now is what lets them run side by side.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=gctune.tune)
    for _ in range(workers):
        pool.submit(_ready)
    return pool


def lost(role: str) -> TransientError:
    """The error for a worker process that died under a job (killed, or out of memory): the
    run stops, and running it again carries on from what was done."""
    return TransientError(
        f"a {role} process died (killed, or out of memory?); run the command again"
    )
