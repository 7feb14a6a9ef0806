"""`stage --checksum`: a file is judged by its bytes, also when deciding whose it is.

Without `--checksum` a local file with the size and mtime datamover gave it is datamover's,
unless its ctime says it changed since the site's record of the tree (`held_since`); where
the record has no time (one from before migration 0007), size and mtime decide alone. With
`--checksum`, a user's edit that kept both (an editor restoring the mtime, `cp -p`,
`rsync -t`) is found by its content; it must then go to the trash like any local change,
never be replaced or removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from datamover.catalog.models import Replica
from datamover.site import Site
from datamover.transfer.push import push
from datamover.transfer.stage import _Stager, stage
from tests.fixtures_sites import MakeSite, SiteEnv


def _edit_keeping_stat(path: Path, text: str) -> None:
    """Write `text` (as long as what is there) into `path` and give it its mtime back."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def _staged(make_site: MakeSite, files: dict[str, str]) -> tuple[SiteEnv, SiteEnv]:
    """Sites A and B, with `files` pushed at A as `/proj/ck` and staged at B."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ck").mkdir()
    for name, text in files.items():
        (a.data / "ck" / name).write_text(text)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ck")
        await stage(site_b, "/proj/ck")
    finally:
        await site_a.close()
        await site_b.close()
    return a, b


async def _forget_when(site: Site, dataset: str) -> None:
    """Make `dataset`'s replica record one without `held_since`, as from before 0007."""
    async with site.catalog.engine.begin() as conn:
        await conn.execute(
            update(Replica).where(Replica.c.dataset == dataset).values(held_since=None)
        )


def _trashed(trash_dir: str | None, name: str) -> str:
    assert trash_dir is not None, "nothing went to the trash"
    return (Path(trash_dir) / name).read_text()


async def test_a_restage_with_checksum_trashes_an_edit_that_kept_size_and_mtime(
    make_site: MakeSite,
) -> None:
    _, b = await _staged(make_site, {"f": "original-1\n", "g": "untouched\n"})
    _edit_keeping_stat(b.data / "ck" / "f", "USER-EDIT!\n")
    site_b = await b.open()
    try:
        await _forget_when(site_b, "/proj/ck")  # else the edit's ctime gives it away
        plain = await stage(site_b, "/proj/ck")  # size and mtime are trusted: nothing to do
        assert plain.fetched_files == 0 and plain.trashed_count == 0
        checked = await stage(site_b, "/proj/ck", checksum=True)
    finally:
        await site_b.close()
    assert (b.data / "ck" / "f").read_text() == "original-1\n"
    assert _trashed(checked.trash_dir, "f") == "USER-EDIT!\n"
    assert checked.trashed_count == 1 and checked.fetched_files == 1
    assert (b.data / "ck" / "g").read_text() == "untouched\n"


async def test_a_new_version_with_checksum_trashes_an_edit_that_kept_size_and_mtime(
    make_site: MakeSite,
) -> None:
    a, b = await _staged(make_site, {"f": "original-1\n", "g": "old g\n"})
    _edit_keeping_stat(b.data / "ck" / "f", "USER-EDIT!\n")
    (a.data / "ck" / "f").write_text("original-3\n")
    (a.data / "ck" / "g").write_text("new g\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ck")
        checked = await stage(site_b, "/proj/ck", checksum=True)
    finally:
        await site_a.close()
        await site_b.close()
    assert (b.data / "ck" / "f").read_text() == "original-3\n"
    assert _trashed(checked.trash_dir, "f") == "USER-EDIT!\n"
    # g held the base's bytes: datamover's own, replaced without a trip to the trash
    assert (b.data / "ck" / "g").read_text() == "new g\n"
    assert checked.trashed_count == 1


async def test_delete_with_checksum_trashes_an_edit_instead_of_removing_it(
    make_site: MakeSite,
) -> None:
    a, b = await _staged(make_site, {"f": "original-1\n", "gone": "base bytes\n"})
    _edit_keeping_stat(b.data / "ck" / "f", "USER-EDIT!\n")
    (a.data / "ck" / "f").unlink()
    (a.data / "ck" / "gone").unlink()
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ck", force=True)  # emptied on purpose
        checked = await stage(site_b, "/proj/ck", delete=True, checksum=True)
    finally:
        await site_a.close()
        await site_b.close()
    assert not (b.data / "ck" / "f").exists()
    assert _trashed(checked.trash_dir, "f") == "USER-EDIT!\n"
    assert not (b.data / "ck" / "gone").exists()  # the base's bytes: removed, as datamover's
    assert checked.removed == 1 and checked.trashed_count == 1


async def test_a_tree_this_site_has_no_record_of_is_read_before_its_files_are_kept(
    make_site: MakeSite,
) -> None:
    # Before: the first stage into a tree filled another way (`cp -a`, `rsync -a`, a backup
    # restored, a catalog lost) kept every file whose size and mtime matched, unread: a
    # wrong one stayed, the replica was recorded as the version, and every later stage
    # kept it too. A push reads every file of such a tree; so does this stage now.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ck" / "sub").mkdir(parents=True)
    files = {"f": "original-1\n", "g": "untouched\n", "sub/h": "deeper\n"}
    for name, text in files.items():
        (a.data / "ck" / name).write_text(text)
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ck")
    finally:
        await site_a.close()
    shutil.copytree(a.data / "ck", b.data / "ck", copy_function=shutil.copy2)
    _edit_keeping_stat(b.data / "ck" / "sub" / "h", "DAMAGE\n")
    site_b = await b.open()
    try:
        first = await stage(site_b, "/proj/ck")
        again = await stage(site_b, "/proj/ck")  # now recorded: size and mtime tell
    finally:
        await site_b.close()
    assert {n: (b.data / "ck" / n).read_text() for n in files} == files
    assert _trashed(first.trash_dir, "sub/h") == "DAMAGE\n"  # not ours: kept in the trash
    assert first.fetched_files == 1 and first.kept_files == 2
    assert again.fetched_files == 0 and again.trashed_count == 0


async def test_the_rerun_of_a_failed_first_stage_into_such_a_tree_reads_it_too(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the first stage recorded its own start as the time the tree held a version;
    # cut off after it had written something, its rerun kept a damaged file copied in
    # before that time, and not reached by the first run, unread.
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ck").mkdir()
    big = os.urandom(3 << 20)
    (a.data / "ck" / "a").write_bytes(big)  # large: written alone, before the rest
    (a.data / "ck" / "z").write_text("original-1\n")
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ck")
    finally:
        await site_a.close()
    (b.data / "ck").mkdir()
    shutil.copy2(a.data / "ck" / "z", b.data / "ck" / "z")
    _edit_keeping_stat(b.data / "ck" / "z", "DAMAGE-1!!\n")
    real_large = _Stager._large

    async def large_then_cut_off(self: _Stager, *args: Any) -> None:
        await real_large(self, *args)
        raise RuntimeError("cut off")  # as a stage killed right after writing `a`

    site_b = await b.open()
    try:
        monkeypatch.setattr(_Stager, "_large", large_then_cut_off)
        with pytest.raises(RuntimeError, match="cut off"):
            await stage(site_b, "/proj/ck")
        monkeypatch.setattr(_Stager, "_large", real_large)
        assert (b.data / "ck" / "a").read_bytes() == big
        rerun = await stage(site_b, "/proj/ck")
    finally:
        await site_b.close()
    assert (b.data / "ck" / "z").read_text() == "original-1\n"
    assert _trashed(rerun.trash_dir, "z") == "DAMAGE-1!!\n"
