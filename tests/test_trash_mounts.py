"""The trash never takes a mounted file system along or reaches into one: a directory a
stage would move to the trash that holds a mount point is refused, whole, and emptying the
trash stops at a mount point (`rm --one-file-system`). Each test failed on the code before
its fix: `stage --delete` renamed a directory with a tmpfs mounted below it into the trash,
and `trash --empty` then deleted the tmpfs's files; with the trash on another file system,
the mounted files were copied and removed one by one."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.transfer import crossfs, mounts, trash
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.test_unprivileged_trash import _state_on_shm

SQLITE_ONLY = pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)


@contextlib.contextmanager
def _mounted(at: Path) -> Iterator[Path]:
    """A small tmpfs at `at` (made if missing) for the block, holding `precious`. The tests
    run as root: a failed mount is a failure, never a skip."""
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(at)], check=True)
    try:
        (at / "precious").write_text("not the dataset's\n")
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


async def _pushed(make_site: MakeSite) -> tuple[SiteEnv, SiteEnv]:
    """`/proj/ds` (one file) pushed at site A and staged at site B."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "keep").write_text("k\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    return a, b


def _trash_files(state: Path) -> list[str]:
    root = trash.trash_root(state)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.is_dir() else []


@SQLITE_ONLY
@pytest.mark.parametrize("trash_on", ["same file system", "another file system"])
async def test_stage_delete_refuses_a_directory_holding_a_mount_point(
    make_site: MakeSite, trash_on: str
) -> None:
    _, b = await _pushed(make_site)
    state = _state_on_shm(b) if trash_on == "another file system" else b.state
    with _mounted(b.data / "ds" / "extra" / "m") as point:
        proc = b.cli("stage", "/proj/ds", "--delete")
        assert proc.returncode == 7, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert "'extra' holds a mount point" in proc.stderr and str(point) in proc.stderr
        assert (point / "precious").read_text() == "not the dataset's\n"
        assert point.is_mount()
        assert not any("precious" in p for p in _trash_files(state))
    assert (b.data / "ds" / "keep").read_text() == "k\n"


@SQLITE_ONLY
async def test_emptying_the_trash_stops_at_a_mount_point_and_empties_the_rest(
    make_site: MakeSite,
) -> None:
    root = trash.trash_root((await make_site("site-b")).state)
    old, older = root / "20200101T000000Z-aaaaaa", root / "20190101T000000Z-bbbbbb"
    (old / "proj" / "ds").mkdir(parents=True)
    (old / "proj" / "ds" / "f").write_text("trashed\n")
    (older / "proj").mkdir(parents=True)
    (older / "proj" / "g").write_text("trashed too\n")
    for run in (old, older):
        for p in [run, *run.rglob("*")]:
            os.utime(p, (1_500_000_000, 1_500_000_000))
    with _mounted(old / "proj" / "ds" / "m") as point:
        with pytest.raises(trash.TrashStuck) as stuck:
            trash.empty(root.parent, 30)
        assert f"mounted at {str(point)!r}" in stuck.value.message
        assert [r.name for r in stuck.value.removed] == [older.name]
        assert (point / "precious").read_text() == "not the dataset's\n"
        assert not older.exists()


def test_removal_stops_at_another_file_system_mounted_after_its_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The second line: a mount point the mount table did not show (mounted since it was
    # read) is met as a directory on another device, and not entered.
    top = tmp_path / "top"
    (top / "a").mkdir(parents=True)
    (top / "a" / "f").write_text("f\n")
    monkeypatch.setattr(mounts, "mounted_in", lambda fd: None)
    with _mounted(top / "a" / "m") as point:
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as raised:
                trash.remove_tree(fd, "top")
            assert raised.value.errno == errno.EXDEV
            with pytest.raises(OSError) as copied:
                crossfs.move_across(fd, "top", fd, "moved")
            assert copied.value.errno == errno.EXDEV
        finally:
            os.close(fd)
        assert (point / "precious").read_text() == "not the dataset's\n"
        assert not (tmp_path / "moved").exists()


def test_mount_points_are_read_with_their_escapes(tmp_path: Path) -> None:
    odd = tmp_path / "with space\tand tab"
    with _mounted(odd / "inner") as point:
        fd = os.open(odd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert mounts.mounted_in(fd) == str(point)
        finally:
            os.close(fd)
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert mounts.mounted_in(fd) == str(point)
        finally:
            os.close(fd)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert mounts.mounted_in(fd) is None
    finally:
        os.close(fd)


@SQLITE_ONLY
async def test_the_cli_names_a_run_holding_a_mount_point_in_one_line(
    make_site: MakeSite,
) -> None:
    b = await make_site("site-b")
    run = trash.trash_root(b.state) / "20200101T000000Z-cccccc"
    (run / "d").mkdir(parents=True)
    with _mounted(run / "d" / "m") as point:
        os.utime(run / "d", (1_500_000_000, 1_500_000_000))
        os.utime(run, (1_500_000_000, 1_500_000_000))
        proc = b.cli("trash", "--empty", "--older-than", "30")
        assert proc.returncode == 7, proc.stderr
        assert proc.stderr.count("\n") == 1 and f"mounted at {str(point)!r}" in proc.stderr
        assert (point / "precious").exists()


def test_a_directory_on_another_device_that_is_no_mount_point_is_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A btrfs subvolume has a device of its own and is in no mount table: emptying the
    # trash or moving such a directory across had stopped there ("another file system is
    # mounted there"), at every try. Here a tmpfs left out of the table stands in for one.
    top = tmp_path / "top"
    top.mkdir()
    with _mounted(top / "sub") as sub:
        inner = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        parent = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.fstat(inner).st_dev != os.fstat(parent).st_dev
            monkeypatch.setattr(mounts, "mount_points", lambda: ["/"])
            mounts.refuse_mount_point(inner, parent, "sub")  # walked: nothing raised
            # No table to read (no /proc): a device change counts as a mount point.
            monkeypatch.setattr(mounts, "mount_points", lambda: [])
            with pytest.raises(OSError):
                mounts.refuse_mount_point(inner, parent, "sub")
            monkeypatch.undo()
            with pytest.raises(OSError) as raised:  # in the table: a mount point
                mounts.refuse_mount_point(inner, parent, "sub")
            assert raised.value.errno == errno.EXDEV
        finally:
            os.close(inner)
            os.close(parent)


def test_a_directory_mounted_by_its_open_is_not_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An automount, or an NFS server's submount, appears when the directory is opened, not
    # when it is looked at: the device was compared before the open, and the walk deleted
    # the mounted file system's files.
    top = tmp_path / "top"
    (top / "m").mkdir(parents=True)
    real_open = trash._open_dir
    with contextlib.ExitStack() as unmount:

        def mounting_open(parent_fd: int, name: str) -> int:
            if name == "m":
                unmount.enter_context(_mounted(top / "m"))
            return real_open(parent_fd, name)

        monkeypatch.setattr(trash, "_open_dir", mounting_open)
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with pytest.raises(OSError) as raised:
                trash.remove_tree(fd, "top")
        finally:
            os.close(fd)
        assert raised.value.errno == errno.EXDEV
        assert (top / "m" / "precious").read_text() == "not the dataset's\n"
