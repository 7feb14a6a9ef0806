"""Review of the push path: a dataset directory swapped during a push, entries that vanish
between a listing and their `lstat`, names that only look like stage's temporary files, and
files written just after the granule `readers.settled` waits for."""

from __future__ import annotations

import pytest

from datamover.errors import InvalidInput
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
