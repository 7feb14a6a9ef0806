"""Review of listing, the daemon loop, metrics, logs, the demo and push's walk and readers:
each test shows one defect that was fixed (it failed before the fix). Catalog tests run on
SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.datasets import list_datasets
from datamover.domain.manifest import Kind
from datamover.errors import Conflict, InvalidInput, PermanentError
from datamover.repo.layout import version_key
from datamover.site import Site, make_store
from datamover.storage.base import ObjectInfo, Store
from datamover.transfer import readers
from datamover.transfer.push import push
from datamover.transfer.readers import ReadProblem
from datamover.transfer.walk import LocalEntry, Walker
from tests.fixtures_sites import MakeSite, cli_unprivileged
from tests.treegen import make_tree

# -- `datamover ls` ----------------------------------------------------------------------


async def test_two_datasets_with_one_version_id_each_list_their_own_document(
    make_site: MakeSite,
) -> None:
    # The document cache was keyed by version id alone: a dataset holding a version id that
    # another dataset has too (a document copied or crafted in the shared bucket) was listed
    # with the other dataset's document: its manifest, totals and dataset path.
    a = await make_site("a")
    make_tree(a.data / "x", files=5)
    make_tree(a.data / "y", files=9)
    site = await a.open()
    try:
        x = await push(site, "/proj/x")
        doc = await site.repo.read_version("/proj/x", x.version)
        y = await push(site, "/proj/y")
        other = await site.repo.read_version("/proj/y", y.version)
        twin = dataclasses.replace(
            other, version=doc.version, parent=None, created=doc.created, site=doc.site
        )
        await site.repo.publish(twin)  # /proj/y now also holds x's version id
        for _ in range(2):  # first with x's document cached by push, then with both cached
            listed = {i.path: i.versions for i in await list_datasets(site)}
            assert [v.dataset for v in listed["/proj/x"]] == ["/proj/x"]
            assert listed["/proj/x"][0] == doc
            assert [v.dataset for v in listed["/proj/y"]] == ["/proj/y"] * 2
            assert twin in listed["/proj/y"]
    finally:
        await site.close()


class _RemovedAfterListing:
    """The real store, where the version documents `keys` are removed right after they are
    listed: what an operator's `aws s3 rm` (or a future GC) does while `ls` runs."""

    def __init__(self, inner: Store, keys: set[str]) -> None:
        self.inner = inner
        self.keys = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix, start_after):
            yield info
            if info.key in self.keys:
                await self.inner.delete(info.key)


async def test_ls_survives_a_version_removed_while_it_lists(make_site: MakeSite) -> None:
    # A version listed and then removed before its document was read made the whole `ls`
    # fail with "dataset '/proj/x' has no version ...", for every dataset under the prefix.
    a = await make_site("a")
    make_tree(a.data / "x", files=3)
    make_tree(a.data / "y", files=3)
    site = await a.open()
    try:
        x = await push(site, "/proj/x")
        y = await push(site, "/proj/y")
    finally:
        await site.close()
    b = await make_site("b")  # a site that has cached no document yet
    store = _RemovedAfterListing(make_store(b.config), {version_key("/proj/x", x.version)})
    site = await Site.open(b.config, store=store)  # type: ignore[arg-type]
    try:
        listed = await list_datasets(site)
        assert [(i.path, [v.version for v in i.versions]) for i in listed] == [
            ("/proj/y", [y.version])
        ]
    finally:
        await site.close()


# -- push: a directory replaced by a symlink while the walk runs -------------------------


def _swap_for_link(directory: Path, target: Path, aside: Path) -> None:
    """Move `directory` out of the tree and put a symlink to `target` in its place."""
    directory.rename(aside)
    directory.symlink_to(target)


def _outside(tmp_path: Path, names: list[str]) -> Path:
    """A directory outside every dataset holding files named as the tree's: a secret each."""
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in names:
        (outside / name).write_text("SECRET outside the tree\n")
    return outside


