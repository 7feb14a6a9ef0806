"""Review of the push path: a dataset directory swapped during a push, entries that vanish
between a listing and their `lstat`, names that only look like stage's temporary files, and
files written just after the granule `readers.settled` waits for."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.datasets import list_datasets
from datamover.errors import Conflict, InvalidInput
from datamover.transfer import readers, walk
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite, cli_unprivileged

#: Stage's temporary name with a newline after it: `$` matched before that newline.
ODD_PART = ".dm-0123456789abcdef.part\n"


# -- a name is stage's temporary only if it is one exactly ----------------------------------


def test_a_partial_name_followed_by_a_newline_is_no_partial_name() -> None:
    assert walk.PARTIAL_RE.match(".dm-0123456789abcdef.part")
    assert not walk.PARTIAL_RE.match(ODD_PART)


async def test_push_refuses_a_partial_name_with_a_newline_instead_of_skipping_it(
    make_site: MakeSite,
) -> None:
    """A user's file so named was left out of the version without a word; its name holds a
    control character, which push refuses for any other name."""
    a = await make_site("site-a")
    (a.data / "x").mkdir()
    (a.data / "x" / "ok.txt").write_text("ok\n")
    (a.data / "x" / ODD_PART).write_text("user data\n")
    site = await a.open()
    try:
        with pytest.raises(InvalidInput, match="control character U\\+000A"):
            await push(site, "/proj/x")
    finally:
        await site.close()


async def test_stage_keeps_a_file_whose_name_is_a_partial_name_and_a_newline(
    make_site: MakeSite,
) -> None:
    """Stage removed such a file as a leftover of its own, even without `--delete`."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "x").mkdir()
    (a.data / "x" / "ok.txt").write_text("ok\n")
    (b.data / "x").mkdir()
    (b.data / "x" / ODD_PART).write_text("user data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/x")
        await stage(site_b, "/proj/x")
    finally:
        await site_a.close()
        await site_b.close()
    assert (b.data / "x" / ODD_PART).read_text() == "user data\n"
    assert (b.data / "x" / "ok.txt").read_text() == "ok\n"


# -- an entry that vanishes between its parent's listing and its lstat -----------------------


