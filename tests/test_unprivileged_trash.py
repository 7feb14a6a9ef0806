"""Moves to a trash on another file system, and emptying it, as a user root's privileges do
not cover: read-only directories are unlocked as a rename's are, a failed copy leaves
nothing behind, a run that cannot be removed does not stop the others, and a state
directory this user may not write is exit 7. Each test failed on the code before its fix
(found running the CLI as an unprivileged user)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged

SQLITE_ONLY = pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)


def _state_on_shm(env: SiteEnv) -> Path:
    """Move `env`'s state directory to /dev/shm (another file system than its data)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(env.data).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    state = Path(tempfile.mkdtemp(dir=shm, prefix="dm-state-test-"))
    text = env.config_path.read_text()
    env.config_path.write_text(re.sub(r"(?m)^state_dir = .*$", f'state_dir = "{state}"', text))
    return state


async def _staged_with_state_on_shm(make_site: MakeSite) -> tuple[SiteEnv, Path]:
    """Site B with `/proj/ds` (one file, `keep`) pushed at site A and staged here by the
    CLI without root's privileges, its state on /dev/shm; and that state directory."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "keep").write_text("k\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    state = _state_on_shm(b)
    staged = cli_unprivileged(b, "stage", "/proj/ds")
    if staged.returncode != 0:
        shutil.rmtree(state)
    assert staged.returncode == 0, staged.stderr
    return b, state


def _unlock_all(top: Path) -> None:
    for p in [top, *top.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)


def _trashed(state: Path) -> list[str]:
    """Every path in the trash's runs, below the run directory."""
    found = []
    for run in sorted((state / "trash").iterdir()):
        found += [str(p.relative_to(run)) for p in sorted(run.rglob("*"))]
    return found


@SQLITE_ONLY
async def test_a_read_only_directory_is_unlocked_for_a_move_across(make_site: MakeSite) -> None:
    # Before: the copy was made, then the original could not be removed from its 0555
    # directory: exit 7 at every stage, each leaving one more copy in the trash.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "d").mkdir(parents=True)
    (a.data / "ds" / "d" / "f").write_text("version\n")
    os.chmod(a.data / "ds" / "d", 0o555)
    try:
        assert a.cli("push", "/proj/ds").returncode == 0
    finally:
        os.chmod(a.data / "ds" / "d", 0o755)
    state = _state_on_shm(b)
    try:
        assert cli_unprivileged(b, "stage", "/proj/ds").returncode == 0
        d = b.data / "ds" / "d"
        os.chmod(d, 0o755)
        (d / "f").write_text("the user's edit\n")
        os.chmod(d, 0o555)
        staged = cli_unprivileged(b, "stage", "/proj/ds", "--checksum")
        assert staged.returncode == 0, staged.stderr
        assert (d / "f").read_text() == "version\n"
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o555
        trashed = _trashed(state)
        assert [p for p in trashed if p.endswith("d/f")] == ["proj/ds/d/f"], trashed
        run = next((state / "trash").iterdir())
        assert (run / "proj" / "ds" / "d" / "f").read_text() == "the user's edit\n"
    finally:
        _unlock_all(b.data)
        shutil.rmtree(state)


@SQLITE_ONLY
async def test_a_read_only_extra_tree_is_moved_across_whole(make_site: MakeSite) -> None:
    # Before: "it changed while it was copied": its entries could not be removed from the
    # read-only directories; the whole original stayed and each stage added a copy.
    b, state = await _staged_with_state_on_shm(make_site)
    try:
        extra = b.data / "ds" / "e1"
        (extra / "sub").mkdir(parents=True)
        (extra / "sub" / "x").write_text("x\n")
        (extra / "y").write_text("y\n")
        os.chmod(extra / "sub", 0o555)
        os.chmod(extra, 0o555)
        staged = cli_unprivileged(b, "stage", "/proj/ds", "--delete")
        assert staged.returncode == 0, staged.stderr
        assert not extra.exists()
        run = next((state / "trash").iterdir())
        moved = run / "proj" / "ds" / "e1"
        assert (moved / "sub" / "x").read_text() == "x\n" and (moved / "y").read_text() == "y\n"
        assert stat.S_IMODE(os.stat(moved).st_mode) == 0o555
    finally:
        _unlock_all(b.data)
        _unlock_all(state)
        shutil.rmtree(state)


