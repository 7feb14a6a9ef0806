"""Transfer internals: a failed fetch or pack check leaves nothing running against the
store, a push whose parent lost a manifest segment still publishes, and stages waiting for
a dataset's readers do not take the event loop's threads."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from datamover.catalog.models import PushCheckpoint
from datamover.chunking.pack import pack_key
from datamover.errors import Conflict, Corrupt, ObjectNotFound, StoreUnavailable
from datamover.repo.layout import manifest_key
from datamover.site import make_store
from datamover.storage.bandwidth import ThrottledStore
from datamover.storage.memory import MemoryStore
from datamover.storage.retry import RetryingStore, RetryPolicy
from datamover.transfer.fetch import Fetcher, Range
from datamover.transfer.locks import lock_dataset, take_lock
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite
from tests.treegen import snapshot


class _SlowStore(MemoryStore):
    """GETs of `bad` fail at once, others take a while; counts those still running."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad
        self.running = self.finished = 0

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key == self.bad:
            raise ObjectNotFound(key)
        self.running += 1
        try:
            await asyncio.sleep(0.2)
            data = await super().get(key, offset, length)
            self.finished += 1
            return data
        finally:
            self.running -= 1


async def test_a_failed_fetch_cancels_the_other_gets() -> None:
    packs = [bytes([i]) * 32 for i in range(8)]
    store = _SlowStore(pack_key(packs[0]))
    for pack in packs[1:]:
        await store.put(pack_key(pack), bytes(100))
    fetcher = Fetcher(store, concurrency=8)
    with pytest.raises(Corrupt, match="missing from the store"):
        await fetcher.fetch([Range(p, 0, 100) for p in packs])
    # They went on downloading for nothing, holding the fetcher's slots.
    assert store.running == 0 and store.finished == 0


async def test_a_parent_with_a_lost_segment_does_not_block_other_sites(
    make_site: MakeSite,
) -> None:
    # Site B, which never cached the parent's manifest, failed every push of the dataset
    # with "manifest object ... is missing from the store", though it held the whole tree.
    a = await make_site("site-a", segment_entries=8)
    b, c = await make_site("site-b"), await make_site("site-c")
    (a.data / "x").mkdir()
    for i in range(60):
        (a.data / "x" / f"f{i:02d}").write_text(f"file {i}\n")
    shutil.copytree(a.data / "x", b.data / "x")
    site_a, site_b, site_c = await a.open(), await b.open(), await c.open()
    try:
        first = await push(site_a, "/proj/x")
        refs = await site_a.repo.segments(await site_a.repo.read_version("/proj/x", first.version))
        await site_a.store.delete(manifest_key(refs[1].digest))
        (b.data / "x" / "new").write_text("made at site B\n")
        pushed = await push(site_b, "/proj/x")
        assert pushed.parent == first.version and pushed.files == 61
        assert pushed.files_read == 61  # nothing to compare with: every file read again
        await stage(site_c, "/proj/x")
        assert snapshot(c.data / "x") == snapshot(b.data / "x")
    finally:
        for site in (site_a, site_b, site_c):
            await site.close()


async def test_stages_waiting_for_readers_leave_the_loops_threads_free(tmp_path: Path) -> None:
    # Each stage waiting for a push or verify to end held a thread of the loop's default
    # executor (cpu_count() + 4 of them): that many waiting stages stopped every other
    # `to_thread` of the daemon, other datasets' transfers included.
    waiting = (os.cpu_count() or 1) + 6
    readers = [lock_dataset(tmp_path, f"/proj/d{i}", reader="verify") for i in range(waiting)]
    stages = [asyncio.ensure_future(take_lock(tmp_path, f"/proj/d{i}")) for i in range(waiting)]
    try:
        await asyncio.sleep(0.3)
        assert not any(s.done() for s in stages)
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
        other = await asyncio.wait_for(take_lock(tmp_path, "/proj/other"), 5)
        assert other is not None
        os.close(other)
    finally:
        for fd in readers:
            if fd is not None:
                os.close(fd)
    taken = await asyncio.wait_for(asyncio.gather(*stages), 10)  # readers gone: stages go on
    assert all(fd is not None for fd in taken)
    for fd in taken:
        assert fd is not None
        os.close(fd)


