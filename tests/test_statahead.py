"""Names looked up ahead of the walk where `lstat` is slow (`transfer.statahead`): the walk
gives the same entries, holds a bounded number of answers, closes nothing under a lookup,
and turns the lookups on only when most `lstat`s are slow.

A slow file system cannot be had in a test here (the benchmark mounts one through FUSE:
bench/README.md); the lookups are forced on instead, by taking every `lstat` for slow."""

from __future__ import annotations

import gc
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datamover.domain.manifest import Kind
from datamover.errors import Conflict
from datamover.transfer import statahead, walk
from datamover.transfer.plan import StagePlanner
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.statahead import Lookups
from datamover.transfer.verify import verify
from datamover.transfer.walk import LocalEntry, Walker
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree, snapshot

_WIDE = statahead.WINDOW * 3 + 5  # files in the wide directory: more than the window


@pytest.fixture
def always_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every walk looks names up ahead from its first `lstat` on."""
    monkeypatch.setattr(statahead, "SLOW_NS", -1)
    monkeypatch.setattr(statahead, "SAMPLE", 1)


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def _lookup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("datamover-lstat")]


def _tree(root: Path) -> None:
    """Nested directories, a directory wider than the window, symlinks, a FIFO and a
    name the strict walk leaves out (a stage's partial file)."""
    (root / "wide").mkdir(parents=True)
    for i in range(_WIDE):
        (root / "wide" / f"f{i:05d}").write_bytes(b"x" * (i % 7))
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep").write_bytes(b"deep")
    (root / "a" / "file").write_bytes(b"file")
    (root / "a" / "link").symlink_to("file")
    (root / "a" / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "a" / "fifo")
    (root / "a" / ".dm-0123456789abcdef.part").write_bytes(b"partial")
    (root / "z").write_bytes(b"z")


def _walk(root: Path, strict: bool, stat_files: bool, threads: int) -> list[LocalEntry]:
    """Every entry of a walk; a strict walk without stats fills each file, as push does."""
    walker = Walker(str(root), strict=strict, stat_files=stat_files, lookup_threads=threads)
    out: list[LocalEntry] = []
    try:
        for entry in walker:
            if entry.kind is not None and entry.mode == -1:
                assert walker.fill(entry)
            out.append(entry)
    finally:
        walker.close()
    return out


@pytest.mark.parametrize(("strict", "stat_files"), [(True, False), (False, True), (True, True)])
def test_the_walk_gives_the_same_entries_with_names_looked_up_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strict: bool, stat_files: bool
) -> None:
    _tree(tmp_path)
    serial = _walk(tmp_path, strict, stat_files, threads=1)
    fds = _open_fds()
    monkeypatch.setattr(statahead, "SLOW_NS", -1)
    monkeypatch.setattr(statahead, "SAMPLE", 1)
    ahead = _walk(tmp_path, strict, stat_files, threads=8)
    assert ahead == serial
    assert len(serial) == _WIDE + (9 if strict else 11)  # the FIFO and partial file: not strict
    # Every directory descriptor is closed and every lookup thread is gone once it ends.
    assert _open_fds() == fds
    assert _lookup_threads() == []


def test_a_walk_left_early_stops_its_lookups(tmp_path: Path, always_slow: None) -> None:
    _tree(tmp_path)
    fds = _open_fds()
    walker = Walker(str(tmp_path), strict=False, lookup_threads=8)
    for entry in walker:
        if entry.path == "wide/f00010":
            break
    assert _lookup_threads()  # on, and looking up the rest of `wide`
    walker.close()
    assert _lookup_threads() == []
    assert _open_fds() == fds


def test_the_answers_held_stay_within_the_window(tmp_path: Path) -> None:
    for i in range(_WIDE):
        (tmp_path / f"n{i:05d}").touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lookups = Lookups(threads=4, slow_ns=-1)
    try:
        for _ in range(statahead.SAMPLE):
            lookups.stat(".", fd)
        assert lookups.on
        names = sorted((p.name for p in tmp_path.iterdir()), reverse=True)  # popped from the end
        ahead = lookups.ahead(fd, names, lambda name: True, lambda name: False)
        seen = 0
        while names:
            name = names.pop()
            ahead.advance()
            assert len(ahead._answers) <= statahead.WINDOW + 1  # and the name the walk is at
            st = ahead.stat(name)
            assert st.st_ino == os.lstat(tmp_path / name).st_ino
            seen += 1
        assert seen == _WIDE and not ahead._answers
        ahead.close()
    finally:
        lookups.close()
        os.close(fd)