def test_the_walk_does_not_list_a_directory_replaced_by_a_symlink(tmp_path: Path) -> None:
    # The walk listed each directory by its path when it moved past it: a directory
    # replaced by a symlink after its entry was yielded was listed through the link, and
    # push went on to read and publish whatever the link pointed at.
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("mine\n")
    outside = _outside(tmp_path, ["a.txt", "passwd"])
    for strict in (True, False):
        walker = Walker(str(root), strict=strict, stat_files=False)
        first = next(walker)
        assert first.path == "sub" and first.kind == Kind.DIR
        _swap_for_link(root / "sub", outside, tmp_path / f"aside-{strict}")
        if strict:  # push: the tree changed under it
            with pytest.raises(Conflict, match="'sub' changed"):
                list(walker)
        else:  # stage and verify: nothing is listed through the link
            assert [e.path for e in walker] == []
        (root / "sub").unlink()
        (tmp_path / f"aside-{strict}").rename(root / "sub")


def _root(path: Path) -> readers.TreeRoot:
    """Directory `path` as a push that started now would read it."""
    st = path.stat()
    return readers.TreeRoot(str(path), (), st.st_dev, st.st_ino)


def test_readers_do_not_read_through_a_directory_replaced_by_a_symlink(tmp_path: Path) -> None:
    # Readers opened `root/rel` with O_NOFOLLOW, which guards the last component only: a
    # directory replaced by a symlink between the walk and the read was read through.
    root = tmp_path / "tree"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "sub" / "a.txt").write_text("mine\n")
    outside = _outside(tmp_path, ["a.txt"])
    params = ChunkerParams()
    _swap_for_link(root / "d", outside.parent, tmp_path / "aside")
    (outside.parent / "sub").symlink_to(outside)  # d -> tmp_path, and tmp_path/sub -> outside
    chunker = Chunker(params)
    assert readers.read_whole(_root(root), "d/sub/a.txt", chunker, 3) == ReadProblem(
        "type", "d/sub/a.txt"
    )
    assert readers.read_batch(_root(root), ["d/sub/a.txt"], params, 3, 1 << 20) == [
        ReadProblem("type", "d/sub/a.txt")
    ]
    assert readers.open_file(_root(root), "d/sub/a.txt") == ReadProblem("type", "d/sub/a.txt")


@pytest.mark.parametrize("when", ["listed", "read"])
async def test_push_never_publishes_files_from_outside_the_tree(
    make_site: MakeSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    # `listed`: the directory is swapped as the walk yields it, before its listing;
    # `read`: after its listing, before its files are read (by the reader processes too).
    a = await make_site("a")
    root = a.data / "run"
    for d in range(4):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(150):
            (root / f"d{d}" / f"f{i:03d}.txt").write_text(f"mine {d} {i}\n")
    outside = _outside(tmp_path, [f"f{i:03d}.txt" for i in range(150)])
    victim = "d2" if when == "listed" else "d2/f000.txt"
    real_next = Walker.__next__

    def swapping_next(self: Walker) -> LocalEntry:
        entry = real_next(self)
        if entry.path == victim:
            _swap_for_link(root / "d2", outside, tmp_path / "aside")
        return entry

    monkeypatch.setattr(Walker, "__next__", swapping_next)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match=r"'d2.*changed"):
            await push(site, "/proj/run")
        assert await site.repo.latest("/proj/run") is None
    finally:
        await site.close()


async def test_an_unreadable_directory_is_named_like_an_unreadable_file(
    make_site: MakeSite,
) -> None:
    a = await make_site("a")
    (a.data / "ds" / "locked").mkdir(parents=True)
    (a.data / "ds" / "locked" / "f").write_text("data\n")
    (a.data / "ds" / "g").write_text("g\n")
    os.chmod(a.data / "ds" / "locked", 0)
    try:
        proc = cli_unprivileged(a, "push", "/proj/ds")
    finally:
        os.chmod(a.data / "ds" / "locked", 0o755)
    assert proc.returncode == InvalidInput.exit_code, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "'locked'" in proc.stderr or "/ds/locked'" in proc.stderr, proc.stderr
    assert "permission denied" in proc.stderr, proc.stderr


