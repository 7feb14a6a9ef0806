"""Files a version makes unreadable to their owner (mode 0o000, 0o200) verify and restage.

Before, a non-root site staged them as the version says and then could not read them:
verify failed on a matching tree for good, and every `stage --checksum` moved them to the
trash and fetched them again.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.fixtures_sites import MakeSite, cli_unprivileged


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_owner_unreadable_files_verify_and_restage_without_changes(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    ds = a.data / "modes"
    ds.mkdir()
    (ds / "noread").write_text("no one may read me\n")
    (ds / "wonly").write_text("write only\n")
    (ds / "plain").write_text("plain\n")
    os.chmod(ds / "noread", 0o000)
    os.chmod(ds / "wonly", 0o200)
    assert a.cli("push", "/proj/modes").returncode == 0  # as root: readable

    staged = cli_unprivileged(b, "stage", "/proj/modes", "--json")
    assert staged.returncode == 0, staged.stderr
    out = b.data / "modes"
    assert stat.S_IMODE(os.lstat(out / "noread").st_mode) == 0o000

    checked = cli_unprivileged(b, "verify", "/proj/modes")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = cli_unprivileged(b, "stage", "/proj/modes", "--checksum", "--json")
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["trashed"] == [] and result["fetched_files"] == 0, result
    # The modes are the version's again after the reads.
    assert stat.S_IMODE(os.lstat(out / "noread").st_mode) == 0o000
    assert stat.S_IMODE(os.lstat(out / "wonly").st_mode) == 0o200

    # A changed file of that mode is still found: the content is compared, not trusted.
    before = os.lstat(out / "noread")
    os.chmod(out / "noread", 0o600)
    (out / "noread").write_text("no one may read ME\n")  # same size
    os.utime(out / "noread", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.chmod(out / "noread", 0o000)
    differs = cli_unprivileged(b, "verify", "/proj/modes")
    assert differs.returncode == 1
    assert "noread: content differs" in differs.stdout + differs.stderr
    assert stat.S_IMODE(os.lstat(out / "noread").st_mode) == 0o000
    # A file a user locked (its mode is not the version's) is reported, not unlocked.
    os.chmod(out / "plain", 0o000)
    locked = cli_unprivileged(b, "verify", "/proj/modes")
    assert locked.returncode == 1
    assert "plain: cannot be read to compare it" in locked.stdout + locked.stderr
    assert stat.S_IMODE(os.lstat(out / "plain").st_mode) == 0o000
