"""`datamover trash`: the runs stage moved users' changes into, listed, and emptied once
older than a number of days, read-only and deep trees included, never through a symlink,
never a run of the last day."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from datamover.transfer import trash
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged

_SQLITE_ONLY = pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)


def _run_dirs(env: SiteEnv) -> list[str]:
    root = trash.trash_root(env.state)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def _trashed_once(make_site: MakeSite) -> SiteEnv:
    """Site B with /proj/ds staged and a user's change to it moved to the trash by a
    second stage: one run holding one 5-byte file."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    (b.data / "ds" / "f").write_text("mine\n")
    (a.data / "ds" / "f").write_text("version two\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    staged = b.cli_json("stage", "/proj/ds")
    assert staged["trashed_count"] == 1
    return b


def _age(env: SiteEnv, name: str, stamp: str) -> str:
    """Rename run `name` as if it had started at `stamp` (`YYYYmmddTHHMMSSZ`)."""
    old = f"{stamp}-{name.rpartition('-')[2]}"
    root = trash.trash_root(env.state)
    (root / name).rename(root / old)
    return old


@_SQLITE_ONLY
async def test_the_trash_is_listed_by_run(make_site: MakeSite) -> None:
    b = await _trashed_once(make_site)
    [run] = _run_dirs(b)
    listed = b.cli_json("trash")
    assert [r["run"] for r in listed["runs"]] == [run]
    assert (listed["files"], listed["bytes"]) == (1, 5) and listed["emptied"] is False
    assert b.cli_json("trash", "--older-than", "1")["runs"] == []  # it started just now
    text = b.cli("trash")
    assert text.returncode == 0 and "1 run in" in text.stdout and "1 file" in text.stdout


@_SQLITE_ONLY
async def test_a_run_of_the_last_day_is_never_emptied(make_site: MakeSite) -> None:
    b = await _trashed_once(make_site)
    [run] = _run_dirs(b)
    emptied = b.cli_json("trash", "--empty", "--older-than", "1")
    assert emptied["runs"] == [] and _run_dirs(b) == [run]
    for bad in (["--empty"], ["--empty", "--older-than", "0"]):
        proc = b.cli("trash", *bad)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and "older-than" in proc.stderr
        assert _run_dirs(b) == [run]


@_SQLITE_ONLY
async def test_an_old_run_is_emptied_read_only_deep_and_linked_parts_too(
    make_site: MakeSite, tmp_path: Path
) -> None:
    b = await _trashed_once(make_site)
    [fresh] = _run_dirs(b)
    old = _age(b, fresh, "20200101T000000Z")
    run = trash.trash_root(b.state) / old
    # A read-only tree trashed whole, a directory no one may read, a tree deeper than
    # PATH_MAX, and a symlink to something outside that must survive.
    locked = run / "proj" / "ds" / "ro"
    (locked / "sub").mkdir(parents=True)
    (locked / "sub" / "g").write_text("g\n")
    os.chmod(locked / "sub", 0o555)
    os.chmod(locked, 0o555)
    (run / "proj" / "ds" / "closed").mkdir()
    (run / "proj" / "ds" / "closed" / "h").write_text("h\n")
    os.chmod(run / "proj" / "ds" / "closed", 0o000)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(200):
        os.mkdir("d" * 30, dir_fd=fd)
        inner = os.open("d" * 30, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("deep", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd))
    os.close(fd)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep\n")
    (run / "link").symlink_to(outside)
    (trash.trash_root(b.state) / "not-a-run").mkdir()
    # A run a killed `trash --empty` began to remove.
    (trash.trash_root(b.state) / ".emptying-20200101T000000Z-abcdef" / "x").mkdir(parents=True)
    proc = cli_unprivileged(b, "trash", "--empty", "--older-than", "30", "--json")
    assert proc.returncode == 0, proc.stderr
    emptied = json.loads(proc.stdout)
    assert [r["run"] for r in emptied["runs"]] == [old] and emptied["emptied"] is True
    assert emptied["files"] == 4  # f, g, h, deep
    assert _run_dirs(b) == ["not-a-run"]
    assert (outside / "keep").read_text() == "keep\n"


def test_emptying_a_site_without_a_trash_removes_nothing(tmp_path: Path) -> None:
    assert trash.empty(tmp_path, 1) == []
    assert list(trash.runs(tmp_path)) == []