class _FailsTwice(MemoryStore):
    """Each put fails twice after its body went out; counts the bytes sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self.tries: dict[str, int] = {}

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        self.tries[key] = self.tries.get(key, 0) + 1
        if self.tries[key] <= 2:
            raise StoreUnavailable("503 after the body was sent")
        await super().put(key, data)


async def test_the_bandwidth_limit_paces_every_attempt(make_site: MakeSite) -> None:
    # The pacer wrapped the retries: a call took one turn however often its bytes went out
    # (5 puts of 1 MB failing twice each moved 15 MB in 4 s under a 1 MB/s limit).
    env = await make_site("site-a", bandwidth_limit=20_000_000)
    built = make_store(env.config)
    assert isinstance(built, RetryingStore) and isinstance(built.inner, ThrottledStore)
    flaky = _FailsTwice()
    store = RetryingStore(
        ThrottledStore(flaky, upload=20_000_000), RetryPolicy(attempts=5, initial=0.001)
    )
    started = time.monotonic()
    for i in range(5):
        await store.put(f"packs/0{i}/x", bytes(1_000_000))
    elapsed = time.monotonic() - started
    assert flaky.sent == 15_000_000
    assert elapsed >= (flaky.sent - 1_000_000) / 20_000_000  # every attempt waited its turn


async def test_a_reused_process_id_does_not_hold_a_push_for_good(make_site: MakeSite) -> None:
    # A push killed (or a host rebooted) left its claim naming `host:pid`; once that id
    # named another live process, every push of the dataset was "already running" forever.
    env = await make_site("site-a")
    (env.data / "x").mkdir()
    (env.data / "x" / "f").write_text("data\n")
    other = subprocess.Popen(["sleep", "60"])
    site = await env.open()
    try:
        owner = f"{socket.gethostname()}:{other.pid}"
        await site.catalog.start_checkpoint("/proj/x", None, owner, False)
        with pytest.raises(Conflict, match="already running"):
            await push(site, "/proj/x")  # touched just now: it may be running
        table = PushCheckpoint
        async with site.catalog.engine.begin() as conn:
            stale = datetime.now(UTC) - timedelta(hours=1)
            await conn.execute(update(table).values(updated_at=stale))
        pushed = await push(site, "/proj/x")  # silent for an hour: taken over
        assert pushed.files == 1 and pushed.version
    finally:
        other.kill()
        other.wait()
        await site.close()


async def test_a_push_waits_for_stages_of_datasets_above_and_below_it(
    make_site: MakeSite,
) -> None:
    # Its lock and record check covered its own dataset only: a push of /proj/ds while a
    # stage of /proj/ds/sub ran published sub/ with files of two versions.
    env = await make_site("site-a")
    (env.data / "ds" / "sub").mkdir(parents=True)
    (env.data / "ds" / "sub" / "f").write_text("data\n")
    site = await env.open()
    try:
        mapped = site.config.namespace.resolve
        for near in ("/proj/ds/sub", "/proj"):
            await site.catalog.begin_replica(near, str(mapped(near)), "v1", None, "host:1")
            with pytest.raises(Conflict, match=f"a stage of '{near}' .* is running or did not"):
                await push(site, "/proj/ds")
            await site.catalog.finish_replica(near, "v1", "ready", 1, 5)
        await site.catalog.begin_replica("/proj/dsx", str(mapped("/proj/dsx")), "v1", None, "h:1")
        assert (await push(site, "/proj/ds")).files == 1  # a sibling shares nothing
        # A record of a tree this site does not map there (a nested prefix mapped
        # elsewhere, a record from before a remap) shares nothing with it either.
        await site.catalog.begin_replica("/proj/ds/sub", "/elsewhere/sub", "v2", "v1", "h:1")
        assert (await push(site, "/proj/ds")).unchanged
        await site.catalog.begin_replica(
            "/proj/ds/sub", str(mapped("/proj/ds/sub")), "v3", "v2", "h:1"
        )
        assert (await push(site, "/proj/ds", force=True)).unchanged  # as it is, on purpose
    finally:
        await site.close()
