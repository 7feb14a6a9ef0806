"""Review of the push heal pass: what a no-op push leaves lost, progress across passes, and
the background checks' tasks (bounded, none left running after a failure)."""

from __future__ import annotations

import asyncio
import os

import pytest

from datamover.domain.manifest import ChunkRef
from datamover.errors import StoreUnavailable
from datamover.transfer import reuse
from datamover.transfer.reuse import ReuseCheck

KiB = 1 << 10


class _SlowRepo:
    """`stored` that waits until released; counts the calls under way."""

    def __init__(self, fail: str | None = None) -> None:
        self.running = self.peak = 0
        self.release = asyncio.Event()
        self.fail = fail

    async def stored(self, key: str) -> bool:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if key == self.fail:
                raise StoreUnavailable("HEAD failed")
            await self.release.wait()
            return True
        finally:
            self.running -= 1


def _refs(n: int) -> list[ChunkRef]:
    return [ChunkRef(os.urandom(32), os.urandom(32), 0, 1, 1, 0) for _ in range(n)]


async def _feed(check: ReuseCheck, refs: list[ChunkRef]) -> None:
    """What `_build` does with each reused reference."""
    for ref in refs:
        check.chunks([ref])
        if getattr(check, "full", lambda: False)():
            await check.flush()


async def test_reuse_checks_in_flight_are_bounded() -> None:
    """The walk of a no-op push outruns the HEADs: checks waiting for their turn must not
    pile up, one task per pack of the whole dataset."""
    repo = _SlowRepo()
    check = ReuseCheck(repo)  # type: ignore[arg-type]
    feeding = asyncio.create_task(_feed(check, _refs(40 * reuse._BATCH)))
    await asyncio.sleep(0.2)
    assert repo.running <= 8 * reuse._BATCH  # not 40 batches at once
    repo.release.set()
    await feeding
    assert await check.missing() == (set(), set())
    assert repo.peak <= 8 * reuse._BATCH


async def test_a_failed_reuse_check_leaves_nothing_running() -> None:
    refs = _refs(reuse._BATCH)
    from datamover.chunking.pack import pack_key

    repo = _SlowRepo(fail=pack_key(refs[3].pack))
    check = ReuseCheck(repo)  # type: ignore[arg-type]
    await _feed(check, refs)
    with pytest.raises(StoreUnavailable):
        await check.missing()
    await check.cancel()
    await asyncio.sleep(0)
    assert repo.running == 0  # the other HEADs of the batch were stopped
