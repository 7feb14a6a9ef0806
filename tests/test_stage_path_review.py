"""Stage's data path after a review: a read-only partial file left by a stopped run, the
modes of read-only directories after a failed stage with writer processes, a directory of
another user whose mode cannot be set, trash moves deeper than PATH_MAX, and manifest names
that are stage's partial names."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.domain.manifest import Entry, Kind
from datamover.errors import Corrupt, PermanentError
from datamover.repo.manifest import EntryChecker
from datamover.site import Site
from datamover.transfer import fsops
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.walk import PARTIAL_RE
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged
from tests.test_bad_input import publish_manifest
from tests.test_unprivileged_trash import _state_on_shm


@contextlib.contextmanager
def _tmpfs(at: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `at` for the block (the tests run as root: a failed
    mount is a failure, never a skip)."""
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


# -- a read-only partial file left by a stopped run --------------------------------------------


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_read_only_partial_file_left_by_a_stopped_run_is_resumed(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ds").mkdir()
    content = os.urandom(3 << 20)  # above batch_bytes / 4: a large file, by its partial file
    (a.data / "ds" / "big").write_bytes(content)
    os.chmod(a.data / "ds" / "big", 0o444)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")

        def killed(*args: object) -> None:  # the run stops between the chmod and the rename
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as patch:
            patch.setattr(fsops.TreeWriter, "rename_into_place", killed)
            with pytest.raises(OSError):
                await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()
    [left] = list((b.data / "ds").iterdir())
    assert left.name.startswith(".dm-") and stat.S_IMODE(left.stat().st_mode) == 0o444
    # Before: every later run by its owner (no root override) failed with "'big': permission
    # denied", exit 7, naming a file that did not exist.
    proc = cli_unprivileged(b, "stage", "/proj/ds", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["fetched_bytes"] == 0  # resumed: its chunks were kept
    assert (b.data / "ds" / "big").read_bytes() == content
    assert stat.S_IMODE((b.data / "ds" / "big").stat().st_mode) == 0o444
    assert [p.name for p in (b.data / "ds").iterdir()] == ["big"]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_partial_file_of_another_user_that_cannot_be_opened_is_replaced(
    make_site: MakeSite,
) -> None:
    b, content, entry = await _big_pushed(make_site)
    (b.data / "ds").mkdir()
    planted = b.data / "ds" / fsops.partial_name(entry)
    planted.write_bytes(b"not ours\n")
    os.chown(planted, 65534, 65534)
    os.chmod(planted, 0o400)
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    assert proc.returncode == 0, proc.stderr
    assert (b.data / "ds" / "big").read_bytes() == content
    assert [p.name for p in (b.data / "ds").iterdir()] == ["big"]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_another_users_partial_file_in_a_sticky_directory_is_in_no_ones_way(
    make_site: MakeSite,
) -> None:
    # Before: a partial file had one name for every user, and in a directory with the
    # sticky bit another user's could be neither opened nor removed: every stage of the
    # large file failed (exit 7), naming `big`, which did not exist. The dataset's root is
    # the shared directory (no entry of the version: its owner keeps its mode and mtime).
    b, content, entry = await _big_pushed(make_site)
    shared = b.data / "ds"
    shared.mkdir()
    os.chown(shared, 65533, 65533)  # a third user's: only it and a file's owner may remove
    os.chmod(shared, 0o1777)
    leftover = shared / fsops.partial_name(entry, 65534)
    leftover.write_bytes(content[:4096])  # a killed stage of user 65534
    os.chown(leftover, 65534, 65534)
    os.chmod(leftover, 0o600)
    assert fsops.partial_name(entry) != leftover.name

    proc = cli_unprivileged(b, "stage", "/proj/ds")
    assert proc.returncode == 0, proc.stderr
    assert (shared / "big").read_bytes() == content
    assert sorted(p.name for p in shared.iterdir()) == sorted(["big", leftover.name])
    assert f"left '{leftover.name}'" in proc.stderr and "user 65534" in proc.stderr
    # Verify still names it; once its owner's leftover is gone, the tree is the version.
    proc = cli_unprivileged(b, "verify", "/proj/ds")
    assert proc.returncode == 1 and leftover.name in proc.stdout + proc.stderr
    leftover.unlink()
    assert cli_unprivileged(b, "verify", "/proj/ds").returncode == 0


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_partial_file_under_the_name_of_releases_before_is_removed_not_trashed(
    make_site: MakeSite,
) -> None:
    # Partial names became one per user: a killed stage's partial file under the name of
    # before (one for every user) had gone to the trash as a user's file, where a large
    # one stayed (trash_days is 0 by default).
    b, content, entry = await _big_pushed(make_site)
    (b.data / "ds").mkdir()
    old = b.data / "ds" / fsops.partial_name(entry, -1)
    old.write_bytes(content[: 1 << 20])
    assert old.name != fsops.partial_name(entry)
    site_b = await b.open()
    try:
        result = await stage(site_b, "/proj/ds")
    finally:
        await site_b.close()
    assert result.trashed_count == 0
    assert [p.name for p in (b.data / "ds").iterdir()] == ["big"]
    assert (b.data / "ds" / "big").read_bytes() == content


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_partial_name_of_releases_before_is_removed_before_the_writes(
    make_site: MakeSite,
) -> None:
    # Counted as the target's own partial file, it was removed only at the end, and never
    # resumed (this user's name is another): a disk it filled failed every stage, with a
    # bare "No space left on device".
    b, content, entry = await _big_pushed(make_site)
    with _tmpfs(b.data / "ds", "5m") as ds:
        (ds / fsops.partial_name(entry, -1)).write_bytes(content)  # 3 of the 5 MiB
        proc = b.cli("stage", "/proj/ds")
        assert proc.returncode == 0, proc.stderr
        assert [p.name for p in ds.iterdir()] == ["big"]
        assert (ds / "big").read_bytes() == content


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_another_users_unreadable_leftover_is_left_when_the_trash_is_elsewhere(
    make_site: MakeSite,
) -> None:
    # A leftover of another user that this one may unlink but not read (mode 0600) cannot
    # be copied into a trash on another file system: it had failed every stage (exit 7).
    b, content, _ = await _big_pushed(make_site)
    state = _state_on_shm(b)
    try:
        shared = b.data / "ds"
        shared.mkdir()
        os.chown(shared, 65533, 65533)
        os.chmod(shared, 0o777)  # group-shared, no sticky bit
        leftover = shared / ".dm-0123456789abcdef.part"
        leftover.write_bytes(b"theirs\n")
        os.chown(leftover, 65534, 65534)
        os.chmod(leftover, 0o600)
        proc = cli_unprivileged(b, "stage", "/proj/ds")
        assert proc.returncode == 0, proc.stderr
        assert f"left '{leftover.name}'" in proc.stderr
        assert leftover.exists() and (shared / "big").read_bytes() == content
    finally:
        shutil.rmtree(state)


async def _big_pushed(make_site: MakeSite) -> tuple[SiteEnv, bytes, Entry]:
    """Site B (whose stages take files above 1 MiB the large-file way), and `/proj/ds`
    pushed at site A holding `big` (3 MiB of random bytes): its content and its entry."""
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ds").mkdir()
    content = os.urandom(3 << 20)
    (a.data / "ds" / "big").write_bytes(content)
    site_a = await a.open()
    try:
        await push(site_a, "/proj/ds")
        [entry] = [e for e in await _entries(site_a, "/proj/ds") if e.path == "big"]
    finally:
        await site_a.close()
    return b, content, entry


async def _entries(site: Site, dataset: str) -> list[Entry]:
    """The entries of the latest version of `dataset` at `site`."""
    doc = await site.repo.resolve(dataset, None)
    return list(site.repo.iter_cached(await site.repo.prefetch(doc), check=True))


# -- read-only directories after a failed stage with writer processes ---------------------------


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
@pytest.mark.parametrize("workers", [-1, 2])
async def test_a_stage_that_fills_the_disk_gives_a_read_only_directory_its_mode_back(
    make_site: MakeSite, workers: int
) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", write_workers=workers)
    (a.data / "ds").mkdir()
    for i in range(3000):  # enough files for writer processes (with workers)
        (a.data / "ds" / f"f{i:04d}").write_bytes(os.urandom(4096))
    assert a.cli("push", "/proj/ds").returncode == 0
    with _tmpfs(b.data, "2m"):
        root = b.data / "ds"
        root.mkdir()
        os.chmod(root, 0o555)  # the user's read-only dataset directory
        proc = cli_unprivileged(b, "stage", "/proj/ds")
        assert proc.returncode != 0
        assert "No space left on device" in proc.stderr, proc.stderr
        # Before (with workers): 0o755, for good. The worker that made it writable said so
        # only with a batch that succeeded; the dataset directory is no entry of the
        # version, so no later stage gives it a mode either.
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o555


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the fork server, and the writer processes below it)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_killed_writer_process_leaves_the_dataset_directory_its_mode(
    make_site: MakeSite,
) -> None:
    a = await make_site("site-a")
    b = await make_site("site-b", write_workers=2, batch_bytes=1 << 20)
    (a.data / "ds").mkdir()
    for i in range(20000):
        (a.data / "ds" / f"f{i:05d}").write_bytes(os.urandom(512))
    assert a.cli("push", "/proj/ds").returncode == 0
    root = b.data / "ds"
    root.mkdir()
    os.chmod(root, 0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    # As its owner: without root's override, a writer process makes the directory writable
    # to write into it.
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    command = [sys.executable, "-m", "datamover", "stage", "/proj/ds"]
    proc = subprocess.Popen(
        [*drop, *command, "--config", str(b.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # A writer process is a grandchild (below the fork server).
            children = _children(proc.pid)
            grandchildren = [p for p in _descendants(proc.pid) if p not in children]
            if grandchildren and any(root.glob("f0*")):
                os.kill(grandchildren[0], signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail("no writer process wrote into the tree")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 6, err  # a lost writer: worth another try
    # Before: 0o755, for good (the dataset directory is no entry of the version).
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o555


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines() if int(line.split()[1]) == pid]


# -- a directory or file of another user whose mode cannot be set -------------------------------


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_shared_directory_of_another_user_whose_mode_cannot_be_set_is_named(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    (b.data / "ds" / "sub").mkdir(parents=True)
    os.chown(b.data / "ds" / "sub", 65534, 65534)
    os.chmod(b.data / "ds" / "sub", 0o777)  # a colleague's, writable by all
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    # Before: "datamover: error: Operation not permitted", exit 1, naming nothing.
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.startswith("datamover: error: 'sub': operation not permitted")
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert (b.data / "ds" / "sub" / "f").read_text() == "data\n"


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_file_of_another_user_whose_mode_cannot_be_set_is_named(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    os.chmod(a.data / "ds" / "f", 0o640)
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    os.chown(b.data / "ds" / "f", 65534, 65534)
    os.chmod(b.data / "ds" / "f", 0o644)  # only its mode differs from the version's
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    # Before: "datamover: error: Operation not permitted", exit 1, naming nothing.
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.startswith("datamover: error: 'f': operation not permitted")


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_directory_of_another_user_as_the_version_has_it_is_left_be(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    os.chown(b.data / "ds" / "sub", 65534, 65534)  # its mode and mtime are the version's
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    # Before: refused (chmod and utime of a directory of another user, with nothing to change).
    assert proc.returncode == 0, proc.stderr


# -- trash moves deeper than PATH_MAX -------------------------------------------------------------


def _deep(root: Path, parts: list[str], leaf: str) -> None:
    """Make `root/parts.../leaf` (a file), one directory below the other (the path is longer
    than PATH_MAX: no call may take it whole)."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            inner = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_a_file_deeper_than_path_max_is_moved_to_the_trash(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    parts = ["d" * 30] * 200  # 6,200 bytes below the dataset's directory
    _deep(tmp_path / "ds", parts, "user.txt")
    rel = "/".join(parts) + "/user.txt"
    writer = fsops.TreeWriter(
        fsops.open_root(tmp_path, ("ds",)), tmp_path / "ds", tmp_path / "state" / "trash"
    )
    try:
        # Before: PermanentError "cannot move ... File name too long", a line of 12 KB.
        writer.trash(rel)
        writer.trash(rel)  # gone already: nothing to do
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert writer.trashed == [rel]
    fd = os.open(tmp_path / "state" / "trash", os.O_RDONLY)
    try:
        for part in parts:
            inner = os.open(part, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        assert [e.name for e in os.scandir(fd)] == ["user.txt"]
    finally:
        os.close(fd)


def test_a_deep_trash_move_that_fails_is_one_short_line(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    parts = ["d" * 30] * 200
    _deep(tmp_path / "ds", parts, "user.txt")
    rel = "/".join(parts) + "/user.txt"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trash").write_text("a file where the trash goes\n")
    writer = fsops.TreeWriter(
        fsops.open_root(tmp_path, ("ds",)), tmp_path / "ds", tmp_path / "state" / "trash"
    )
    try:
        with pytest.raises(PermanentError) as caught:
            writer.trash(rel)
    finally:
        writer.close()
        os.close(writer.root_fd)
    message = str(caught.value)
    assert message.startswith("cannot move 'dddd") and "..." in message
    assert len(message) < 600, message
    assert caught.value.paths == [rel]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_users_file_deeper_than_path_max_is_moved_aside_by_stage(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    parts = ["d" * 30] * 150
    (a.data / "ds").mkdir()
    _deep(a.data / "ds", parts, "out.txt")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    fd = os.open(b.data / "ds", os.O_RDONLY)
    try:
        for part in parts:
            inner = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("user.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)
    proc = b.cli("stage", "/proj/ds", "--delete", "--json")
    # Before: exit 7 "cannot move ... File name too long", on every run.
    assert proc.returncode == 0, proc.stderr[:2000]
    assert json.loads(proc.stdout)["trashed_count"] == 1


# -- manifest names that are stage's partial names ------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.FILE, Kind.DIR, Kind.SYMLINK])
def test_a_manifest_naming_an_entry_as_a_partial_file_is_malformed(kind: Kind) -> None:
    name = ".dm-0123456789abcdef.part"
    assert PARTIAL_RE.match(name)  # the name the walk and push skip
    target = "x" if kind == Kind.SYMLINK else None
    checker = EntryChecker()
    checker.check(Entry("d", Kind.DIR, 0o755, 0))
    with pytest.raises(Corrupt, match="partial files"):
        checker.check(Entry(f"d/{name}", kind, 0o644, 0, target=target))


def test_names_like_a_partial_file_but_not_one_are_accepted() -> None:
    checker = EntryChecker()
    for name in sorted([".dm-0123456789abcde.part", ".dm-0123456789ABCDEF.part", ".dm-x.part"]):
        assert not PARTIAL_RE.match(name)
        checker.check(Entry(name, Kind.FILE, 0o644, 0))


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_manifest_holding_a_partial_files_name_is_refused_at_stage(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    big = Entry("big", Kind.FILE, 0o644, 0, 3 << 20, chunks=())
    # A small file named as the large file's partial file (its name is predictable): stage
    # would take it for a resume of "big".
    planted = Entry(fsops.partial_name(big), Kind.FILE, 0o644, 0)
    await publish_manifest(a, "/proj/evil", [planted, Entry("z", Kind.FILE, 0o644, 0)])
    proc = b.cli("stage", "/proj/evil")
    # Before: staged, the file written under the partial name.
    assert proc.returncode == 5, proc.stderr
    assert "malformed" in proc.stderr and "partial files" in proc.stderr
    assert not (b.data / "evil").exists() or list((b.data / "evil").iterdir()) == []


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_file_that_may_not_be_replaced_is_named_with_the_hint_and_exit_7(
    make_site: MakeSite,
) -> None:
    # Before: "datamover: error: Operation not permitted: 't.txt'", exit 1 (which `verify`
    # gives a tree that differs), where the same refusal by its directory is exit 7 and
    # names the path with a hint.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "t.txt").write_text("one\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    (a.data / "ds" / "t.txt").write_text("two\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    target = b.data / "ds" / "t.txt"
    subprocess.run(["chattr", "+i", str(target)], check=True)
    try:
        proc = b.cli("stage", "/proj/ds")
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "t.txt': operation not permitted (check the owner and mode" in proc.stderr
    assert target.read_text() == "one\n"
    assert b.cli("stage", "/proj/ds").returncode == 0
    assert target.read_text() == "two\n"