async def test_a_dataset_directory_that_cannot_be_looked_into_is_named_not_missing(
    make_site: MakeSite,
) -> None:
    a = await make_site("a")
    (a.data / "locked" / "ds").mkdir(parents=True)
    (a.data / "locked" / "ds" / "f").write_text("data\n")
    a.cli_json("push", "/proj/locked/ds")
    # The same site with its configured directory itself inside the locked one.
    mapped = f'"/proj" = "{a.data}"'
    assert mapped in a.config_path.read_text()
    inside = dataclasses.replace(a, config_path=a.config_path.with_name("inside.toml"))
    inside.config_path.write_text(
        a.config_path.read_text().replace(mapped, f'"/proj" = "{a.data}/locked/ds"')
    )
    os.chmod(a.data / "locked", 0)
    try:
        runs = {
            (env.name, *args): cli_unprivileged(env, *args)
            for env, args in (
                (a, ("push", "/proj/locked/ds")),
                (a, ("verify", "/proj/locked/ds")),
                (inside, ("push", "/proj/x")),
            )
        }
    finally:
        os.chmod(a.data / "locked", 0o755)
    for args, proc in runs.items():
        assert proc.returncode == PermanentError.exit_code, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert "permission denied" in proc.stderr and "does not exist" not in proc.stderr
        assert f"{a.data}/locked" in proc.stderr, (args, proc.stderr)


# -- the demo ------------------------------------------------------------------------------


def _processes_under(path: Path) -> list[int]:
    """Pids of live processes whose command line names something below `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_demo_of_no_small_files_runs_and_a_negative_count_is_a_usage_error(
    tmp_path: Path,
) -> None:
    # Before: `--files 0` (and -1) failed with "No such file or directory: .../trajectory.bin",
    # the tree's directory being made only by its first small file.
    from datamover.demo import generate_tree

    assert generate_tree(tmp_path / "run1", 0) == 24 << 20
    assert sorted(p.name for p in (tmp_path / "run1").iterdir()) == ["latest", "trajectory.bin"]
    proc = subprocess.run(
        [sys.executable, "-m", "datamover", "demo", "--files", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "'--files': -1 is not in the range" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "starting" not in proc.stdout


def test_a_terminated_demo_stops_its_server_and_removes_its_directory(tmp_path: Path) -> None:
    # `timeout 60 datamover demo`, a CI job's time limit, `kill`: SIGTERM ended the process
    # without unwinding, so the SeaweedFS it started (in a process group of its own) kept
    # running, holding five ports, and the temporary directory stayed.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "datamover", "demo", "--files", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("generating"):  # the server runs; the demo is under way
                break
        else:
            pytest.fail(f"the demo ended early: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) != 0
        deadline = time.monotonic() + 10
        while _processes_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_under(tmp_path) == []
        assert [p.name for p in tmp_path.glob("datamover-demo-*")] == []
        assert [p.name for p in tmp_path.glob("weed.*")] == []  # glog's files went with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_under(tmp_path):  # what this test's demo left running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


# -- a first push holds bounded bytes per read batch ---------------------------------------


def test_a_read_batch_stops_at_its_byte_budget(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(os.urandom(100_000))
    names = [f"f{i}" for i in range(5)]
    read = readers.read_batch(_root(tmp_path), names, ChunkerParams(), 3, 250_000)
    assert [r[2] for r in read] == [100_000] * 3  # the third reaches the budget


async def test_a_first_push_reads_batches_of_bounded_bytes(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first push walks without `stat`, so sizes are unknown when reads are batched:
    batches were cut at 256 files only (2,600 files of 1 MiB took 2.2 GB). A reader process
    now stops at the batch's byte budget; the rest goes in another batch, and the version
    is whole."""
    from datamover.transfer import scan
    from datamover.transfer.stage import stage
    from tests.treegen import snapshot

    monkeypatch.setattr(scan, "_POOL_AFTER", 0)  # reader processes from the first file
    a, b = await make_site("site-a", read_workers=2), await make_site("site-b")
    (a.data / "run").mkdir()
    for i in range(48):
        (a.data / "run" / f"f{i:02d}").write_bytes(os.urandom(512 << 10))
    batches: list[Any] = []
    events: list[str] = []
    real, real_consume = scan.Scanner._submit, scan.Scanner._consume

    def submit(self: scan.Scanner, items: list[Any]) -> Any:
        slot = real(self, items)
        if slot[2] is not None:
            batches.append(slot[2])
            events.append("s")
        return slot

    def consume(self: scan.Scanner, slot: Any) -> Any:
        events.append("c")
        return real_consume(self, slot)

    monkeypatch.setattr(scan.Scanner, "_submit", submit)
    monkeypatch.setattr(scan.Scanner, "_consume", consume)
    site_a, site_b = await a.open(), await b.open()
    try:
        assert (await push(site_a, "/proj/run")).files == 48
        await stage(site_b, "/proj/run")
    finally:
        await site_a.close()
        await site_b.close()
    held = [sum(r[2] for r in f.result() if not isinstance(r, ReadProblem)) for f in batches]
    assert sum(held) == 48 * (512 << 10) and len(held) > 1
    assert max(held) <= scan._BATCH_BYTES + (512 << 10)
    # What a batch left is read in several batches at once, not one after another.
    assert "sss" in "".join(events), events
    assert snapshot(b.data / "run") == snapshot(a.data / "run")