def test_an_error_answer_is_looked_up_again(tmp_path: Path) -> None:
    # Asked ahead, "late" was not there yet (a stage may create or unlock things as it
    # walks): the walk's own look finds it. "gone" is missing both times: its error.
    (tmp_path / "early").touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    pool = Lookups(threads=2, slow_ns=-1)
    try:
        for _ in range(statahead.SAMPLE):
            pool.stat(".", fd)
        names = ["late", "gone", "early"]  # walk order: early, gone, late
        ahead = pool.ahead(fd, names, lambda name: True, lambda name: False)
        assert names.pop() == "early"
        ahead.advance()
        for future in set(ahead._answers.values()):
            future.result()  # the lookups of "gone" and "late" are done: both missing
        (tmp_path / "late").write_bytes(b"123")
        assert ahead.stat("early").st_size == 0
        assert names.pop() == "gone"
        with pytest.raises(FileNotFoundError):
            ahead.stat("gone")
        assert names.pop() == "late"
        assert ahead.stat("late").st_size == 3
        ahead.close()
    finally:
        pool.close()
        os.close(fd)


def test_close_waits_for_the_lookups_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(64):
        (tmp_path / f"n{i:02d}").touch()
    calls: list[str] = []
    real = statahead._lstat

    def slow_lstat(name: str, fd: int) -> os.stat_result:
        time.sleep(0.005)
        calls.append(name)
        return real(name, fd)

    monkeypatch.setattr(statahead, "_lstat", slow_lstat)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    pool = Lookups(threads=4, slow_ns=-1)
    try:
        for _ in range(statahead.SAMPLE):
            pool.stat(".", fd)
        calls.clear()
        names = sorted((p.name for p in tmp_path.iterdir()), reverse=True)
        ahead = pool.ahead(fd, names, lambda name: True, lambda name: False)
        names.pop()
        ahead.advance()
        ahead.close()
        done = len(calls)
        time.sleep(0.1)
        assert len(calls) == done  # nothing looks anything up in `fd` any more
        assert done < 64  # the pieces not started were cancelled
    finally:
        pool.close()
        os.close(fd)


def _slow_for(monkeypatch: pytest.MonkeyPatch, slow: Callable[[int], bool]) -> None:
    """`lstat` number n (from 0) takes 2 ms where `slow(n)`."""
    real = statahead._lstat
    count = [0]

    def lstat(name: str, fd: int) -> os.stat_result:
        n, count[0] = count[0], count[0] + 1
        if slow(n):
            time.sleep(0.002)
        return real(name, fd)

    monkeypatch.setattr(statahead, "_lstat", lstat)


@pytest.mark.parametrize(
    ("slow", "on"),
    [
        (lambda n: True, True),
        (lambda n: n % 2 == 0, False),  # half: not most
        (lambda n: n % 4 != 0, True),  # three in four
        (lambda n: n == 5, False),  # one (as an `lstat` waiting for the GIL)
        (lambda n: False, False),
    ],
)
def test_lookups_start_once_most_lstats_are_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: Callable[[int], bool], on: bool
) -> None:
    _slow_for(monkeypatch, slow)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lookups = Lookups(threads=4, slow_ns=1_000_000)
    try:
        for _ in range(statahead.SAMPLE - 1):
            lookups.stat(".", fd)
        assert not lookups.on  # nothing decided before a whole sample
        lookups.stat(".", fd)
        assert lookups.on is on
    finally:
        lookups.close()
        os.close(fd)
    assert _lookup_threads() == []


def test_a_walk_that_turns_slow_starts_lookups_at_its_next_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fast at first (a local tree), slow from the second sample on (a mount below it).
    _slow_for(monkeypatch, lambda n: n >= statahead.SAMPLE)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lookups = Lookups(threads=4, slow_ns=1_000_000)
    try:
        for _ in range(2 * statahead.SAMPLE + statahead.UNTIMED - 1):
            lookups.stat(".", fd)
        assert not lookups.on  # the lstats after a fast sample are not timed
        lookups.stat(".", fd)
        assert lookups.on
    finally:
        lookups.close()
        os.close(fd)


