"""What `stage --json` prints of the names it moved to the trash."""

from __future__ import annotations

import json
import os

import pytest

from tests.fixtures_sites import MakeSite


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_trashed_names_that_are_not_utf8_are_printed_as_verify_prints_them(
    make_site: MakeSite,
) -> None:
    # Before: the name went out with its surrogate escapes ("bad\udcff"), which strict JSON
    # parsers (and UTF-8 encoders) refuse.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("f\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    (b.data / "ds" / os.fsdecode(b"bad\xff")).write_bytes(b"local\n")
    proc = b.cli("stage", "/proj/ds", "--delete", "--json")
    assert proc.returncode == 0, proc.stderr
    trashed = json.loads(proc.stdout)["trashed"]
    assert trashed == ["'bad\\xff'"]
    proc.stdout.encode("utf-8")  # no lone surrogate in the output
