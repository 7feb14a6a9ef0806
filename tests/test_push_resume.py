"""Interrupted pushes and their reruns: the checkpoint a rerun resumes from is one run's,
checked against the store, and held by one process at a time.

A crash is injected where a real one would leave the catalog: right after a batch of
checkpoint rows is committed (the process dies before doing anything else).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from datamover.catalog.models import PushCheckpoint
from datamover.catalog.queries import owner_id
from datamover.errors import Conflict
from datamover.repo.layout import manifest_key
from datamover.site import Site
from datamover.transfer.push import _unfinished, push
from datamover.transfer.readers import NewChunk
from datamover.transfer.scan import Done
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite


class Killed(Exception):
    """Stands for the process dying right after a checkpoint commit."""


def die_after(site: Site, when: Any) -> None:
    """Make the push die once right after committing a batch of rows for which `when(rows)`."""
    original = site.catalog.add_checkpoint_segments

    async def add(dataset: str, rows: Any, owner: str | None = None) -> None:
        await original(dataset, rows, owner)
        if when(rows):
            site.catalog.add_checkpoint_segments = original  # type: ignore[method-assign]
            raise Killed(f"after rows {[seq for seq, _ in rows]}")

    site.catalog.add_checkpoint_segments = add  # type: ignore[method-assign]


async def push_killed(site: Site, when: Any) -> None:
    die_after(site, when)
    with pytest.raises(Killed):
        await push(site, "/proj/x")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))}


async def stage_elsewhere(make_site: MakeSite) -> dict[str, bytes]:
    """Stage the latest `/proj/x` at a fresh site; its files."""
    b = await make_site("site-b")
    site = await b.open()
    try:
        await stage(site, "/proj/x")
    finally:
        await site.close()
    return files(b.data / "x")


async def test_rerun_never_mixes_two_interrupted_runs(make_site: MakeSite) -> None:
    # Run 1 records segments up to f090 and dies. Twenty early files go and f060 changes;
    # run 2, whose cuts now fall elsewhere, dies right after recording f060's segment. Rows
    # beyond it used to stay run 1's, among them a segment with the bounds of f060's new
    # one but its old content, which run 3 then reused and published.
    a = await make_site("site-a", segment_entries=8)
    root = a.data / "x"
    root.mkdir()
    for i in range(100):
        (root / f"f{i:03d}").write_bytes(f"version 1 of file {i}\n".encode())
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f090" for _, r in rows))
        for i in range(20):
            (root / f"f{i:03d}").unlink()
        (root / "f060").write_bytes(b"version 2 of f060, longer than before\n")
        await push_killed(
            site, lambda rows: any(r.first_path <= "f060" <= r.last_path for _, r in rows)
        )
        rows = await site.catalog.checkpoint_segments("/proj/x")
        assert rows and rows[-1].first_path <= "f060" <= rows[-1].last_path  # run 2's only
        await push(site, "/proj/x")
    finally:
        await site.close()
    assert await stage_elsewhere(make_site) == files(root)


async def test_a_rerun_over_another_tree_starts_over(make_site: MakeSite) -> None:
    # A first push dies; the namespace is then mapped to another directory whose files have
    # the same names, sizes and mtimes but other bytes (a copy made with `cp -p`). The rerun
    # used to take the checkpointed files as unchanged and publish the first tree's bytes.
    a = await make_site("site-a", segment_entries=8)
    first, other = a.data / "x", a.data.parent / "other"
    first.mkdir()
    (other / "x").mkdir(parents=True)
    for i in range(100):
        (first / f"f{i:03d}").write_bytes(f"version 1 of file {i}\n".encode())
        copy = other / "x" / f"f{i:03d}"
        copy.write_bytes(f"VERSION 1 OF FILE {i}\n".encode())
        st = (first / f"f{i:03d}").stat()
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f050" for _, r in rows))
        found = await site.catalog.checkpoint("/proj/x")
        assert found is not None and found.root == str(first)
        assert await site.catalog.checkpoint_segments("/proj/x")
    finally:
        await site.close()
    a.config_path.write_text(a.config_path.read_text().replace(str(a.data), str(other)))
    site = await a.open()
    try:
        result = await push(site, "/proj/x")
    finally:
        await site.close()
    assert result.files_read == 100  # nothing taken from the other tree's checkpoint
    assert await stage_elsewhere(make_site) == files(other / "x")


async def test_rerun_checks_the_store_not_only_the_cache(make_site: MakeSite) -> None:
    # The interrupted run's segments sit in the local manifest cache; the bucket lost them
    # and their packs (restored from an older copy). The rerun must upload them again.
    a = await make_site("site-a", segment_entries=8, pack_size=1 << 20)
    root = a.data / "x"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:03d}").write_bytes(f"file {i}\n".encode() * 300)
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f040" for _, r in rows))
        rows = await site.catalog.checkpoint_segments("/proj/x")
        assert len(rows) >= 4
        keys = [manifest_key(r.digest) for r in rows]
        keys += [info.key async for info in site.store.list("packs/")]
        for key in keys:
            await site.store.delete(key)
        result = await push(site, "/proj/x")
        assert result.files_read == 60  # nothing of the lost run was trusted
    finally:
        await site.close()
    assert await stage_elsewhere(make_site) == files(root)


async def test_rerun_takes_a_pack_cut_short_as_lost(make_site: MakeSite) -> None:
    # The bucket holds the interrupted run's packs cut short (a copy interrupted): the
    # rerun must not resume from segments that point into them.
    a = await make_site("site-a", segment_entries=8, pack_size=1 << 20)
    root = a.data / "x"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:03d}").write_bytes(os.urandom(3000))
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f040" for _, r in rows))
        for key in [info.key async for info in site.store.list("packs/")]:
            data = await site.store.get(key)
            await site.store.put(key, data[: len(data) // 2])
        result = await push(site, "/proj/x")
        assert result.files_read == 60  # nothing of the cut run was trusted
    finally:
        await site.close()
    assert await stage_elsewhere(make_site) == files(root)


async def test_a_remote_holder_is_waited_for_until_silent(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(b"data")
    site = await a.open()
    try:
        await site.catalog.start_checkpoint("/proj/x", None, "elsewhere:4242", False)
        with pytest.raises(Conflict, match="elsewhere:4242"):
            await push(site, "/proj/x")  # touched just now: running on another host

        table = PushCheckpoint
        silent = datetime.now(UTC) - timedelta(minutes=16)
        async with site.catalog.engine.begin() as conn:
            await conn.execute(update(table).values(updated_at=silent))
        result = await push(site, "/proj/x")  # silent for longer than _STALE_AFTER
        assert result.files == 1 and result.version
        assert await site.catalog.checkpoint("/proj/x") is None
    finally:
        await site.close()


async def test_two_pushes_cannot_both_claim_one_checkpoint(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    site = await a.open()
    try:
        catalog = site.catalog
        await catalog.start_checkpoint("/proj/x", None, "host:1", False)
        with pytest.raises(Conflict):  # it saw no checkpoint, but one appeared meanwhile
            await catalog.start_checkpoint("/proj/x", None, "host:2", False)
        found = await catalog.checkpoint("/proj/x")
        assert found is not None and found.owner == "host:1"
        await catalog.start_checkpoint("/proj/x", None, owner_id(), False, found)  # takes over
        with pytest.raises(Conflict):  # decided on the same stale row: too late
            await catalog.start_checkpoint("/proj/x", None, "host:3", False, found)
        current = await catalog.checkpoint("/proj/x")
        assert current is not None and current.owner == owner_id()
        await catalog.touch_checkpoint("/proj/x", owner_id())
        touched = await catalog.checkpoint("/proj/x")
        assert touched is not None and touched.touched >= current.touched
    finally:
        await site.close()


def test_assembly_map_keeps_only_the_unfinished_file() -> None:
    def chunk(d: bytes) -> NewChunk:
        return NewChunk(d, 4, 0, b"x")

    def done() -> Done:
        return Done(None, [])  # type: ignore[arg-type]

    refs = {d: object() for d in (b"a", b"b", b"c", b"d")}
    current: dict[bytes, Any] = dict(refs)
    # A batch that ends inside a file keeps that file's chunks only.
    kept = _unfinished([chunk(b"a"), chunk(b"b"), done(), chunk(b"c"), chunk(b"d")], current)
    assert kept == {b"c": refs[b"c"], b"d": refs[b"d"]}
    # A batch wholly inside one file keeps everything (the file goes on).
    assert _unfinished([chunk(b"c"), chunk(b"d")], current) is current
    # A batch that ends with a finished entry keeps nothing.
    assert _unfinished([chunk(b"a"), done()], current) == {}


async def test_a_failed_push_lets_another_process_resume(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A site daemon's push fails midway and the daemon lives on. Its claim on the checkpoint
    # used to stay, so `push --local` of the dataset on this host was refused ("already
    # running") until the daemon pushed it again. The failed push gives the claim up and
    # keeps its segments: another process resumes from them.
    a = await make_site("site-a", segment_entries=8)
    root = a.data / "x"
    root.mkdir()
    for i in range(60):
        (root / f"f{i:03d}").write_bytes(f"file {i}\n".encode() * 50)
    site = await a.open()
    try:
        await push_killed(site, lambda rows: any(r.last_path >= "f040" for _, r in rows))
        left = await site.catalog.checkpoint("/proj/x")
        assert left is not None and left.owner is None
        assert len(await site.catalog.checkpoint_segments("/proj/x")) >= 4

        # Another live process of this host (the test's parent stands for it).
        other = f"{owner_id().rpartition(':')[0]}:{os.getppid()}"
        monkeypatch.setattr("datamover.transfer.push.owner_id", lambda: other)
        result = await push(site, "/proj/x")
        assert result.files == 60 and result.files_read < 30  # resumed, not started over
        assert await site.catalog.checkpoint("/proj/x") is None
    finally:
        await site.close()
    assert await stage_elsewhere(make_site) == files(root)


async def test_a_pack_stored_but_not_indexed_when_killed_is_not_sent_again(
    make_site: MakeSite,
) -> None:
    """Killed between a pack's upload and its indexing (a window of 0.2-0.6 s after each,
    up to `upload_concurrency` packs at once), a push had its rerun send the pack again:
    the rerun asks the store for each pack first, and the same files make the same pack."""
    a = await make_site("site-a", pack_size=1 << 20, upload_concurrency=1)
    root = a.data / "x"
    root.mkdir()
    for i in range(12):
        (root / f"f{i:03d}").write_bytes(os.urandom(300_000))
    site = await a.open()
    stored: list[str] = []
    put = site.store.put
    original = site.catalog.add_pack

    async def recording_put(key: str, data: Any, *args: Any, **kw: Any) -> Any:
        answer = await put(key, data, *args, **kw)
        if key.startswith("packs/"):
            stored.append(key)
        return answer

    async def killed_before_indexing(*args: Any, **kw: Any) -> None:
        raise Killed("after a pack's upload, before its indexing")

    site.store.put = recording_put  # type: ignore[method-assign]
    site.catalog.add_pack = killed_before_indexing  # type: ignore[method-assign]
    try:
        with pytest.raises(Killed):
            await push(site, "/proj/x")
        killed = set(stored)  # its error reaches the push only at its next pack
        assert killed
        killed_size = sum([(await site.store.head(key)).size for key in killed])
        site.catalog.add_pack = original  # type: ignore[method-assign]
        stored.clear()
        result = await push(site, "/proj/x")
    finally:
        await site.close()
    assert not killed & set(stored), (killed, stored)
    assert result.packs == len(stored) + len(killed)  # built by the rerun too, not sent
    # Random bytes: the packs hold the files' bytes; the rest sent is the manifest.
    assert result.uploaded_bytes <= result.bytes - killed_size + (64 << 10), result
    assert await stage_elsewhere(make_site) == files(root)


async def test_a_push_after_an_interrupted_one_asks_about_its_first_packs_only(
    make_site: MakeSite,
) -> None:
    """Only the packs in flight when a push was killed can be stored unindexed, and the run
    taking over builds them first: it HEADs twice `upload_concurrency` packs, not every one
    (a HEAD for each of the tens of thousands of packs of a large resumed push)."""
    import blake3

    from datamover.transfer.packer import Packer

    a = await make_site("site-a")
    site = await a.open()
    asked: list[str] = []
    head = site.store.head

    async def counting_head(key: str, *args: Any, **kw: Any) -> Any:
        asked.append(key)
        return await head(key, *args, **kw)

    site.store.head = counting_head  # type: ignore[method-assign]
    try:
        packer = Packer(site.store, site.catalog, 64 << 10, 1, stored_first=True)
        for _ in range(5):  # each chunk fills a pack of its own
            data = os.urandom(70_000)
            await packer.add([NewChunk(blake3.blake3(data).digest(), len(data), 0, data)])
        await packer.close()
        packs = [info.key async for info in site.store.list("packs/")]
    finally:
        await site.close()
    assert packer.stats.packs == 5 and len(packs) == 5
    assert len(asked) == 2 and all(key in packs for key in asked), asked