def test_one_lookup_thread_is_never_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _slow_for(monkeypatch, lambda n: True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    lookups = Lookups(threads=1, slow_ns=1_000_000)
    try:
        for _ in range(2 * statahead.SAMPLE):
            lookups.stat(".", fd)
        assert not lookups.on
    finally:
        lookups.close()
        os.close(fd)


@pytest.mark.parametrize("strict", [True, False])
def test_a_name_gone_when_looked_up_ahead_is_gone_for_the_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None, strict: bool
) -> None:
    # "d/b" is removed just before its lookup ahead (after the listing): the walk's own
    # look finds it gone too. A push's walk refuses (the version would lack a file the tree
    # had when it was listed); stage's and verify's leave it out.
    (tmp_path / "d").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "d" / name).touch()
    real = statahead._look_up

    def look_up(fd: int, names: list[str]) -> dict[str, statahead.Answer]:
        if "b" in names:
            os.unlink(tmp_path / "d" / "b")
        return real(fd, names)

    monkeypatch.setattr(statahead, "_look_up", look_up)
    walker = Walker(str(tmp_path), strict=strict, stat_files=True, lookup_threads=4)
    try:
        if strict:
            with pytest.raises(Conflict, match="'d/b' vanished"):
                list(walker)
        else:
            assert [e.path for e in walker] == ["d", "d/a", "d/c"]
    finally:
        walker.close()


def test_a_directory_unlocked_by_the_walk_is_looked_up_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # Stage and verify give a 0o600 directory (a version's mode) its owner's search bit to
    # look at its entries. Every answer asked ahead before that was EACCES (as for a user
    # who is not root; root is emulated here): each is looked up again, so every entry is
    # found, and the directory gets its mode back as the walk leaves it.
    (tmp_path / "d").mkdir()
    names = [f"n{i:03d}" for i in range(40)]
    for name in names:
        (tmp_path / "d" / name).write_bytes(b"12")
    os.chmod(tmp_path / "d", 0o600)
    searchable = lambda: os.stat(tmp_path / "d").st_mode & stat.S_IXUSR  # noqa: E731
    monkeypatch.setattr(os, "stat", _search_checked(os.stat, tmp_path / "d", searchable))
    walker = Walker(str(tmp_path), strict=False, lookup_threads=4)
    try:
        assert next(walker).path == "d"
        walker.allow_unlock()
        rest = list(walker)
    finally:
        walker.close()
    assert [e.path for e in rest] == [f"d/{n}" for n in names]
    assert all(e.size == 2 for e in rest)
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o600


def _search_checked(
    real: Callable[..., os.stat_result], directory: Path, searchable: Callable[[], int]
) -> Callable[..., os.stat_result]:
    """`os.stat` refusing, as for a user who is not root, a name relative to `directory`
    while it has no search bit (the walk's own look after it unlocked it goes through)."""
    ino = real(directory).st_ino

    def checked(path: object, *args: object, **kwargs: object) -> os.stat_result:
        fd = kwargs.get("dir_fd")
        if isinstance(fd, int) and real(fd).st_ino == ino and not searchable():
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    return checked


async def test_push_stage_and_verify_with_names_looked_up_ahead(
    make_site: MakeSite, always_slow: None
) -> None:
    a = await make_site("site-a", segment_entries=64)
    b = await make_site("site-b", segment_entries=64)
    src = a.data / "run"
    make_tree(src, files=300)
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, "/proj/run")
        again = await push(site_a, "/proj/run")
        assert again.unchanged and again.version == first.version
        (src / sorted(p.name for p in src.iterdir() if p.is_file())[0]).write_bytes(b"new")
        changed = await push(site_a, "/proj/run")
        assert not changed.unchanged and changed.version != first.version
        await stage(site_b, "/proj/run")
        assert snapshot(b.data / "run") == snapshot(src)
        result = await verify(site_b, "/proj/run")
        assert result.ok
        assert _lookup_threads() == []
    finally:
        await site_a.close()
        await site_b.close()


def _run_tree(root: Path) -> None:
    """A file, a subdirectory, then a file after it: the walk is below `a_dir` a while
    before it gets to `b_file`."""
    root.mkdir()
    (root / "a0").write_bytes(b"a0")
    (root / "a_dir").mkdir()
    for i in range(20):
        (root / "a_dir" / f"f{i:02d}").write_bytes(b"f")
    (root / "b_file").write_bytes(b"old")
    (root / "c").write_bytes(b"c")


