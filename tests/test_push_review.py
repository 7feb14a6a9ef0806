"""Review of the push path: a dataset directory swapped during a push, entries that vanish
between a listing and their `lstat`, names that only look like stage's temporary files, and
files written just after the granule `readers.settled` waits for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from datamover.datasets import list_datasets
from datamover.errors import Conflict, InvalidInput
from datamover.transfer import walk
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite

#: Stage's temporary name with a newline after it: `$` matched before that newline.
ODD_PART = ".dm-0123456789abcdef.part\n"


# -- a name is stage's temporary only if it is one exactly ----------------------------------


def test_a_partial_name_followed_by_a_newline_is_no_partial_name() -> None:
    assert walk.PARTIAL_RE.match(".dm-0123456789abcdef.part")
    assert not walk.PARTIAL_RE.match(ODD_PART)


async def test_push_refuses_a_partial_name_with_a_newline_instead_of_skipping_it(
    make_site: MakeSite,
) -> None:
    """A user's file so named was left out of the version without a word; its name holds a
    control character, which push refuses for any other name."""
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "ok.txt").write_text("ok\n")
    (a.data / "x" / ODD_PART).write_text("user data\n")
    site = await a.open()
    try:
        with pytest.raises(InvalidInput, match="control character U\\+000A"):
            await push(site, "/proj/x")
    finally:
        await site.close()


async def test_stage_keeps_a_file_whose_name_is_a_partial_name_and_a_newline(
    make_site: MakeSite,
) -> None:
    """Stage removed such a file as a leftover of its own, even without `--delete`."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x").mkdir()
    (a.data / "x" / "ok.txt").write_text("ok\n")
    (b.data / "x").mkdir()
    (b.data / "x" / ODD_PART).write_text("user data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        await stage(site_b, "/proj/x")
    finally:
        await site_a.close()
        await site_b.close()
    assert (b.data / "x" / ODD_PART).read_text() == "user data\n"
    assert (b.data / "x" / "ok.txt").read_text() == "ok\n"


# -- an entry that vanishes between its parent's listing and its lstat -----------------------


async def test_a_directory_renamed_before_its_lstat_fails_the_push(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk lists a directory, then `lstat`s its entries one by one as it reaches them:
    `z`, renamed to `y` while the walk was in `a`, was left out of the version (its files
    there all along, under another name). It is a conflict, as when it vanishes between its
    `lstat` and its own listing, and nothing is published."""
    a = await make_site("site-a")
    src = a.data / "run"
    for name in ("a", "z"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"f{i}").write_text(f"{name} {i}\n")
    real = walk.Walker._list

    def listing(self: walk.Walker, rel: str, unlock: bool = False) -> Any:
        if rel == "a":  # the root is listed, `z` not yet looked at
            (src / "z").rename(src / "y")
        return real(self, rel, unlock)

    monkeypatch.setattr(walk.Walker, "_list", listing)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match="'z' vanished while push read the tree"):
            await push(site, "/proj/run")
        assert await list_datasets(site, "/proj/run") == []
    finally:
        await site.close()


@pytest.mark.parametrize("strict", [True, False])
def test_a_symlink_removed_before_its_target_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    """Between a symlink's `lstat` and its `readlink`: a conflict for push (strict), left
    out as before for stage and verify, which walk a tree they may be changing."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f\n")
    (tmp_path / "d" / "link").symlink_to("f")
    real = os.readlink

    def readlink(path: Any, *, dir_fd: int | None = None) -> str:
        os.unlink(path, dir_fd=dir_fd)
        return real(path, dir_fd=dir_fd)

    walker = walk.Walker(str(tmp_path), strict=strict)
    monkeypatch.setattr(walk.os, "readlink", readlink)
    try:
        if strict:
            with pytest.raises(Conflict, match="'d/link' vanished while push read the tree"):
                list(walker)
        else:
            assert [e.path for e in walker] == ["d", "d/f"]
    finally:
        walker.close()