# -- a FIFO swapped in for a file is refused, not waited on --------------------------------


@pytest.mark.parametrize("size", [2, 3 << 20])  # read whole, or streamed as a large file
async def test_a_file_replaced_by_a_fifo_before_its_read_is_refused_at_once(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """The open blocked until a writer came, which for a FIFO nobody writes is forever
    (the push held its dataset's lock meanwhile). Now it is "changed type" at once."""
    import threading

    a = await make_site("site-a")
    (a.data / "run").mkdir()
    path = a.data / "run" / "f"
    path.write_bytes(os.urandom(size))
    real = readers.open_file
    opens = [0]

    def swapping(root: readers.TreeRoot, rel: str, dirs: Any = None) -> Any:
        opens[0] += 1
        if rel == "f" and opens[0] == (1 if size < (1 << 20) else 2):
            path.unlink()
            os.mkfifo(path)
            rescue.start()
        return real(root, rel) if dirs is None else real(root, rel, dirs)

    done = threading.Event()

    def writers() -> None:
        # Should an open block after all, a writer comes every 5 s: a failure, not a hang
        # (O_RDWR opens a FIFO without waiting for the other end).
        while not done.wait(5):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))

    rescue = threading.Thread(target=writers, daemon=True)
    monkeypatch.setattr(readers, "open_file", swapping)
    site = await a.open()
    started = time.monotonic()
    try:
        with pytest.raises(Conflict, match="'f' changed type; nothing was published"):
            await push(site, "/proj/run")
    finally:
        done.set()
        await site.close()
    assert time.monotonic() - started < 4


