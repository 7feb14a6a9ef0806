"""Sockets, FIFOs and devices: push skips them (they hold no data) and names them, and
verify does not count them as differences, so `push` then `verify` of one tree agree."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.errors import InvalidInput
from datamover.transfer import walk
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_sites import MakeSite


@contextlib.contextmanager
def _unix_socket(path: Path) -> Iterator[None]:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        yield
    finally:
        sock.close()


async def test_special_files_are_skipped_by_push_and_verify(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "run"
    (src / "d").mkdir(parents=True)
    (src / "d" / "data").write_bytes(b"results")
    os.mkfifo(src / "d" / "pipe")
    with _unix_socket(src / "sock"):
        site_a, site_b = await a.open(), await b.open()
        try:
            pushed = await push(site_a, "/proj/run")
            assert pushed.files == 1
            assert pushed.skipped_special == ["d/pipe", "sock"]
            assert pushed.skipped_special_count == 2

            here = await verify(site_a, "/proj/run")
            assert here.ok, here.problems
            assert here.skipped_special == ["d/pipe", "sock"]
            assert here.files_checked == 1

            await stage(site_b, "/proj/run")
            there = b.data / "run"
            assert sorted(p.name for p in there.rglob("*")) == ["d", "data"]
            before = os.stat(there / "d").st_mtime_ns
            os.mkfifo(there / "d" / "data.fifo")
            os.utime(there / "d", ns=(before, before))  # a new entry changes it: not tested here
            (there / "extra").write_bytes(b"x")  # a regular file is a difference
            checked = await verify(site_b, "/proj/run")
            assert not checked.ok and checked.problems == ["extra: not in the version"]
            assert checked.skipped_special == ["d/data.fifo"]

            # A special file where the version has a file is a difference.
            (there / "extra").unlink()
            (there / "d" / "data").unlink()
            os.mkfifo(there / "d" / "data")
            os.utime(there / "d", ns=(before, before))
            checked = await verify(site_b, "/proj/run")
            assert checked.problems == ["d/data: is a special file, expected a file"]
        finally:
            await site_a.close()
            await site_b.close()


def test_a_walk_names_the_first_hundred_special_files_and_counts_all(tmp_path: Path) -> None:
    for i in range(walk.SKIPPED_SAMPLE + 5):
        os.mkfifo(tmp_path / f"p{i:04}")
    (tmp_path / "f").write_bytes(b"")
    walker = walk.Walker(str(tmp_path), strict=True)
    try:
        assert [e.path for e in walker] == ["f"]
    finally:
        walker.close()
    assert walker.skipped_special_count == walk.SKIPPED_SAMPLE + 5
    assert walker.skipped_special == [f"p{i:04}" for i in range(walk.SKIPPED_SAMPLE)]


async def test_the_cli_names_ten_special_files_and_counts_the_rest(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    src = a.data / "run"
    src.mkdir()
    (src / "data").write_bytes(b"results")
    for i in range(12):
        os.mkfifo(src / f"pipe{i:02}")
    pushed = a.cli("push", "/proj/run")
    assert pushed.returncode == 0, pushed.stderr
    checked = a.cli("verify", "/proj/run")
    assert checked.returncode == 0, checked.stderr
    assert "local tree matches" in checked.stdout
    for proc in (pushed, checked):
        named = [line for line in proc.stderr.splitlines() if "skipped special file" in line]
        assert len(named) == 10
        assert "and 2 more special files" in proc.stderr
    (src / "data").write_bytes(b"changed")
    differs = a.cli("verify", "/proj/run")
    assert differs.returncode == 1
    assert "differs (1 problem)" in differs.stdout


async def test_a_special_file_a_version_could_not_name_does_not_stop_push(
    make_site: MakeSite,
) -> None:
    """Push skips a FIFO whatever its name, so a name no version can hold (a control
    character) or one colliding with another under normalisation does not refuse the tree,
    and push and verify still agree; a regular file so named is refused."""
    a = await make_site("site-a")
    src = a.data / "run"
    src.mkdir()
    (src / "caf\u00e9").write_bytes(b"data")
    os.mkfifo(src / "pipe\x01")
    os.mkfifo(src / "cafe\u0301")  # "café" decomposed: collides with the file
    site = await a.open()
    try:
        pushed = await push(site, "/proj/run")
        assert pushed.files == 1 and pushed.skipped_special_count == 2
        checked = await verify(site, "/proj/run")
        assert checked.ok, checked.problems
        (src / "bad\x02").write_bytes(b"x")
        with pytest.raises(InvalidInput, match="control character"):
            await push(site, "/proj/run")
    finally:
        await site.close()


async def test_files_named_as_partial_files_are_named_by_push(make_site: MakeSite) -> None:
    # They were left out of the version without a word.
    a = await make_site("site-a")
    src = a.data / "run"
    (src / "d").mkdir(parents=True)
    (src / "d" / "data").write_bytes(b"results")
    (src / "d" / ".dm-0123456789abcdef.part").write_text("my notes\n")
    proc = a.cli("push", "/proj/run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "  skipped d/.dm-0123456789abcdef.part: named as stage's partial files "
        "(.dm-<16 hex>.part), which no version holds"
    ]
    (src / "d" / "more").write_text("x\n")
    pushed = a.cli_json("push", "/proj/run")
    assert pushed["files"] == 2
    assert pushed["skipped_partial"] == ["d/.dm-0123456789abcdef.part"]
    assert pushed["skipped_partial_count"] == 1
