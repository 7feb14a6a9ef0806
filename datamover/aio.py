"""Small asyncio helpers shared by the store drivers, the repository and the transfers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
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
