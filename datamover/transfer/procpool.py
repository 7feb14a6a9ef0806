"""Worker processes for the Python-bound halves of push and stage.

Reading thousands of small files per second (push) and decoding and writing them (stage) cost
tens of microseconds of interpreter time each; threads would serialise on the GIL (measured:
two threads writing 4 KiB files took 75 us per file against 39 us for one), processes do not.
Workers come from a fork server, never by forking this process: it has threads (the event
loop's executors, the catalog driver's) whose locks a plain fork would copy mid-use.

A worker ends when the process that started the pool ends (`_end_with`). Its job queue does
not tell it: a worker holds both ends of that pipe, so after a SIGKILL of the command (the
OOM killer, `kill -9`) the workers, and the fork server they keep alive, waited for jobs for
ever, holding the command's stdout and stderr open (a script reading them hung).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import select
import signal
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util

from datamover import gctune
from datamover.errors import TransientError

#: Imported once by the fork server, so a worker starts with them loaded. A worker also runs
#: the command's main module again as it starts (multiprocessing's `prepare`; the fork
#: server's own `__main__` preload never takes effect on Python 3.11), and the `datamover`
#: script imports the CLI: preloaded, that is a look-up, not 40-50 ms of each worker's
#: start-up (measured on 2026-12-06).
PRELOAD = [
    "datamover.cli",
    "datamover.transfer.readers",
    "datamover.transfer.segcheck",
    "datamover.transfer.writers",
]


def _ready() -> None:
    """A job that does nothing: submitting one per worker makes the pool start them all."""


#: The longest path a Unix socket takes (`sun_path` less its NUL), and what multiprocessing
#: puts below `$TMPDIR` for the fork server's: `/pymp-` and `/listener-`, 8 characters each.
_SOCKET_PATH_MAX = 107
_SOCKET_BELOW = len("/pymp-") + 8 + len("/listener-") + 8
_SHORT_TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _short_temp_dir() -> None:
    """Have multiprocessing make its temporary directory, where the fork server's socket
    goes, where that socket's path fits: in `$TMPDIR` when it is short enough, else in the
    first writable of `_SHORT_TEMP_DIRS`. A job's `$TMPDIR` deep in a scratch file system
    (over 71 characters) failed every command with workers: "AF_UNIX path too long". Only
    this directory moves; every other temporary file stays in `$TMPDIR`."""
    if mp_process.current_process()._config.get("tempdir") is not None:
        return  # made already (and used: the fork server runs)
    if len(tempfile.gettempdir()) + _SOCKET_BELOW <= _SOCKET_PATH_MAX:
        return
    for short in _SHORT_TEMP_DIRS:
        if os.access(short, os.W_OK | os.X_OK):
            saved, tempfile.tempdir = tempfile.tempdir, short
            try:
                mp_util.get_temp_dir()
            finally:
                tempfile.tempdir = saved
            return


def _context() -> multiprocessing.context.ForkServerContext:
    _short_temp_dir()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


_warm = False  # whether this process started the fork server (`warm`, `start`)


def warm() -> None:
    """Start the fork server now, with `PRELOAD` imported (blocks ~0.2 s; idempotent): a
    long-lived process (the site daemon) calls it at start-up so that its first big push or
    stage does not wait for it. Raises `OSError` where no fork server can run."""
    global _warm
    _context()
    forkserver.ensure_running()
    _warm = True


def is_warm() -> bool:
    """Whether workers start without the fork server's start-up (`warm`): this process
    started it already."""
    return _warm


def _end_with(parent: int) -> None:
    """A worker's initializer: tune the collector, ignore SIGINT, and end the worker (at
    once, even in the middle of a job) when process `parent` has ended.

    Ctrl-C in a terminal signals the whole process group: a worker interrupted while it
    held the result queue's lock left it taken, and the command, shutting its pool down,
    waited for it for ever. The parent decides what an interrupt stops."""
    gctune.tune()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_wait_for_end, args=(parent,), daemon=True).start()


def _wait_for_end(parent: int) -> None:
    try:
        fd = os.pidfd_open(parent)  # readable once the process has ended
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (Linux before 5.3): look every second
        while True:
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except OSError:
                pass
            time.sleep(1)
    select.select([fd], [], [])
    os._exit(1)


def start(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes, all of them started (blocks until the fork server runs).

    The executor starts a process only when no idle one is left, so with quick jobs one
    worker would do everything; starting all now is what lets them run side by side. Each
    worker ends when this process does (`_end_with`).
    """
    warm()
    pool = ProcessPoolExecutor(
        workers, mp_context=_context(), initializer=_end_with, initargs=(os.getpid(),)
    )
    for _ in range(workers):
        pool.submit(_ready)
    return pool


def lost(role: str) -> TransientError:
    """The error for a worker process that died under a job (killed, or out of memory): the
    run stops, and running it again carries on from what was done."""
    return TransientError(
        f"a {role} process died (killed, or out of memory?); run the command again"
    )
