"""`datamover trash`: the runs stage moved users' changes into, listed, and emptied once
older than a number of days, read-only and deep trees included, never through a symlink,
never a run of the last day."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from datamover.errors import Busy, PermanentError
from datamover.metrics import Metrics
from datamover.scheduler.trash_retention import TrashRetention
from datamover.transfer import fsops, trash
from tests.fixtures_daemon import free_port, start_daemon
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


def _backdate(run: Path, stamp: str) -> None:
    """Give run directory `run` the mtime of `stamp`: its last move (`trash.runs`)."""
    when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    os.utime(run, (when, when))


def _age(env: SiteEnv, name: str, stamp: str) -> str:
    """Rename run `name` as if it had started, and last moved something, at `stamp`
    (`YYYYmmddTHHMMSSZ`)."""
    old = f"{stamp}-{name.rpartition('-')[2]}"
    root = trash.trash_root(env.state)
    (root / name).rename(root / old)
    _backdate(root / old, stamp)
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
    huge = ["--older-than", "1000000000"]  # was an OverflowError, exit 70, once a run existed
    for bad in (["--empty"], ["--empty", "--older-than", "0"], ["--empty", *huge], huge):
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
    _backdate(run, "20200101T000000Z")  # the entries made above were its last moves
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


@_SQLITE_ONLY
async def test_a_run_is_aged_by_its_last_move_not_by_its_start(make_site: MakeSite) -> None:
    # Before: aged by its name, the stage's start, what a stage running for two days moved
    # at its end was removed by the next hourly pass of a `trash_days = 1` daemon.
    b = await _trashed_once(make_site)
    [fresh] = _run_dirs(b)
    root = trash.trash_root(b.state)
    moved_at = (root / fresh).stat().st_mtime
    assert time.time() - moved_at < 60  # the stage set it as it moved the file
    started_long_ago = f"20200101T000000Z-{fresh.rpartition('-')[2]}"
    (root / fresh).rename(root / started_long_ago)  # keeps its mtime: the last move
    assert trash.empty(b.state, 1) == []
    assert _run_dirs(b) == [started_long_ago]
    [listed] = b.cli_json("trash")["runs"]
    assert listed["started"] == "2020-01-01T00:00:00Z"
    assert listed["last_moved"] == datetime.fromtimestamp(moved_at, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    _backdate(root / started_long_ago, "20200103T000000Z")  # moved into two days after
    [emptied] = trash.empty(b.state, 1)
    assert emptied.name == started_long_ago and _run_dirs(b) == []


def test_emptying_a_site_without_a_trash_removes_nothing(tmp_path: Path) -> None:
    assert trash.empty(tmp_path, 1) == []
    assert list(trash.runs(tmp_path)) == []


def _runs_in(state: Path, *stamps: str) -> list[str]:
    """Make trash runs that started at `stamps`, each holding one 3-byte file."""
    names = []
    for i, stamp in enumerate(stamps):
        name = f"{stamp}-{i:06x}"
        (trash.trash_root(state) / name / "proj").mkdir(parents=True)
        (trash.trash_root(state) / name / "proj" / "f").write_text("ab\n")
        _backdate(trash.trash_root(state) / name, stamp)
        names.append(name)
    return names


async def test_the_daemons_retention_empties_old_runs_only(tmp_path: Path) -> None:
    today = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    old, _, fresh = _runs_in(tmp_path, "20200101T000000Z", "20200102T000000Z", today)
    metrics = Metrics("site-b")
    retention = TrashRetention(tmp_path, 30, metrics)
    assert await retention.run_once() is False
    assert sorted(p.name for p in trash.trash_root(tmp_path).iterdir()) == [fresh]
    scraped = generate_latest(metrics.registry).decode()
    assert 'datamover_trash_runs_emptied_total{site="site-b"} 2.0' in scraped
    assert 'datamover_trash_emptied_bytes_total{site="site-b"} 6.0' in scraped
    assert old not in {p.name for p in trash.trash_root(tmp_path).iterdir()}


async def test_a_trash_the_daemon_cannot_empty_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trash.trash_root(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    trash.trash_root(tmp_path).write_text("a file where the trash directory should be\n")
    with caplog.at_level(logging.WARNING, logger="datamover.scheduler.trash_retention"):
        assert await TrashRetention(tmp_path, 1).run_once() is False
    [record] = caplog.records
    assert "cannot empty the trash" in record.getMessage() and record.exc_info is None


def test_a_second_emptying_while_one_runs_is_busy_and_removes_nothing(tmp_path: Path) -> None:
    # A daemon's retention and a cron job's `trash --empty` at once: the second renamed or
    # removed what the first had just taken, and failed on the missing name.
    [old] = _runs_in(tmp_path, "20200101T000000Z")
    holder = os.open(trash.trash_root(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # the other emptying, under way
        with pytest.raises(Busy, match="is being emptied by another process"):
            trash.empty(tmp_path, 1)
        assert (trash.trash_root(tmp_path) / old).is_dir()
    finally:
        os.close(holder)
    assert [r.name for r in trash.empty(tmp_path, 1)] == [old]


def test_a_stopped_emptying_returns_and_the_next_one_finishes(tmp_path: Path) -> None:
    first, second = _runs_in(tmp_path, "20200101T000000Z", "20200102T000000Z")
    stop = threading.Event()
    stop.set()
    assert trash.empty(tmp_path, 1, stop) == []  # stopped before its first entry
    assert sorted(p.name for p in trash.trash_root(tmp_path).iterdir()) == [
        ".emptying-" + first,  # the run it began with, no longer listed as one
        second,
    ]
    assert [r.name for r in trash.runs(tmp_path)] == [second]
    assert [r.name for r in trash.empty(tmp_path, 1)] == [second]
    assert list(trash.trash_root(tmp_path).iterdir()) == []


def test_a_trash_symlinked_to_another_disk_is_emptied_through_the_link(tmp_path: Path) -> None:
    # Stage writes through it; emptying refused it as "Not a directory", every hour.
    elsewhere = tmp_path / "bigger-disk" / "trash"
    elsewhere.mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    trash.trash_root(state).symlink_to(elsewhere)
    [old] = _runs_in(state, "20200101T000000Z")
    assert [r.name for r in trash.empty(state, 1)] == [old]
    assert list(elsewhere.iterdir()) == []
    assert trash.trash_root(state).is_symlink()


@_SQLITE_ONLY
async def test_a_daemon_with_trash_days_empties_old_runs_as_it_starts(
    make_site: MakeSite,
) -> None:
    env = await make_site("site-b", api={"listen": f"127.0.0.1:{free_port()}", "trash_days": 7})
    today = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    old, fresh = _runs_in(env.state, "20200101T000000Z", today)
    daemon = start_daemon(env)
    try:
        deadline = time.monotonic() + 30
        while (trash.trash_root(env.state) / old).exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert [p.name for p in trash.trash_root(env.state).iterdir()] == [fresh]
        assert daemon.stop() == 0
        assert "emptied 1 trash run older than 7 days: 1 file, 3 B" in daemon.log()
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()


@_SQLITE_ONLY
async def test_a_trash_that_is_no_directory_is_one_line(make_site: MakeSite) -> None:
    # Listing and emptying it were a traceback (NotADirectoryError).
    env = await make_site("site-b")
    trash.trash_root(env.state).parent.mkdir(parents=True, exist_ok=True)
    trash.trash_root(env.state).write_text("a file where the trash directory should be\n")
    for args in (["trash"], ["trash", "--empty", "--older-than", "1"]):
        proc = env.cli(*args)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
        assert "the trash" in proc.stderr and "Not a directory" in proc.stderr


@_SQLITE_ONLY
async def test_a_daemon_leaves_a_trash_being_emptied_to_that_process_and_stops_at_once(
    make_site: MakeSite,
) -> None:
    # Its emptying waited for the other's lock in a thread nothing could cancel: a SIGTERM
    # left it running (and answering "ready") until the other one ended.
    env = await make_site("site-b", api={"listen": f"127.0.0.1:{free_port()}", "trash_days": 7})
    [old] = _runs_in(env.state, "20200101T000000Z")
    holder = os.open(trash.trash_root(env.state), os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a cron job's `trash --empty`, under way
    daemon = start_daemon(env)
    try:
        deadline = time.monotonic() + 30
        while "is being emptied by another process" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            await asyncio.sleep(0.1)
        proc = env.cli("trash", "--empty", "--older-than", "1")
        assert proc.returncode == 4 and proc.stderr.count("\n") == 1, proc.stderr
        assert "is being emptied by another process" in proc.stderr
        started = time.monotonic()
        assert daemon.stop(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert (trash.trash_root(env.state) / old).is_dir()  # left to the other process
    finally:
        os.close(holder)
        if daemon.proc.poll() is None:
            daemon.proc.kill()


@_SQLITE_ONLY
async def test_one_file_and_one_entry_are_said_in_the_singular(make_site: MakeSite) -> None:
    # Before: "read 1 files", "fetched 1 files", "moved 1 locally changed entries".
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("version\n")
    pushed = a.cli("push", "/proj/ds")
    assert ": 1 file, " in pushed.stdout and "read 1 file, " in pushed.stdout, pushed.stdout
    staged = b.cli("stage", "/proj/ds")
    assert "ready: 1 file, " in staged.stdout and "fetched 1 file, " in staged.stdout
    assert "(1 file, " in b.cli("verify", "/proj/ds").stdout
    (b.data / "ds" / "f").write_text("mine\n")
    (a.data / "ds" / "f").write_text("version two\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    again = b.cli("stage", "/proj/ds")
    assert "moved 1 local entry (changed here, or not in the version) to " in again.stderr


def test_a_trash_linked_to_a_disk_not_mounted_is_named_not_empty(tmp_path: Path) -> None:
    # Before: "0 runs removed", as if the trash were empty.
    state = tmp_path / "state"
    state.mkdir()
    trash.trash_root(state).symlink_to(tmp_path / "unmounted" / "trash")
    for call in (lambda: list(trash.runs(state)), lambda: trash.empty(state, 1)):
        with pytest.raises(PermanentError, match=r"is a symbolic link to .*which does not exist"):
            call()


def test_a_run_emptied_while_the_trash_is_listed_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the listing failed, exit 1, "No such file or directory".
    first, second = _runs_in(tmp_path, "20200101T000000Z", "20200102T000000Z")
    measure = trash._measure

    def emptied_meanwhile(path: Path) -> tuple[int, int]:
        if path.name == first:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return measure(path)

    monkeypatch.setattr(trash, "_measure", emptied_meanwhile)
    assert [r.name for r in trash.runs(tmp_path)] == [second]


def test_every_move_into_the_trash_sets_its_runs_mtime(tmp_path: Path) -> None:
    # What a long stage moves late must age from then: each move refreshes the run's mtime.
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a").write_text("user's a\n")
    (tmp_path / "ds" / "sub").mkdir()
    (tmp_path / "ds" / "sub" / "b").write_text("user's b\n")
    run = trash.trash_root(tmp_path / "state") / "20200101T000000Z-abcdef"
    root_fd = fsops.open_root(tmp_path, ("ds",), create=False)
    writer = fsops.TreeWriter(root_fd, tmp_path / "ds", run / "proj" / "ds", trash_run=run)
    try:
        writer.trash("a")
        _backdate(run, "20200101T000000Z")
        writer.trash("sub/b")  # below a directory the run already has: only `sub` changes
    finally:
        writer.close()
        os.close(root_fd)
    assert (run / "proj" / "ds" / "sub" / "b").read_text() == "user's b\n"
    assert time.time() - run.stat().st_mtime < 60


async def test_the_daemon_counts_the_runs_it_emptied_past_one_it_could_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A run that cannot be removed ends `empty` with an error naming it; the runs it did
    # remove are still counted and logged (they had gone unreported).
    today = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    stuck, other, _ = _runs_in(tmp_path, "20200101T000000Z", "20200102T000000Z", today)
    real = trash.remove_tree

    def refusing(parent_fd: int, name: str, stop: object = None) -> tuple[int, int]:
        if name.endswith(stuck):
            raise PermissionError(13, "Permission denied", "b")
        return real(parent_fd, name, stop)  # type: ignore[arg-type]

    monkeypatch.setattr(trash, "remove_tree", refusing)
    metrics = Metrics("site-b")
    with caplog.at_level(logging.WARNING, logger="datamover.scheduler.trash_retention"):
        assert await TrashRetention(tmp_path, 30, metrics).run_once() is False
    [record] = caplog.records
    assert stuck in record.getMessage() and "1 other run(s) were emptied" in record.getMessage()
    scraped = generate_latest(metrics.registry).decode()
    assert 'datamover_trash_runs_emptied_total{site="site-b"} 1.0' in scraped
    assert other not in {p.name for p in trash.trash_root(tmp_path).iterdir()}
