"""Small asyncio helpers shared by the store drivers, the repository and the transfers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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
