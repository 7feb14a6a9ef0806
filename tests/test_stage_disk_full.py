"""A stage that runs out of space says where: the file it was writing, not a bare
"No space left on device" (a write through a descriptor names no file of its own)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from datamover.cli import _expected
from datamover.domain.manifest import Entry, Kind
from datamover.transfer.fsops import TreeWriter, open_root
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite


def _full(*args: Any) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_small_file_that_does_not_fit_is_named_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ds" / "run").mkdir(parents=True)
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds")
    try:
        monkeypatch.setattr(os, "write", _full)
        with pytest.raises(OSError) as caught:
            writer.write_file(Entry("run/out.pdbqt", Kind.FILE, 0o644, 0, 4), [b"data"])
    finally:
        monkeypatch.undo()
        writer.close()
        os.close(writer.root_fd)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(tmp_path / "ds" / "run" / "out.pdbqt")
    assert list((tmp_path / "ds" / "run").iterdir()) == []  # the temporary file is gone
    mapped = _expected(caught.value)
    assert mapped is not None
    assert mapped.message == f"No space left on device: '{tmp_path}/ds/run/out.pdbqt'"


async def test_a_large_file_that_does_not_fit_is_named(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", batch_bytes=4 << 20)  # files over 1 MiB: fetched by range
    (a.data / "ds").mkdir()
    (a.data / "ds" / "trajectory.bin").write_bytes(os.urandom(3 << 20))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        monkeypatch.setattr(os, "pwrite", _full)
        with pytest.raises(OSError) as caught:
            await stage(site_b, "/proj/ds")
    finally:
        monkeypatch.undo()
        await site_a.close()
        await site_b.close()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(b.data / "ds" / "trajectory.bin")


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_full_trash_is_the_system_refusing_exit_1_not_a_refusal_exit_7(
    make_site: MakeSite,
) -> None:
    # Before: "cannot move 'big' to the trash ...: No space left on device" was exit 7,
    # which the README gives to credentials and permissions; "no space left" is exit 1.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "big").write_bytes(b"v1" * (1 << 20))
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    (b.data / "ds" / "big").write_bytes(b"user" * (1 << 20))  # a local edit: for the trash
    (a.data / "ds" / "big").write_bytes(b"v2" * (1 << 20))
    assert a.cli("push", "/proj/ds").returncode == 0
    trash = b.state / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(trash)], check=True)
    try:
        proc = b.cli("stage", "/proj/ds")
    finally:
        subprocess.run(["umount", "-l", str(trash)], check=False)
    assert proc.returncode == 1, proc.stderr
    assert "to the trash" in proc.stderr and "No space left on device" in proc.stderr
    assert (b.data / "ds" / "big").read_bytes() == b"user" * (1 << 20)  # left in place
