"""A file replaced by other bytes of its size under its old mtime is read by the next push,
and by the next stage before it is kept.

Size and mtime cannot tell such a file from the one the last push read (`cp -p`, `rsync -a`
and archives with fixed times keep a source's mtime); its ctime can: the site records since
when its tree held the version (`replicas.held_since`, set by push and stage), and a push
reads every file changed after that, as restic does by default; a stage reads such a file
before it takes it for the version's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, SiteEnv


def _replace_keeping_mtime(path: Path, data: bytes) -> None:
    """Give `path` other bytes of its size, under its old mtime, as `cp -p` of another file
    of that size and mtime would (a new inode renamed over it)."""
    st = path.stat()
    assert len(data) == st.st_size
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.replace(path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))}


async def _stage_at(env: SiteEnv, dataset: str = "/proj/x") -> dict[str, bytes]:
    site = await env.open()
    try:
        await stage(site, dataset)
    finally:
        await site.close()
    return _files(env.data / dataset.rpartition("/")[2])


async def test_a_file_replaced_under_its_old_mtime_is_read_by_the_next_push(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "x"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(f"first version of file {i}\n".encode())
    site = await a.open()
    try:
        first = await push(site, "/proj/x")
        again = await push(site, "/proj/x")
        assert again.unchanged and again.files_read == 0  # the tree's own files: not read
        _replace_keeping_mtime(root / "f2", b"OTHER VERSION OF FILE 2\n")
        (root / "f3").write_bytes(b"first version of file 3\n")  # same bytes, written again
        os.utime(
            root / "f3", ns=((root / "f3").stat().st_atime_ns, (root / "f0").stat().st_mtime_ns)
        )
        # A push takes its tree as holding what it publishes from a little before its walk
        # (`push._CTIME_SLACK`): files changed just before are read once more by the next.
        time.sleep(0.05)
        second = await push(site, "/proj/x")
        third = await push(site, "/proj/x")
    finally:
        await site.close()
    assert not second.unchanged and second.parent == first.version
    assert second.files_read == 2  # f2 and f3, changed since the last push
    assert third.unchanged and third.files_read == 0
    assert await _stage_at(b) == _files(root)


async def test_a_push_after_a_stage_reads_only_what_changed_since(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "x"
    root.mkdir()
    for i in range(5):
        (root / f"f{i}").write_bytes(f"file {i} as site a wrote it\n".encode())
    site = await a.open()
    try:
        await push(site, "/proj/x")
    finally:
        await site.close()
    staged = await _stage_at(b)
    site = await b.open()
    try:
        untouched = await push(site, "/proj/x")
        assert untouched.unchanged and untouched.files_read == 0  # what the stage wrote
        _replace_keeping_mtime(b.data / "x" / "f1", b"file 1 AS SITE B WROTE IT\n")
        time.sleep(0.05)  # as in the test above
        changed = await push(site, "/proj/x")
        after = await push(site, "/proj/x")
    finally:
        await site.close()
    assert not changed.unchanged and changed.files_read == 1
    assert after.unchanged and after.files_read == 0
    assert await _stage_at(a) == {**staged, "f1": b"file 1 AS SITE B WROTE IT\n"}


async def test_a_stage_reads_a_file_changed_under_its_old_size_and_mtime(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "x"
    root.mkdir()
    for i in range(4):
        (root / f"f{i}").write_bytes(f"file {i} as site a wrote it\n".encode())
    site = await a.open()
    try:
        await push(site, "/proj/x")
    finally:
        await site.close()
    staged = await _stage_at(b)
    edited = b"file 1 AS SITE B WROTE IT\n"
    _replace_keeping_mtime(b.data / "x" / "f1", edited)
    site = await b.open()
    try:
        again = await stage(site, "/proj/x")  # a restage of the version the tree holds
    finally:
        await site.close()
    # The user's file is moved aside, not taken for the version's (nor removed).
    assert again.trashed_count == 1 and again.fetched_files == 1
    assert _files(b.data / "x") == staged
    assert again.trash_dir is not None
    assert _trashed(Path(again.trash_dir), "f1") == [edited]


def _trashed(trash: Path, name: str) -> list[bytes]:
    return [p.read_bytes() for p in trash.rglob(name + "*") if p.is_file()]
