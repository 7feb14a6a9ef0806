"""How verify (and `stage --checksum`) read a local file to compare its bytes.

A file that cannot be read is not "content differs": the report must say why it could not
be compared. A path longer than PATH_MAX is read as well as a short one, and a symlink
swapped in for a directory of the tree is not followed out of it.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import blake3
import pytest

from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.transfer.fsops import content_problem
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged
from tests.fixtures_store import FaultProxy, s3_error

MISMATCH = "content differs from the version (digest mismatch)"


def _entry(path: str, data: bytes) -> Entry:
    ref = ChunkRef(blake3.blake3(data).digest(), bytes(32), 0, len(data), len(data), 0)
    return Entry(path, Kind.FILE, 0o644, 0, len(data), None, (ref,))


def test_content_problem_says_what_kept_a_file_from_matching(tmp_path: Path) -> None:
    (tmp_path / "run" / "out").mkdir(parents=True)
    (tmp_path / "run" / "out" / "f").write_bytes(b"result\n")
    (tmp_path / "elsewhere" / "out").mkdir(parents=True)
    (tmp_path / "elsewhere" / "out" / "f").write_bytes(b"result\n")
    root = str(tmp_path)

    assert content_problem(root, _entry("run/out/f", b"result\n")) is None
    assert content_problem(root, _entry("run/out/f", b"other!\n")) == MISMATCH
    assert content_problem(root, _entry("run/out/f", b"result")) == MISMATCH  # longer on disk
    assert content_problem(root, _entry("run/out/gone", b"x")) == (
        "is missing (removed while it was checked)"
    )
    # a directory of the tree swapped for a link to an equal file elsewhere: not followed
    (tmp_path / "run" / "out").rename(tmp_path / "run" / "moved")
    (tmp_path / "run" / "out").symlink_to(tmp_path / "elsewhere" / "out")
    assert content_problem(root, _entry("run/out/f", b"result\n")) == (
        "is not a regular file below a directory of the tree (a symlink is in the way)"
    )


async def test_verify_reads_files_below_a_path_longer_than_path_max(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    names = [f"{i:02d}" + "d" * 198 for i in range(21)]  # 21 x 201 bytes: over 4,096
    deep = a.data / "deep"
    at = os.open(a.data, os.O_RDONLY | os.O_DIRECTORY)
    try:  # made a level at a time: the whole path is too long for one call
        for name in ["deep", *names]:
            os.mkdir(name, dir_fd=at)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
            os.close(at)
            at = inner
        fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=at)
        os.write(fd, b"deep result\n")
        os.close(fd)
    finally:
        os.close(at)
    assert len(str(deep / "/".join(names) / "f")) > 4096
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/deep")
        await stage(site_b, "/proj/deep")
    finally:
        await site_a.close()
        await site_b.close()

    r = b.cli("verify", "/proj/deep", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["files_checked"] == 1


async def test_a_file_verify_cannot_read_is_reported_as_unreadable(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "secret").write_text("only root\n")
    (a.data / "ds" / "open").write_text("anyone\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()
    os.chmod(b.data / "ds" / "secret", 0)  # its mode now differs too: reported as well
    r = cli_unprivileged(b, "verify", "/proj/ds", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert problems == [
        "secret: mode 0, expected 644",
        "secret: cannot be read to compare it: permission denied",
    ]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)
async def test_verify_names_an_interrupted_stages_partial_file_as_such(
    make_site: MakeSite,
) -> None:
    # Before: ".dm-0123456789abcdef.part: not in the version", a name the user never made.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("version\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    (b.data / "ds" / "sub" / ".dm-0123456789abcdef.part").write_text("vers")
    proc = b.cli("verify", "/proj/ds")
    assert proc.returncode != 0
    assert (
        "sub/.dm-0123456789abcdef.part: a partial file of an interrupted stage (stage again "
        "to finish it)"
    ) in proc.stdout + proc.stderr
    assert b.cli("verify", "/proj/ds", "--allow-extra").returncode == 0


async def _staged_at_b(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv, str]:
    """Sites A and B, /proj/ds pushed at A and staged at B; the version."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("one\n")
    first = a.cli_json("push", "/proj/ds")["version"]
    assert b.cli("stage", "/proj/ds").returncode == 0
    return a, b, first


async def test_verify_of_the_staged_version_says_when_a_newer_one_is_published(
    make_site: MakeSite,
) -> None:
    # Before: "matches version <old>", exit 0, and nothing said the tree was out of date.
    a, b, first = await _staged_at_b(make_site)
    (a.data / "ds" / "f").write_text("two\n")
    second = a.cli_json("push", "/proj/ds")["version"]

    report = b.cli_json("verify", "/proj/ds")
    assert (report["ok"], report["version"], report["newer"]) == (True, first, second)
    proc = b.cli("verify", "/proj/ds")
    assert proc.returncode == 0
    assert f"local tree matches version {first}" in proc.stdout
    assert f"note: a newer version, {second}, is published" in proc.stdout
    # Asked for a version by name, or staged at the latest: no note.
    assert b.cli_json("verify", "/proj/ds", "--version", first)["newer"] is None
    assert b.cli("stage", "/proj/ds").returncode == 0
    report = b.cli_json("verify", "/proj/ds")
    assert (report["ok"], report["version"], report["newer"]) == (True, second, None)


async def test_verify_is_not_failed_by_a_store_that_refuses_the_look_for_newer_versions(
    make_site: MakeSite, seaweed: Any, proxy: FaultProxy
) -> None:
    # The note is best effort: a key that may read but not list (or a listing that keeps
    # failing) still gets its verdict, with a warning instead of the note.
    _, b, first = await _staged_at_b(make_site)
    b.config_path.write_text(b.config_path.read_text().replace(seaweed.endpoint, proxy.endpoint))

    async def no_listing(request: Any, body: bytes) -> Any:
        if request.method == "GET" and "list-type" in request.query:
            return s3_error(403, "AccessDenied")
        return None

    proxy.rule = no_listing
    proc = await asyncio.to_thread(b.cli, "verify", "/proj/ds", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["ok"], report["version"], report["newer"]) == (True, first, None)
    assert "could not look for versions newer than" in proc.stderr
    assert any("list-type" in path for _, path in proxy.seen)  # the refusal did happen
