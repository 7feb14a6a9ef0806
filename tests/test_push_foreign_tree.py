"""Push trusts size and mtime only in a tree this site knows holds the parent version, and
offers the previous version's chunks of every file it reads again to dedup: a tree of
another site's data, or a staged tree read again (`--checksum`, touched files), uploads
only what the store lacks. Each test here once failed on the code before its fix."""

from __future__ import annotations

import asyncio
import os

import pytest

from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite

_T = 1_600_000_000_000_000_000


async def test_a_tree_never_staged_here_is_read_though_sizes_and_mtimes_match(
    make_site: MakeSite,
) -> None:
    # Before: site B's file, of the size and mtime of site A's but other bytes, was taken
    # as unchanged: B's push answered "unchanged" with A's version, B's bytes were never
    # stored, and a third site staged A's bytes for B's.
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "f").write_bytes(b"AAAA")
    os.utime(a.data / "x" / "f", ns=(_T, _T))
    site_a = await a.open()
    try:
        first = await push(site_a, "/proj/x")
    finally:
        await site_a.close()
    b = await make_site("site-b")
    (b.data / "x").mkdir()
    (b.data / "x" / "f").write_bytes(b"BBBB")
    os.utime(b.data / "x" / "f", ns=(_T, _T))
    site_b = await b.open()
    try:
        pushed = await push(site_b, "/proj/x")
        assert not pushed.unchanged and pushed.version != first.version
        assert pushed.files_read == 1 and pushed.parent == first.version
        again = await push(site_b, "/proj/x")  # now this site's record names it: not read
        assert again.unchanged and again.files_read == 0
    finally:
        await site_b.close()
    c = await make_site("site-c")
    site_c = await c.open()
    try:
        await stage(site_c, "/proj/x")
    finally:
        await site_c.close()
    assert (c.data / "x" / "f").read_bytes() == b"BBBB"


async def test_the_same_tree_at_another_site_is_read_once_and_uploads_nothing(
    make_site: MakeSite,
) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b")
    for env in (a, b):
        (env.data / "x").mkdir()
        for i in range(20):
            path = env.data / "x" / f"s{i:02d}"
            path.write_bytes(b"%d" % i * 3000)
            os.utime(path, ns=(_T, _T))
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/x")
        pushed = await push(site_b, "/proj/x")
        assert pushed.unchanged and pushed.version == first.version
        assert pushed.files_read == 20 and pushed.new_chunk_bytes == 0
    finally:
        await site_a.close()
        await site_b.close()


@pytest.mark.usefixtures("stages_end_after_a_tick")
async def test_a_staging_site_reading_its_tree_again_uploads_nothing(
    make_site: MakeSite,
) -> None:
    # Before: the previous version's chunks were offered to dedup only for large files
    # with several chunks, and never under --checksum: at a site that had staged the
    # tree (its chunk index knows only what it pushed), `push --checksum` uploaded every
    # byte again, and touching the files uploaded every small one.
    a = await make_site("site-a")
    root = a.data / "x"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(6 << 20))
    for i in range(50):
        (root / f"s{i:02d}").write_bytes(os.urandom(5000))
    (root / "empty").write_bytes(b"")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/x")
    finally:
        await site_a.close()
    b = await make_site("site-b")
    site_b = await b.open()
    try:
        await stage(site_b, "/proj/x")
        noop = await push(site_b, "/proj/x")
        assert noop.unchanged and noop.files_read == 0 and noop.uploaded_bytes == 0
        checked = await push(site_b, "/proj/x", checksum=True)
        assert checked.unchanged and checked.files_read == 52
        assert checked.new_chunk_bytes == 0 and checked.packs == 0, checked
        for path in (b.data / "x").iterdir():
            os.utime(path)
        touched = await push(site_b, "/proj/x")
        assert not touched.unchanged and touched.files_read == 52
        assert touched.new_chunk_bytes == 0 and touched.packs == 0, touched
    finally:
        await site_b.close()


async def test_files_read_again_keep_the_mtimes_a_coarser_file_system_cut(
    make_site: MakeSite,
) -> None:
    # Before: a file read again (here by --checksum) whose mtime was the parent's cut to
    # whole seconds, as a coarser file system stores it, got the cut mtime: the push
    # published a new version that differed only in mtimes. Files not read kept the
    # parent's already.
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    for i in range(3):
        path = a.data / "x" / f"f{i}"
        path.write_bytes(b"%d" % i * (100 + i))
        os.utime(path, ns=(_T + 123_456_789, _T + 123_456_789))
    site_a = await a.open()
    try:
        first = await push(site_a, "/proj/x")
        for path in (a.data / "x").iterdir():
            os.utime(path, ns=(_T, _T))  # cut to the second
        checked = await push(site_a, "/proj/x", checksum=True)
        assert checked.files_read == 3
        assert checked.unchanged and checked.version == first.version, checked
        (a.data / "x" / "f0").write_bytes(b"other")
        os.utime(a.data / "x" / "f0", ns=(_T, _T))
        changed = await push(site_a, "/proj/x", checksum=True)
        assert not changed.unchanged
    finally:
        await site_a.close()


@pytest.mark.parametrize("first", [True, False], ids=["first-push", "later-push"])
async def test_a_push_cut_between_publishing_and_recording_costs_no_full_read(
    make_site: MakeSite, first: bool
) -> None:
    # Before: the record still named the version before (or nothing), so every later push
    # read the whole tree, though the published version had been read from this very tree
    # (a daemon draining at that moment, a SIGKILL).
    a = await make_site("site-a")
    root = a.data / "x"
    root.mkdir()
    for i in range(30):
        (root / f"f{i:02d}").write_bytes(os.urandom(3000))
    site = await a.open()
    try:
        if not first:
            await push(site, "/proj/x")
            (root / "f00").write_bytes(b"changed")
        real = site.catalog.pushed_replica

        async def cut(*args: object) -> None:
            raise asyncio.CancelledError

        site.catalog.pushed_replica = cut  # type: ignore[method-assign]
        with pytest.raises(asyncio.CancelledError):
            await push(site, "/proj/x")
        site.catalog.pushed_replica = real  # type: ignore[method-assign]
        again = await push(site, "/proj/x")
        # Only f00, changed since the tree's last record (`held_since`), is read again.
        assert again.unchanged and again.files_read == (0 if first else 1), again
    finally:
        await site.close()