def _while_below_a_dir(monkeypatch: pytest.MonkeyPatch, act: Callable[[], None]) -> None:
    """Run `act` when push's walk, below `a_dir`, compares its eleventh file."""
    real = Walker.fill

    def fill(self: Walker, entry: LocalEntry) -> bool:
        if entry.path == "a_dir/f10":
            act()
        return real(self, entry)

    monkeypatch.setattr(Walker, "fill", fill)


async def test_a_file_changed_while_the_walk_is_below_a_directory_before_it_is_pushed(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # Answers asked for before the walk went down into `a_dir` would be as old as the
    # subtree's walk when taken (hours on a big one): `b_file`, rewritten meanwhile with
    # the same size, would be taken for unchanged by its old mtime. The parent's lookups
    # stop at the directory and begin again as the walk comes back up.
    a = await make_site("site-a", segment_entries=64)
    b = await make_site("site-b", segment_entries=64)
    src = a.data / "run"
    _run_tree(src)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/run")
        _while_below_a_dir(monkeypatch, lambda: (src / "b_file").write_bytes(b"new"))
        again = await push(site_a, "/proj/run")
        assert not again.unchanged
        await stage(site_b, "/proj/run")
        assert (b.data / "run" / "b_file").read_bytes() == b"new"
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_file_removed_while_the_walk_is_below_a_directory_is_gone_for_the_push(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    a = await make_site("site-a", segment_entries=64)
    src = a.data / "run"
    _run_tree(src)
    site_a = await a.open()
    try:
        first = await push(site_a, "/proj/run")
        (src / "c").write_bytes(b"cc")  # so that a push would publish
        _while_below_a_dir(monkeypatch, lambda: (src / "b_file").unlink())
        with pytest.raises(Conflict, match="'b_file' vanished"):
            await push(site_a, "/proj/run")
        assert await site_a.repo.latest("/proj/run") == first.version
    finally:
        await site_a.close()


def test_lookups_stop_at_the_next_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "m").mkdir()
    for name in ("a/1", "a/2", "m/1", "m/2", "b", "c", "x", "y", "z"):
        (tmp_path / name).write_bytes(b"1")
    asked: list[str] = []
    real = statahead._look_up

    def look_up(fd: int, names: list[str]) -> dict[str, statahead.Answer]:
        asked.extend(names)
        return real(fd, names)

    monkeypatch.setattr(statahead, "_look_up", look_up)
    for strict, stat_files in ((True, False), (False, True)):
        asked.clear()
        walker = Walker(str(tmp_path), strict=strict, stat_files=stat_files, lookup_threads=4)
        try:
            seen = {}
            for entry in walker:
                if entry.kind == Kind.FILE and entry.mode == -1:
                    assert walker.fill(entry)
                seen[entry.path] = set(asked)
        finally:
            walker.close()
        # Below `m`, none of the root's names after it had been asked for.
        assert not {"x", "y", "z"} & seen["m/2"], (strict, seen["m/2"])
        assert {"y", "z"} <= set(asked)  # asked for again once back (`x`: by the walk)


def test_answers_of_files_the_push_never_compares_are_dropped(
    tmp_path: Path, always_slow: None
) -> None:
    # A re-push compares (`fill`s) only files its parent version had; the answers of the
    # others are dropped as the walk passes them, not held to the directory's end.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"a")
    for i in range(3 * statahead.WINDOW):
        (tmp_path / "d" / f"new{i:05d}").touch()
    walker = Walker(str(tmp_path), strict=True, stat_files=False, lookup_threads=4)
    held = 0
    try:
        for entry in walker:
            if entry.path == "d/a":
                assert walker.fill(entry)
            for ahead in walker._ahead.values():
                held = max(held, len(ahead._answers))
    finally:
        walker.close()
    assert 0 < held <= statahead.WINDOW + 1


def test_a_walk_closed_on_one_of_its_lookup_threads_does_not_wait_for_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # A walk left without `close` is closed by the garbage collector, which may run on
    # one of the walk's own lookup threads: waiting there for its lookups waited for
    # itself, for ever (and the interpreter for that thread at exit).
    (tmp_path / "wide").mkdir()
    for i in range(200):
        (tmp_path / "wide" / f"f{i:05d}").touch()
    walker = Walker(str(tmp_path), strict=False, lookup_threads=2)
    closing = threading.Event()
    closed = threading.Event()
    real = statahead._lstat

    def lstat(name: str, fd: int) -> os.stat_result:
        if name == "f00100" and closing.wait(5):  # a lookup still running
            walker.__del__()  # as the collector would, here
            closed.set()
        return real(name, fd)

    monkeypatch.setattr(statahead, "_lstat", lstat)
    for entry in walker:
        if entry.path == "wide/f00010":
            break
    closing.set()
    assert closed.wait(5)
    deadline = time.monotonic() + 5
    while _lookup_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _lookup_threads() == []


async def test_a_failed_stage_stops_its_walk(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # The walk of a stage that failed half-way was never closed: its lookup threads and
    # its directory descriptors stayed until a garbage collection (rare in a daemon).
    a = await make_site("site-a", segment_entries=64)
    b = await make_site("site-b", segment_entries=64)
    src = a.data / "run"
    (src / "wide").mkdir(parents=True)
    for i in range(600):
        (src / "wide" / f"f{i:05d}").write_bytes(b"x")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/run")
        await stage(site_b, "/proj/run")
        real = StagePlanner._both

        def both(self: StagePlanner, local: Any, entry: Any, key: Any) -> Any:
            if local.path == "wide/f00300":
                raise RuntimeError("a failure half-way")
            return real(self, local, entry, key)

        monkeypatch.setattr(StagePlanner, "_both", both)
        gc.disable()  # what a daemon's rare collections leave
        try:
            with pytest.raises(RuntimeError, match="half-way"):
                await stage(site_b, "/proj/run")
            threads = _lookup_threads()
            held = _held_below(b.data)
        finally:
            gc.enable()
        assert threads == [] and held == []
    finally:
        await site_a.close()
        await site_b.close()


def _held_below(root: Path) -> list[str]:
    """What this process's descriptors below `root` lead to."""
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root)):
            held.append(target)
    return held