@SQLITE_ONLY
async def test_a_copy_that_fails_leaves_nothing_in_the_trash(make_site: MakeSite) -> None:
    # Before: `.dm-moving-<hex>/a_ro/one` stayed, the read-only copy not removable by
    # `shutil.rmtree`; the README says such an entry comes only from a killed stage.
    b, state = await _staged_with_state_on_shm(make_site)
    try:
        extra = b.data / "ds" / "e2"
        (extra / "a_ro").mkdir(parents=True)
        (extra / "a_ro" / "one").write_text("1\n")
        (extra / "z_locked").mkdir()
        os.chmod(extra / "a_ro", 0o500)
        os.chmod(extra / "z_locked", 0o000)
        staged = cli_unprivileged(b, "stage", "/proj/ds", "--delete")
        assert staged.returncode == 7, staged.stderr
        assert (extra / "a_ro" / "one").read_text() == "1\n"  # left in place
        assert not [p for p in _trashed(state) if ".dm-moving-" in p], _trashed(state)
    finally:
        _unlock_all(b.data)
        _unlock_all(state)
        shutil.rmtree(state)


@SQLITE_ONLY
async def test_a_run_that_cannot_be_removed_does_not_stop_the_others(
    make_site: MakeSite,
) -> None:
    # Before: the first error ended `trash --empty`, and a run left as `.emptying-...`
    # was tried first by every later one: no run was ever removed again.
    b = await make_site("site-b")
    trash = b.state / "trash"
    stuck = trash / "20201201T000000Z-aaaaaa" / "proj" / "ds" / "adir" / "b"
    stuck.mkdir(parents=True)
    (stuck / "f").write_text("another user's\n")
    nobody = pwd.getpwnam("nobody")
    os.chown(stuck, nobody.pw_uid, nobody.pw_gid)
    plain = trash / "20201202T000000Z-bbbbbb" / "proj" / "ds"
    plain.mkdir(parents=True)
    (plain / "mine").write_text("mine\n")
    for run in trash.iterdir():
        os.utime(run, (1_600_000_000, 1_600_000_000))
    for _ in range(2):
        emptied = cli_unprivileged(b, "trash", "--empty", "--older-than", "1")
        assert emptied.returncode == 7, emptied.stderr
        assert emptied.stderr.count("\n") == 1, emptied.stderr
        assert "20201201T000000Z-aaaaaa" in emptied.stderr, emptied.stderr
        assert str(trash) in emptied.stderr, emptied.stderr
        assert not (trash / "20201202T000000Z-bbbbbb").exists()
    # What could not be removed stays, under the name that marks it for the next `empty`.
    aside = trash / ".emptying-20201201T000000Z-aaaaaa" / "proj" / "ds" / "adir" / "b"
    assert (aside / "f").read_text() == "another user's\n"


@SQLITE_ONLY
async def test_a_state_directory_this_user_may_not_write_is_exit_7(make_site: MakeSite) -> None:
    # Before: "Permission denied: '.../manifests'", exit 1, which `verify` gives to a tree
    # that differs.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("f\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    assert b.cli("stage", "/proj/ds").returncode == 0
    shutil.rmtree(b.state / "manifests")  # made again by the next command that reads one
    os.chmod(b.state, 0o555)
    try:
        for command in ("verify", "stage"):
            r = cli_unprivileged(b, command, "/proj/ds")
            assert r.returncode == 7, (command, r.returncode, r.stderr)
            assert "Permission denied" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        os.chmod(b.state, 0o755)


@SQLITE_ONLY
async def test_another_users_entry_or_directory_is_refused_before_any_copy(
    make_site: MakeSite,
) -> None:
    # Before: the copy was published in the trash, then the original could not be removed
    # (an entry in another user's directory; another user's directory whole): "left in
    # place", yet each stage added one more copy to the trash.
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "shared").mkdir(parents=True)
    (a.data / "ds" / "shared" / "f").write_text("f\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    state = _state_on_shm(b)
    nobody = pwd.getpwnam("nobody")
    try:
        assert cli_unprivileged(b, "stage", "/proj/ds").returncode == 0
        shared = b.data / "ds" / "shared"
        (shared / "extra").write_text("in another user's directory\n")
        theirs = b.data / "ds" / "theirs"
        theirs.mkdir()
        (theirs / "g").write_text("another user's\n")
        for path in (shared, theirs):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        for _ in range(2):
            staged = cli_unprivileged(b, "stage", "/proj/ds", "--delete")
            assert staged.returncode == 7, staged.stderr
            assert staged.stderr.count("\n") == 1, staged.stderr
            assert (shared / "extra").read_text() == "in another user's directory\n"
            assert (theirs / "g").read_text() == "another user's\n"
            trash = state / "trash"
            held = [p for p in trash.rglob("*") if p.is_file()] if trash.exists() else []
            assert held == [], held
    finally:
        _unlock_all(b.data)
        shutil.rmtree(state)