async def test_a_directory_renamed_before_its_lstat_fails_the_push(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk lists a directory, then `lstat`s its entries one by one as it reaches them:
    `z`, renamed to `y` while the walk was in `a`, was left out of the version (its files
    there all along, under another name). It is a conflict, as when it vanishes between its
    `lstat` and its own listing, and nothing is published."""
    a = await make_site("site-a")
    src = a.data / "run"
    for name in ("a", "z"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"f{i}").write_text(f"{name} {i}\n")
    real = walk.Walker._list

    def listing(self: walk.Walker, rel: str, unlock: bool = False) -> Any:
        if rel == "a":  # the root is listed, `z` not yet looked at
            (src / "z").rename(src / "y")
        return real(self, rel, unlock)

    monkeypatch.setattr(walk.Walker, "_list", listing)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match="'z' vanished while push read the tree"):
            await push(site, "/proj/run")
        assert await list_datasets(site, "/proj/run") == []
    finally:
        await site.close()


@pytest.mark.parametrize("strict", [True, False])
def test_a_symlink_removed_before_its_target_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    """Between a symlink's `lstat` and its `readlink`: a conflict for push (strict), left
    out as before for stage and verify, which walk a tree they may be changing."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("f\n")
    (tmp_path / "d" / "link").symlink_to("f")
    real = os.readlink

    def readlink(path: Any, *, dir_fd: int | None = None) -> str:
        os.unlink(path, dir_fd=dir_fd)
        return real(path, dir_fd=dir_fd)

    walker = walk.Walker(str(tmp_path), strict=strict)
    monkeypatch.setattr(walk.os, "readlink", readlink)
    try:
        if strict:
            with pytest.raises(Conflict, match="'d/link' vanished while push read the tree"):
                list(walker)
        else:
            assert [e.path for e in walker] == ["d", "d/f"]
    finally:
        walker.close()


# -- the dataset's directory swapped during the push -----------------------------------------


def _tree(root: Path, text: str) -> None:
    """`cfg` and `d/notes.txt` holding `text`, with an old mtime (read at once)."""
    (root / "d").mkdir(parents=True)
    for rel in ("cfg", "d/notes.txt"):
        (root / rel).write_text(f"{text} {rel}\n")
        os.utime(root / rel, (1e9, 1e9))


def _swap(root: Path, outside: Path) -> None:
    """What a user (or anyone who may write the namespace) does mid-push: the dataset's
    directory moved aside and a symlink to `outside` put in its place."""
    root.rename(root.with_name(root.name + ".old"))
    root.symlink_to(outside)


@pytest.mark.parametrize("size", [100, 3 << 20])  # read in a batch, or streamed as large
async def test_a_dataset_directory_swapped_for_a_link_during_the_reads_fails_the_push(
    make_site: MakeSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Readers reopened the dataset's directory by path, following a symlink, for every
    batch: the walk listed the tree, the bytes came from wherever the link led, and the
    version published files from outside the namespace. Every reopen now checks it is the
    directory the push started with; it is not, so nothing is published."""
    a = await make_site("site-a")
    root, outside = a.data / "ds", tmp_path / "outside"
    _tree(root, "mine")
    _tree(outside, "SECRET")
    (root / "big").write_bytes(b"m" * size)
    (outside / "big").write_bytes(b"S" * size)
    real = readers.open_file
    swapped: list[str] = []

    def open_file(tree: Any, rel: str, *args: Any) -> Any:
        if not swapped:
            swapped.append(rel)
            _swap(root, outside)
        return real(tree, rel, *args)

    monkeypatch.setattr(readers, "open_file", open_file)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match=r"directory .*ds' was replaced while push read it"):
            await push(site, "/proj/ds")
        assert swapped
        assert await list_datasets(site, "/proj/ds") == []
    finally:
        await site.close()


async def test_a_dataset_directory_swapped_before_the_walk_opens_it_fails_the_push(
    make_site: MakeSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the check that no component is a link and the walk's open of the directory,
    which followed one: the walk listed, and push published, the tree outside."""
    a = await make_site("site-a")
    root, outside = a.data / "ds", tmp_path / "outside"
    _tree(root, "mine")
    _tree(outside, "SECRET")
    real = walk.Walker._list

    def listing(self: walk.Walker, rel: str, unlock: bool = False) -> Any:
        if rel == "" and not root.is_symlink():
            _swap(root, outside)
        return real(self, rel, unlock)

    monkeypatch.setattr(walk.Walker, "_list", listing)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match="was replaced while push read it"):
            await push(site, "/proj/ds")
        assert await list_datasets(site, "/proj/ds") == []
    finally:
        await site.close()


@pytest.mark.parametrize("mode", [0o000, 0o300])  # nothing, or searchable but not readable
async def test_a_dataset_directory_push_may_not_read_is_named(
    make_site: MakeSite, mode: int
) -> None:
    """Opening the directory to hold it is the push's first read of it: one it may not
    read is the user's to fix (exit 2, naming it), as when the walk opened it first."""
    a = await make_site("site-a")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("f\n")
    (a.data / "ds").chmod(mode)
    try:
        proc = cli_unprivileged(a, "push", "/proj/ds")
    finally:
        (a.data / "ds").chmod(0o755)
    assert proc.returncode == InvalidInput.exit_code, proc.stderr
    assert f"cannot read '{a.data / 'ds'}': permission denied" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("swap", ["link", "directory", "removed"])
def test_a_reader_process_reads_only_the_directory_the_push_started_with(
    tmp_path: Path, swap: str
) -> None:
    """What a reader process gets is the directory's path below the configured one, and
    the identity it had: a link in its place, another directory there (no link at all) or
    none is the tree changed during the push."""
    base, outside = tmp_path / "ns", tmp_path / "outside"
    _tree(base / "ds", "mine")
    _tree(outside, "SECRET")
    tree, held = readers.anchor(str(base), ("ds",))
    try:
        assert tree.path == str(base / "ds")
        if swap == "link":
            _swap(base / "ds", outside)
        elif swap == "directory":
            (base / "ds").rename(base / "ds.old")
            _tree(base / "ds", "other")
        else:
            (base / "ds").rename(base / "ds.old")
        read = readers.read_batch(tree, ["cfg", "d/notes.txt"], ChunkerParams(), 3, 1 << 20)
        assert read == [
            readers.ReadProblem("moved", rel, tree.path) for rel in ("cfg", "d/notes.txt")
        ]
    finally:
        os.close(held)


def test_a_dataset_directory_reached_through_the_configured_link_is_read(
    tmp_path: Path,
) -> None:
    """The configured directory is trusted and may be a symlink, also when the dataset is
    that directory itself (no component below it)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("f\n")
    (tmp_path / "ns").symlink_to(tmp_path / "real")
    tree, held = readers.anchor(str(tmp_path / "ns"), ())
    try:
        read = readers.read_batch(tree, ["f"], ChunkerParams(), 3, 1 << 20)
        assert [r[2] for r in read] == [2]  # type: ignore[index]
    finally:
        os.close(held)


# -- a file is read only once its mtime's granule is over on the kernel's clock ----------------

SECOND = 1_000_000_000


class _Clock:
    """`readers.time` for a test: `time_ns` is `now`, and `sleep` moves it on (then runs
    `during`, once: what another process does to the file while the reader waits)."""

    def __init__(self, now: int, during: Callable[[int], None] | None = None) -> None:
        self.now = now
        self.during = during
        self.slept: list[int] = []

    def time_ns(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds * SECOND))
        self.now += round(seconds * SECOND)
        if self.during is not None:
            during, self.during = self.during, None
            during(self.now)


def _stamped(path: Path, data: bytes, mtime_ns: int) -> None:
    """Write `data` over `path` and give it `mtime_ns`, as a file system whose clock (the
    kernel's coarse one, on whole seconds) stamped the write."""
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _settled(path: Path) -> bool:
    """Open `path` and let `readers.settled` wait for it; True if it waited for nothing
    (returned the very `fstat` it was given)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        before = os.fstat(fd)
        return readers.settled(fd, before) is before
    finally:
        os.close(fd)


def test_a_file_is_read_a_clock_tick_after_its_granule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel stamps file times from a clock that lags `time_ns` by up to a tick: a
    write in the first milliseconds after the granule `settled` waited for still got the
    old second, same size, and every later push took the file as unchanged (reproduced on
    ext4 with 1 s timestamps). It now waits one `FINE_NS` more."""
    path = tmp_path / "f"
    _stamped(path, b"a" * 100, 50 * SECOND)
    clock = _Clock(50 * SECOND + SECOND // 2)
    monkeypatch.setattr(readers, "time", clock)
    _settled(path)
    assert clock.now >= 51 * SECOND + readers.FINE_NS
    assert clock.slept == [SECOND // 2 + readers.FINE_NS]


def test_an_mtime_a_little_ahead_of_this_clock_is_waited_out_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file server running ahead of this host stamps a same-size rewrite later in its
    second 51 with the same mtime; read at 50.9 s by this clock it would be published
    torn for good. Before, an mtime in the future was read at once."""
    path = tmp_path / "f"
    _stamped(path, b"a" * 100, 51 * SECOND)
    clock = _Clock(50 * SECOND + 9 * SECOND // 10)
    monkeypatch.setattr(readers, "time", clock)
    _settled(path)
    assert clock.slept == [SECOND // 10 + SECOND + readers.FINE_NS]
    # far ahead (a clock set wrong): waiting cannot help, it is read at once
    _stamped(path, b"a" * 100, 500 * SECOND)
    assert _settled(path)  # read at once
    assert len(clock.slept) == 1


def test_a_file_with_an_old_mtime_costs_no_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    _stamped(path, b"a" * 100, 50 * SECOND)
    clock = _Clock(51 * SECOND + readers.FINE_NS)  # granule and tick over
    monkeypatch.setattr(readers, "time", clock)
    assert _settled(path)  # read at once
    assert clock.slept == []


def test_a_file_written_while_its_reader_waits_is_waited_for_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write during the wait, in the next second: the fresh `fstat` has that second for
    mtime, within its granule of now. Read between it and the last `fstat`, a write later
    in that second went unseen, as before the wait. The fresh `fstat` is checked: the file
    is waited for again (reopened, as after a torn read), then read."""
    path = tmp_path / "f"
    _stamped(path, b"a" * 100, 50 * SECOND)
    clock = _Clock(50 * SECOND + SECOND // 2, lambda now: _stamped(path, b"b" * 100, 51 * SECOND))
    monkeypatch.setattr(readers, "time", clock)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(readers.Torn):
            readers.settled(fd, os.fstat(fd))
    finally:
        os.close(fd)

    _stamped(path, b"a" * 100, 50 * SECOND)
    clock = _Clock(50 * SECOND + SECOND // 2, lambda now: _stamped(path, b"b" * 100, 51 * SECOND))
    monkeypatch.setattr(readers, "time", clock)
    st = tmp_path.stat()
    tree = readers.TreeRoot(str(tmp_path), (), st.st_dev, st.st_ino)
    read = readers.read_whole(tree, "f", Chunker(ChunkerParams()), None)
    assert isinstance(read, readers.FileRead)
    assert (read.mtime_ns, bytes(read.chunks[0].stored)) == (51 * SECOND, b"b" * 100)
    assert clock.now >= 52 * SECOND + readers.FINE_NS  # the second of the write was over


async def test_a_symlink_replaced_by_a_file_during_the_walk_is_a_conflict(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replaced between its lstat and its readlink, the link's readlink failed with EINVAL,
    # which ended the push as a bare "Invalid argument".
    env = await make_site("site-a")
    (env.data / "ds").mkdir()
    (env.data / "ds" / "f").write_text("data\n")
    (env.data / "ds" / "link").symlink_to("f")
    real = os.readlink

    def readlink(path: Any, *, dir_fd: int | None = None) -> str:
        if path == "link":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", readlink)
    site = await env.open()
    try:
        with pytest.raises(Conflict, match="'link' vanished while push read the tree"):
            await push(site, "/proj/ds")
    finally:
        await site.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a directory of another user")
async def test_a_directory_above_the_dataset_needs_search_permission_only(
    make_site: MakeSite,
) -> None:
    # Every directory on the way was opened for reading: a 0o711 directory of another user
    # above the dataset (a shared group directory, a home) made every push fail with
    # "cannot read ...: permission denied".
    env = await make_site("site-a")
    (env.data / "home" / "ds").mkdir(parents=True)
    (env.data / "home" / "ds" / "f").write_text("data\n")
    os.chown(env.data / "home", 65534, 65534)
    os.chmod(env.data / "home", 0o711)
    r = cli_unprivileged(env, "push", "/proj/home/ds", "--json")
    assert r.returncode == 0, r.stderr
    assert '"files": 1' in r.stdout


async def test_a_pack_is_sealed_at_its_chunk_bound_whatever_its_size(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: sealed on bytes only, so a pack of tiny unique files could pass the 2^24
    # entries readers take (`db rebuild` then found it corrupt).
    from datamover.transfer import packer

    monkeypatch.setattr(packer, "MAX_PACK_CHUNKS", 10)
    a = await make_site("site-a")
    (a.data / "tiny").mkdir()
    for i in range(35):
        (a.data / "tiny" / f"f{i:02d}").write_text(f"tiny file {i}\n")
    site = await a.open()
    try:
        pushed = await push(site, "/proj/tiny")
        assert (pushed.new_chunks, pushed.packs) == (35, 4)
        counts = []
        async for info in site.store.list("packs/"):
            data = await site.store.get(info.key)
            counts.append(int.from_bytes(data[-16:-12], "little"))
        assert sorted(counts) == [5, 10, 10, 10]
    finally:
        await site.close()