def _asked_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path looked up ahead, in the order asked (recorded as `_look_up` starts)."""
    asked: list[str] = []
    real = statahead._look_up

    def look_up(fd: int, names: list[str]) -> dict[str, statahead.Answer]:
        where = os.readlink(f"/proc/self/fd/{fd}")
        asked.extend(f"{where}/{name}" for name in names)
        return real(fd, names)

    monkeypatch.setattr(statahead, "_look_up", look_up)
    return asked


@pytest.mark.parametrize(("strict", "stat_files"), [(True, False), (False, True)])
def test_nothing_past_a_directory_is_asked_for_before_the_walk_has_been_through_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    always_slow: None,
    strict: bool,
    stat_files: bool,
) -> None:
    # Directories first in a listing, two in a row, last, and a listing begun at one: each
    # time the walk goes down, none of the names after that directory was asked for yet.
    (tmp_path / "0").write_bytes(b"1")  # the lookups are on from the first lstat
    for d in ("p/a", "p/b", "q/x/deep", "r"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "1").write_bytes(b"1")
    for f in ("p/f1", "p/f2", "p/f3", "q/y", "q/z", "s", "t"):
        (tmp_path / f).write_bytes(b"1")
    asked = _asked_paths(monkeypatch)
    walker = Walker(str(tmp_path), strict=strict, stat_files=stat_files, lookup_threads=4)
    entries: list[LocalEntry] = []
    asked_then: dict[str, set[str]] = {}
    try:
        for entry in walker:
            if entry.kind == Kind.FILE and entry.mode == -1:
                assert walker.fill(entry)
            entries.append(entry)
            asked_then[entry.path] = set(asked)
    finally:
        walker.close()
    paths = [e.path for e in entries]
    for i, entry in enumerate(entries):
        if entry.kind != Kind.DIR:
            continue
        parent = entry.path.rpartition("/")[0]
        later = {
            str(tmp_path / p)
            for p in paths[i + 1 :]
            if p.rpartition("/")[0] == parent and not p.startswith(entry.path + "/")
        }
        first_below = next(p for p in paths[i + 1 :] if p.startswith(entry.path + "/"))
        assert not later & asked_then[first_below], (entry.path, later & asked_then[first_below])


def test_listings_without_file_types_are_not_typed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where a listing leaves the kinds out, each is an lstat on the walk's own thread:
    # reading them where lookups stop (at directories) cost stage's and verify's walks an
    # lstat a name, serially, as without lookups. The first `PROBE` names show it.
    monkeypatch.setattr(statahead, "SLOW_NS", 100_000)
    (tmp_path / "d").mkdir()
    for i in range(1000):
        (tmp_path / "d" / f"f{i:05d}").touch()
    walk_thread = threading.get_ident()
    serial = [0]
    real = statahead._lstat

    def lstat(name: str, fd: int) -> os.stat_result:
        serial[0] += threading.get_ident() == walk_thread
        time.sleep(0.0005)  # over SLOW_NS
        return real(name, fd)

    monkeypatch.setattr(statahead, "_lstat", lstat)
    monkeypatch.setattr(walk.os, "scandir", _untyped_scandir(os.scandir))
    walker = Walker(str(tmp_path), strict=False, lookup_threads=8)
    try:
        assert sum(1 for _ in walker) == 1001
    finally:
        walker.close()
    # The walk's own: the sample that turned the lookups on, the probe, and a few answers
    # asked for after the walk had passed the lookups' window.
    assert serial[0] < statahead.SAMPLE + walk.PROBE + 40, serial[0]


def _untyped_scandir(real: Callable[..., Any]) -> Callable[..., Any]:
    """`os.scandir` of a file system whose listings carry no types: each `DirEntry.is_*`
    asks `statahead._lstat` (the emulated slow `lstat`)."""

    class Entry:
        def __init__(self, name: str, fd: int) -> None:
            self.name, self._fd = name, fd

        def _mode(self) -> int:
            return statahead._lstat(self.name, self._fd).st_mode

        def is_file(self, follow_symlinks: bool = True) -> bool:
            return stat.S_ISREG(self._mode())

        def is_dir(self, follow_symlinks: bool = True) -> bool:
            return stat.S_ISDIR(self._mode())

        def is_symlink(self) -> bool:
            return stat.S_ISLNK(self._mode())

    class Listing:
        def __init__(self, fd: int) -> None:
            self._it, self._fd = real(fd), fd

        def __enter__(self) -> Iterator[Entry]:
            return (Entry(e.name, self._fd) for e in self._it)

        def __exit__(self, *exc: object) -> None:
            self._it.close()

    return Listing


def test_lookups_of_names_passed_unlooked_at_are_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # A re-push passes its new files without a look; where the lookups are slower than
    # that pace, those not started are cancelled, not left queued before what the walk
    # needs next.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"a")
    for i in range(3000):
        (tmp_path / "d" / f"new{i:05d}").touch()
    (tmp_path / "d" / "zdir").mkdir()
    real = statahead._lstat
    looked_up = [0]

    def lstat(name: str, fd: int) -> os.stat_result:
        time.sleep(0.0005)
        looked_up[0] += name.startswith("new")
        return real(name, fd)

    monkeypatch.setattr(statahead, "_lstat", lstat)
    walker = Walker(str(tmp_path), strict=True, stat_files=False, lookup_threads=8)
    pending = 0
    try:
        for entry in walker:
            if entry.path == "d/a":
                assert walker.fill(entry)
            for ahead in walker._ahead.values():
                pending = max(pending, sum(not f.done() for _, f in ahead._futures))
    finally:
        walker.close()
    assert pending <= statahead.WINDOW // statahead.PIECE + 8 + 1  # the window, the running
    assert looked_up[0] < 1500


def test_one_slow_entry_does_not_stop_a_walk_typing_its_listings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, always_slow: None
) -> None:
    # A kind read that waited for the GIL (5 ms) among the probe's, where the listing has
    # the kinds: the walk goes on typing its listings, and its lookups stop at directories.
    (tmp_path / "0").write_bytes(b"1")
    for i in range(40):
        (tmp_path / "p" / f"d{i:02d}").mkdir(parents=True)
    real = walk._kind
    calls = [0]

    def kind(item: os.DirEntry[str]) -> str | None:
        calls[0] += 1
        if calls[0] == 3:
            time.sleep(0.005)
        return real(item)

    monkeypatch.setattr(walk, "_kind", kind)
    walker = Walker(str(tmp_path), strict=False, lookup_threads=4)
    try:
        assert sum(1 for _ in walker) == 42
        assert walker._typed_listings
    finally:
        walker.close()