async def test_a_directory_renamed_during_the_walk_fails_the_push(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A directory renamed after its parent was listed was published as an empty directory:
    its five files, there all along under the new name, in no version. Like a file that
    vanishes, it is now a conflict, and nothing is published."""
    from datamover.transfer import walk

    a = await make_site("site-a")
    src = a.data / "run"
    (src / "a").mkdir(parents=True)
    for i in range(5):
        (src / "a" / f"f{i}").write_text(f"data {i}\n")
    (src / "b.txt").write_text("b\n")
    real = walk.Walker._list

    def listing(self: walk.Walker, rel: str, unlock: bool = False) -> Any:
        if rel == "a":  # a user renames it just after the walk listed its parent
            (src / "a").rename(src / "a2")
        return real(self, rel, unlock)

    monkeypatch.setattr(walk.Walker, "_list", listing)
    site = await a.open()
    try:
        with pytest.raises(Conflict, match="'a' vanished while push read the tree"):
            await push(site, "/proj/run")
        assert await list_datasets(site, "/proj/run") == []
    finally:
        await site.close()


async def test_a_re_push_names_a_file_in_a_directory_it_cannot_search(make_site: MakeSite) -> None:
    """A re-push `stat`s files to compare them with the parent version: in a directory that
    may be read but not searched that failed as "Permission denied: 'f0'", exit 1, where a
    first push names the file and exits 2."""
    a = await make_site("site-a")
    (a.data / "run" / "d").mkdir(parents=True)
    (a.data / "run" / "d" / "f0").write_text("x\n")
    assert cli_unprivileged(a, "push", "/proj/run", "--json").returncode == 0
    (a.data / "run" / "d").chmod(0o644)  # readable, not searchable
    try:
        again = cli_unprivileged(a, "push", "/proj/run", "--json")
    finally:
        (a.data / "run" / "d").chmod(0o755)
    assert again.returncode == 2, again.stderr
    assert f"cannot read '{a.data / 'run' / 'd' / 'f0'}': permission denied" in again.stderr


async def test_a_tree_deeper_than_the_usual_open_files_limit_is_pushed_and_staged(
    make_site: MakeSite,
) -> None:
    """The walk holds a descriptor per level: 1,100 levels failed with "Too many open files"
    under the common soft limit of 1,024. Commands raise the soft limit to the hard one."""
    import resource

    a, b = await make_site("site-a"), await make_site("site-b")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        deep = a.data / "run"
        deep.mkdir()
        for _ in range(1100):  # one by one: `mkdir(parents=True)` recurses once per level
            deep = deep / "d"
            deep.mkdir()
        (deep / "f").write_text("at the bottom\n")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the commands inherit it
        pushed = a.cli("push", "/proj/run", "--json")
        staged = b.cli("stage", "/proj/run", "--json")
        assert pushed.returncode == 0, pushed.stderr
        assert staged.returncode == 0, staged.stderr
        assert (b.data / "run" / "/".join(["d"] * 1100) / "f").read_text() == "at the bottom\n"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for top in (a.data / "run", b.data / "run"):  # pytest's clean-up recurses per level
            _remove_deep(top)


def _remove_deep(top: Path) -> None:
    """Remove a tree of any depth (`shutil.rmtree` recurses per level on Python 3.11)."""
    if not top.exists():
        return
    dirs, stack = [], [top]
    while stack:
        at = stack.pop()
        dirs.append(at)
        for p in at.iterdir():
            if p.is_dir() and not p.is_symlink():
                stack.append(p)
            else:
                p.unlink()
    for at in reversed(dirs):
        at.rmdir()


# -- a file written within its timestamp granule is read after it --------------------------


@pytest.mark.parametrize("size", [100, 3 << 20])  # read whole, or streamed as a large file
async def test_a_file_written_this_second_on_whole_second_mtimes_is_read_after_it(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """On a file system with 1 s timestamps (Lustre), a write during the read in the same
    second as the file's last one moves neither its mtime nor its ctime: the read looked
    clean, the torn content was published, and later pushes took the file as unchanged.
    A file whose mtime is within its granule of now is now read once the granule is over."""
    from datamover.transfer import readers

    a = await make_site("site-a")
    (a.data / "run").mkdir()
    hot, cold = a.data / "run" / "hot", a.data / "run" / "cold"
    for path in (hot, cold):
        path.write_bytes(os.urandom(size))
    os.utime(cold, ns=(0, 10**18))
    reads: dict[str, int] = {}
    real = readers.read_open

    def read_open(fd: int, before: os.stat_result, *args: Any) -> Any:
        reads[os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2]] = time.time_ns()
        return real(fd, before, *args)

    monkeypatch.setattr(readers, "read_open", read_open)
    site = await a.open()
    try:
        await asyncio.sleep(1 - time.time() % 1)  # early in a second: the push reads in it
        second = time.time_ns() // 10**9 * 10**9  # this second, as Lustre would stamp it
        os.utime(hot, ns=(second, second))
        await push(site, "/proj/run")
    finally:
        await site.close()
    assert reads["hot"] >= second + readers.COARSE_NS  # not before the second was over
    assert reads["cold"] < second + readers.COARSE_NS or reads["cold"] < reads["hot"]


def test_a_file_with_an_mtime_in_the_future_is_read_at_once(tmp_path: Path) -> None:
    """Waiting for a granule cannot help a future mtime (another clock's): it cost a
    whole granule for every such file."""
    from datamover.transfer import readers

    path = tmp_path / "f"
    path.write_bytes(b"x")
    later = (time.time_ns() // 10**9 + 3600) * 10**9  # an hour ahead, on a whole second
    os.utime(path, ns=(later, later))
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.monotonic()
        assert readers.settled(fd, os.fstat(fd)).st_mtime_ns == later
        assert time.monotonic() - started < 0.5
    finally:
        os.close(fd)


def test_the_demo_runs_where_an_http_proxy_is_set(tmp_path: Path) -> None:
    # A login node's `http_proxy` sent the requests for the demo's loopback server to the
    # proxy: the demo failed after a minute, blaming SeaweedFS.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    env.update(
        http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", TMPDIR=str(tmp_path)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "datamover", "demo", "--files", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["verified"] is True
    assert list(tmp_path.iterdir()) == []  # and nothing left in $TMPDIR


def test_the_demos_proxy_bypass_keeps_the_users_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from datamover.demo import _bypass_proxies_for_loopback

    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("NO_PROXY", " .corp.example, localhost")
    _bypass_proxies_for_loopback()
    for name in ("NO_PROXY", "no_proxy"):
        assert os.environ[name] == ".corp.example,localhost,127.0.0.1,::1"
