"""Test helpers for the per-dataset lock (`transfer/locks.py`): its file, a lock held as
another process would hold it, and a gate that pauses a push's or verify's walk while the
lock is held, to see what a stage does meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from datamover.transfer.locks import lock_path
from tests.fixtures_sites import SiteEnv

T = TypeVar("T")

STAGE_WAITS = "a push or verify of '/proj/ds' is running; the stage waits for it to end"


def dataset_lock(env: SiteEnv, dataset: str) -> Path:
    """The lock file of `dataset` at site `env` (`locks.lock_path`)."""
    return lock_path(env.state, dataset)


@contextlib.contextmanager
def held_lock(path: Path, op: int, holder: bytes = b"") -> Iterator[None]:
    """Hold `path` locked with `op` through a descriptor of its own (another process's, as
    far as `flock` can tell); `holder` written into it first, as a stage does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
        if holder:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        yield
    finally:
        os.close(fd)


class Gate:
    """Pauses the thread that calls `hold` (a walk, patched to call it) until `release`."""

    def __init__(self) -> None:
        self._reached, self._go = threading.Event(), threading.Event()

    def hold(self) -> None:
        self._reached.set()
        self._go.wait(20)

    def release(self) -> None:
        self._go.set()

    async def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` until it is held at the gate; its task."""
        self._reached.clear()
        self._go.clear()
        task = asyncio.create_task(work)
        assert await asyncio.to_thread(self._reached.wait, 10), "the work never reached the gate"
        return task


def _has_open(pid: int, path: str) -> bool:
    """Whether process `pid` has a descriptor open on `path`."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if str(fd.readlink()) == path:
                return True
        except OSError:
            continue
    return False


async def waits_at(proc: subprocess.Popen[str], lock: Path, ran: str) -> None:
    """Until `proc` holds `lock` open, waiting (however long its start-up takes on a
    loaded machine), then a while longer: it must still be running (`ran` if not)."""
    path = await asyncio.to_thread(os.path.realpath, lock)
    deadline = time.monotonic() + 60
    while not _has_open(proc.pid, path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "it never reached the lock"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert proc.poll() is None, ran


async def a_cli_stage_waits(env: SiteEnv, gate: Gate, held: asyncio.Task[Any]) -> Any:
    """While `held` (a push or verify of `/proj/ds`) is held at `gate`, a `--local` CLI stage
    waits, saying so, and completes once it is released; the lock is free afterwards.
    Returns `held`'s result."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    argv = [sys.executable, "-m", "datamover", "stage", "/proj/ds", "--local"]
    proc = subprocess.Popen(
        [*argv, "--config", str(env.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
    )
    try:
        await waits_at(proc, dataset_lock(env, "/proj/ds"), "the stage ran while the lock was held")
        gate.release()
        result = await held
        _, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert STAGE_WAITS in err, err
    with held_lock(dataset_lock(env, "/proj/ds"), fcntl.LOCK_EX):
        pass  # nothing was left holding it
    return result
