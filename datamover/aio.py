"""Small asyncio helpers shared by the store drivers, the repository and the transfers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


async def gather_or_cancel(checks: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """`asyncio.gather(*checks)`, except that when one fails the others are cancelled and
    awaited before the error is raised, so none is left running (against the store)."""
    tasks = [asyncio.ensure_future(c) for c in checks]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def drain(jobs: Iterable[Coroutine[Any, Any, object]], limit: int) -> None:
    """Await every coroutine of `jobs`, `limit` at a time in `limit` tasks (not one task a
    job, however many there are), each result dropped as soon as it is ready, so at most
    `limit` results are held at once; `jobs` is consumed lazily. The first failure cancels
    the jobs running (the rest are not started) and is raised once they have ended."""
    pending = iter(jobs)

    async def worker() -> None:
        for job in pending:  # shared: each worker takes the next job
            await job

    await gather_or_cancel([worker() for _ in range(max(1, limit))])


@contextlib.asynccontextmanager
async def every(
    seconds: float, call: Callable[[], Awaitable[object]], what: str
) -> AsyncIterator[None]:
    """Await `call()` every `seconds` while the body runs (a claim's touch, so that others
    see its holder alive); one that fails is logged as a warning naming `what`, and the
    next goes on: the body itself reports a catalog that stays down."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await call()
            except Exception as exc:
                log.warning("%s: %s", what, exc)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
