"""Stage under hostile stores, failing trash moves, read-only trees and worker processes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
from pathlib import Path

import pytest

from datamover.chunking import codec
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import Corrupt, DatamoverError, InvalidInput, NotFound, PermanentError
from datamover.repo.layout import VersionDoc
from datamover.transfer import crossfs, fsops
from datamover.transfer import stage as stage_module
from datamover.transfer.fetch import plan_ranges
from datamover.transfer.fsops import TreeWriter, open_root
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from datamover.transfer.writers import write_batch
from tests.fixtures_sites import MakeSite, SiteEnv, cli_unprivileged
from tests.test_bad_input import publish_manifest

LONG = "/proj/2026年度分子对接虚拟筛选项目/第一批候选化合物对接结果/重新打分"  # 272 bytes encoded


# -- 1. a failed trash move stops the write it was clearing the way for ---------------------


async def _sites_writing_by(
    path: str, make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> tuple[SiteEnv, SiteEnv, int]:
    """Sites A (with an empty `ds/`) and B, whose stage writes a file of the returned size
    the `path` way: its writer thread, its worker processes, or by ranges (a large file)."""
    transfer = {"write_workers": 2 if path == "workers" else -1, "batch_bytes": 4 << 20}
    if path == "workers":
        monkeypatch.setattr(stage_module, "_POOL_FILES", 1)
    a, b = await make_site("site-a"), await make_site("site-b", **transfer)
    (a.data / "ds").mkdir()
    return a, b, (2 << 20) + 7 if path == "large" else 100  # large: above batch_bytes / 4


@pytest.mark.parametrize("path", ["thread", "workers", "large"])
async def test_a_failed_trash_move_stops_the_write_of_that_file(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    a, b, size = await _sites_writing_by(path, make_site, monkeypatch)
    src = a.data / "ds"
    (src / "analysis.csv").write_bytes(os.urandom(size))
    for i in range(24):  # 12 MiB: batches go while the plan is still being dispatched
        (src / f"p{i:02d}").write_bytes(os.urandom(512 << 10))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        mine = b.data / "ds" / "analysis.csv"
        mine.write_text("the user's own edits\n")
        (src / "analysis.csv").write_bytes(os.urandom(size))
        for i in range(24):
            (src / f"p{i:02d}").write_bytes(os.urandom(512 << 10))
        await push(site_a, "/proj/ds")
        (b.state / "trash").write_text("in the way: every trash move fails\n")
        with pytest.raises(Exception) as caught:  # its type is checked below
            await stage(site_b, "/proj/ds")
        assert mine.read_text() == "the user's own edits\n"  # not written over
        assert isinstance(caught.value, PermanentError), caught.value
        assert "cannot move 'analysis.csv' to the trash" in str(caught.value)
    finally:
        await site_a.close()
        await site_b.close()


# -- 2. the trash path never has a component longer than NAME_MAX ---------------------------


async def test_trash_of_a_long_non_ascii_dataset_path(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    rel = LONG[len("/proj/") :]
    (a.data / rel).mkdir(parents=True)
    (a.data / rel / "analysis.csv").write_text("v1\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, LONG)
        await stage(site_b, LONG)
        (b.data / rel / "analysis.csv").write_text("mine\n")
        (a.data / rel / "analysis.csv").write_text("v2\n")
        await push(site_a, LONG)
        staged = await stage(site_b, LONG)
        assert staged.trashed == ["analysis.csv"] and staged.trash_dir is not None
        trash = Path(staged.trash_dir)
        assert trash.parts[-4:] == tuple(LONG.split("/")[1:])  # readable: the dataset's path
        assert (trash / "analysis.csv").read_text() == "mine\n"
        assert (b.data / rel / "analysis.csv").read_text() == "v2\n"
    finally:
        await site_a.close()
        await site_b.close()


# -- 3. read-only directories and files, as rsync handles them ------------------------------


async def test_restage_into_read_only_directories_and_files(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "ds"
    (src / "ro").mkdir(parents=True)
    (src / "ro" / "f").write_text("v1\n")
    (src / "g").write_text("g\n")
    os.chmod(src / "ro", 0o555)
    assert a.cli("push", "/proj/ds").returncode == 0
    first = cli_unprivileged(b, "stage", "/proj/ds")
    assert first.returncode == 0, first.stderr
    staged = b.data / "ds"
    assert stat.S_IMODE(os.stat(staged / "ro").st_mode) == 0o555
    os.chmod(staged / "g", 0)  # the user locks a staged file
    (staged / "ro" / ".dm-0123456789abcdef.part").write_bytes(b"half")  # a killed run's
    os.chmod(src / "ro", 0o755)
    (src / "ro" / "f").write_text("v2 changed\n")
    (src / "ro" / "new").write_text("new\n")
    os.chmod(src / "ro", 0o555)
    assert a.cli("push", "/proj/ds").returncode == 0
    for _ in range(2):  # and again, with nothing to do
        again = cli_unprivileged(b, "stage", "/proj/ds")
        assert again.returncode == 0, again.stderr
    assert (staged / "ro" / "f").read_text() == "v2 changed\n"
    assert sorted(p.name for p in (staged / "ro").iterdir()) == ["f", "new"]
    assert stat.S_IMODE(os.stat(staged / "ro").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(staged / "g").st_mode) == stat.S_IMODE(os.stat(src / "g").st_mode)


#: A tree whose directories their owner may not search: `locked` (no x) holds directories.
_LOCKED_TREE = [
    Entry("locked", Kind.DIR, 0o600, 1_600_000_000_000_000_001),
    Entry("locked/sub", Kind.DIR, 0o500, 1_600_000_000_000_000_002),
    Entry("locked/sub/deep", Kind.DIR, 0o700, 1_600_000_000_000_000_003),
    Entry("locked/sub/deep/f", Kind.FILE, 0o644, 1_600_000_000_000_000_004),
    Entry("locked/sub/g", Kind.FILE, 0o644, 1_600_000_000_000_000_005),
]


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_directories_their_owner_cannot_search_are_staged(make_site: MakeSite) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    await publish_manifest(a, "/proj/ds", _LOCKED_TREE)

    dirs = [e for e in _LOCKED_TREE if e.kind == Kind.DIR]
    want = [(e.path, e.mode, e.mtime_ns) for e in dirs]

    def attrs() -> list[tuple[str, int, int]]:
        top = os.lstat(b.data / "ds" / "locked")
        os.chmod(b.data / "ds" / "locked", 0o700)  # so that a test run without root can look
        try:
            got = [top] + [os.lstat(b.data / "ds" / e.path) for e in dirs[1:]]
        finally:
            os.chmod(b.data / "ds" / "locked", top.st_mode)
        return [
            (e.path, stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            for e, st in zip(dirs, got, strict=True)
        ]

    staged = cli_unprivileged(b, "stage", "/proj/ds")  # not root: modes are in its way
    assert staged.returncode == 0, staged.stderr
    assert attrs() == want
    again = cli_unprivileged(b, "stage", "/proj/ds", "--json")  # the walk must get in too
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["kept_files"] == 2
    assert attrs() == want
    verified = cli_unprivileged(b, "verify", "/proj/ds", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert attrs() == want  # verify leaves every mode as it found it


async def test_a_directory_of_another_user_is_a_one_line_error(make_site: MakeSite) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    (b.data / "ds" / "sub").mkdir(parents=True)
    os.chown(b.data / "ds" / "sub", 65534, 65534)
    os.chmod(b.data / "ds" / "sub", 0o555)
    proc = cli_unprivileged(b, "stage", "/proj/ds")
    assert proc.returncode == PermanentError.exit_code, proc.stderr
    assert proc.stderr.count("\n") == 1 and "'sub/f'" in proc.stderr, proc.stderr


async def _pushed_and_mapped_elsewhere(make_site: MakeSite, where: str) -> SiteEnv:
    """Site B, its `/proj` mapped to `where` beside its data directory (made by no one),
    after site A pushed `/proj/ds` (one file, `sub/f`)."""
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    assert a.cli("push", "/proj/ds").returncode == 0
    text = b.config_path.read_text()
    b.config_path.write_text(text.replace(str(b.data), str(b.data.parent / where)))
    return b


async def test_a_missing_namespace_directory_is_refused_not_made(make_site: MakeSite) -> None:
    """A mistyped `[namespace]` path, or one on a file system not mounted: stage names it
    and makes nothing there (it used to make the whole chain), nor records a replica."""
    b = await _pushed_and_mapped_elsewhere(make_site, "lustre/proj")
    mount = b.data.parent / "lustre"  # an empty mount point: the namespace lies below it
    mount.mkdir()
    proc = b.cli("stage", "/proj/ds")
    assert proc.returncode == NotFound.exit_code, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{mount / 'proj'}: the namespace's local directory does not exist" in proc.stderr
    assert list(mount.iterdir()) == []
    site = await b.open()
    try:
        assert await site.catalog.replica("/proj/ds") is None
        with pytest.raises(NotFound, match="namespace's local directory"):
            await stage(site, "/proj/ds")
    finally:
        await site.close()
    assert list(mount.iterdir()) == []
    (mount / "proj").mkdir()  # mounted: the dataset's own directories are made as before
    assert b.cli("stage", "/proj/ds").returncode == 0
    assert (mount / "proj" / "ds" / "sub" / "f").read_text() == "data\n"


async def test_a_namespace_directory_behind_a_symlink_loop_is_named(make_site: MakeSite) -> None:
    b = await _pushed_and_mapped_elsewhere(make_site, "loop")
    loop = b.data.parent / "loop"
    loop.symlink_to(loop)
    proc = b.cli("stage", "/proj/ds")
    assert proc.returncode == InvalidInput.exit_code, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"{loop}: the namespace's local directory is reached through a loop" in proc.stderr
    assert loop.is_symlink() and sorted(loop.parent.iterdir()) == sorted(
        [loop, b.data, b.state, b.config_path]
    )


# -- 4. temporary names: per process, and a taken name is not an error ----------------------


def test_a_forked_process_gets_its_own_temporary_names() -> None:
    mine = fsops.temp_name()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, fsops.temp_name().encode())
        os._exit(0)
    os.close(write)
    theirs = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert theirs[:12] != mine[:12]  # ".dm-" and the 8-hex prefix


def test_a_taken_temporary_name_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools

    monkeypatch.setattr(fsops, "_temp_counter", itertools.count())
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / fsops.temp_name()).write_bytes(b"another writer's")
    monkeypatch.setattr(fsops, "_temp_counter", itertools.count())
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds")
    try:
        writer.write_file(Entry("f", Kind.FILE, 0o644, 0), [b"data"])
    finally:
        os.close(writer.root_fd)
    assert (tmp_path / "ds" / "f").read_bytes() == b"data"


# -- 5. trash across file systems: special files, and a failed copy -------------------------


def _shm_trash(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    return Path(tempfile.mkdtemp(dir=shm, prefix="dm-trash-test-"))


def test_trash_across_file_systems_keeps_fifos(tmp_path: Path) -> None:
    trash = _shm_trash(tmp_path)
    try:
        (tmp_path / "ds" / "scratch").mkdir(parents=True)
        (tmp_path / "ds" / "scratch" / "notes").write_text("mine\n")
        os.mkfifo(tmp_path / "ds" / "scratch" / "pipe")
        os.mkfifo(tmp_path / "ds" / "lone-pipe")
        writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
        try:
            writer.trash("scratch")
            writer.trash("lone-pipe")
        finally:
            writer.close()
            os.close(writer.root_fd)
        assert (trash / "scratch" / "notes").read_text() == "mine\n"
        assert stat.S_ISFIFO(os.lstat(trash / "scratch" / "pipe").st_mode)
        assert stat.S_ISFIFO(os.lstat(trash / "lone-pipe").st_mode)
        assert list((tmp_path / "ds").iterdir()) == []
    finally:
        shutil.rmtree(trash)


def test_a_failed_copy_to_the_trash_leaves_the_original_and_no_half_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        (tmp_path / "ds" / "scratch").mkdir(parents=True)
        for name in ("a", "b", "c"):
            (tmp_path / "ds" / "scratch" / name).write_text(name)
        real = crossfs.copy_file

        def failing(src: int, st: os.stat_result, dst_dir: int, name: str) -> None:
            if name == "b":
                raise OSError(28, "No space left on device")
            real(src, st, dst_dir, name)

        monkeypatch.setattr(crossfs, "copy_file", failing)
        writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
        try:
            # A full trash: the system refusing (exit 1), not a refusal to this user (7).
            with pytest.raises(DatamoverError, match="cannot move 'scratch' to the trash") as full:
                writer.trash("scratch")
        finally:
            writer.close()
            os.close(writer.root_fd)
        assert not isinstance(full.value, PermanentError) and full.value.exit_code == 1
        assert sorted(p.name for p in (tmp_path / "ds" / "scratch").iterdir()) == ["a", "b", "c"]
        assert not (trash / "scratch").exists()
        assert writer.trashed_count == 0
    finally:
        shutil.rmtree(trash)


def test_a_path_trashed_twice_in_one_run_keeps_both(tmp_path: Path) -> None:
    # A user saves a file again after the stage moved it to the trash; the stage's rename
    # then finds it there and moves it too. The first move's file must not be replaced.
    (tmp_path / "ds").mkdir()
    trash = tmp_path / "trash"
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
    try:
        (tmp_path / "ds" / "notes").write_text("first save\n")
        writer.trash("notes")
        (tmp_path / "ds" / "notes").write_text("second save\n")
        writer.trash("notes")
        (tmp_path / "ds" / "scratch").mkdir()
        (tmp_path / "ds" / "scratch" / "a").write_text("a\n")
        writer.trash("scratch")
        (tmp_path / "ds" / "scratch").mkdir()
        (tmp_path / "ds" / "scratch" / "b").write_text("b\n")
        writer.trash("scratch")
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert (trash / "notes").read_text() == "first save\n"
    assert (trash / "notes~1").read_text() == "second save\n"
    assert (trash / "scratch" / "a").read_text() == "a\n"
    assert (trash / "scratch~1" / "b").read_text() == "b\n"
    assert writer.trashed == ["notes", "notes", "scratch", "scratch"]


def test_a_trashed_symlink_never_leads_a_later_trash_move_out_of_the_trash(
    tmp_path: Path,
) -> None:
    # The user put a link to their own directory where the version has a directory: the
    # link goes to the trash, the stage makes the directory, and a file saved in it during
    # the stage is trashed too. It must not be moved through the trashed link.
    (tmp_path / "ds").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("the user's other data\n")
    (tmp_path / "ds" / "d").symlink_to(outside)
    trash = tmp_path / "trash"
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
    try:
        writer.trash("d")
        writer.mkdir("d")
        (tmp_path / "ds" / "d" / "x").write_text("saved during the stage\n")
        writer.trash("d/x")
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert (outside / "x").read_text() == "the user's other data\n"
    assert sorted(p.name for p in outside.iterdir()) == ["x"]
    assert os.readlink(trash / "d") == str(outside)
    assert (trash / "d~1" / "x").read_text() == "saved during the stage\n"


def test_a_trash_suffix_keeps_a_name_within_255_bytes(tmp_path: Path) -> None:
    name = "é" * 127  # 254 bytes: the suffix cuts it at a character's boundary
    (tmp_path / "ds").mkdir()
    trash = tmp_path / "trash"
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
    try:
        for text in ("one", "two"):
            (tmp_path / "ds" / name).write_text(text)
            writer.trash(name)
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert (trash / name).read_text() == "one"
    assert (trash / ("é" * 126 + "~1")).read_text() == "two"


# -- 6. a hostile store: two references at one place in a pack ------------------------------


def test_two_references_at_one_offset_are_each_verified(tmp_path: Path) -> None:
    pack = bytes(32)
    stored = b"EVIL-CONTENT-FROM-STORE"
    ref_a = ChunkRef(codec.digest(b"the rea"), pack, 0, 7, 7, codec.Codec.RAW)
    ref_b = ChunkRef(codec.digest(stored), pack, 0, len(stored), len(stored), codec.Codec.RAW)
    files = [("a", 0o644, 0, (ref_a,), None), ("b", 0o644, 0, (ref_b,), None)]
    ranges = plan_ranges([ref_a, ref_b], 1 << 20, 1 << 30)
    blobs = [stored[r.start : r.end] for r in ranges]
    (tmp_path / "ds").mkdir()
    with pytest.raises(Corrupt, match="'a'"):
        write_batch(str(tmp_path), ("ds",), ranges, blobs, files)
    assert not (tmp_path / "ds" / "a").exists()


# -- 7. memory: what a stage keeps ---------------------------------------------------------


async def test_a_manifest_with_many_chunk_references_is_not_kept(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds").mkdir()
    (a.data / "ds" / "f").write_text("data\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        refs = await site_b.repo.prefetch(await site_b.repo.resolve("/proj/ds", None))
        assert stage_module._check_manifest(site_b, refs) is not None
        monkeypatch.setattr(stage_module, "_KEEP_STORED", sum(r.stored_size for r in refs) - 1)
        assert stage_module._check_manifest(site_b, refs) is None
        assert (await stage(site_b, "/proj/ds")).fetched_files == 1  # decoded twice instead
    finally:
        await site_a.close()
        await site_b.close()


def test_the_trashed_list_is_a_bounded_sample(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    for i in range(fsops.TRASHED_SAMPLE + 20):
        (tmp_path / "ds" / f"f{i:03d}").write_text("x")
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", tmp_path / "trash")
    try:
        for i in range(fsops.TRASHED_SAMPLE + 20):
            writer.trash(f"f{i:03d}")
    finally:
        os.close(writer.root_fd)
    assert writer.trashed_count == fsops.TRASHED_SAMPLE + 20
    assert len(writer.trashed) == fsops.TRASHED_SAMPLE


# -- 8. small error paths ------------------------------------------------------------------


async def test_a_failed_rename_of_a_large_file_reports_its_own_error(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b", batch_bytes=4 << 20)
    (a.data / "ds").mkdir()
    (a.data / "ds" / "big").write_bytes(os.urandom(3 << 20))
    real_open = TreeWriter.open_partial

    def open_partial(self: TreeWriter, entry: Entry) -> tuple[int, int]:
        opened = real_open(self, entry)
        (b.data / "ds" / "big" / "sub").mkdir(parents=True)  # a user's directory appears
        return opened

    monkeypatch.setattr(TreeWriter, "open_partial", open_partial)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        (b.state / "trash").write_text("in the way: the directory cannot be moved there\n")
        with pytest.raises(PermanentError, match="cannot move 'big' to the trash"):
            await stage(site_b, "/proj/ds")  # not EBADF: the fd is closed once
        assert (b.data / "ds" / "big" / "sub").is_dir()
    finally:
        await site_a.close()
        await site_b.close()


def test_a_deeply_nested_version_document_is_corrupt() -> None:
    with pytest.raises(Corrupt, match="nested too deeply"):
        VersionDoc.from_bytes(b"[" * 100_000, "version document x")


def test_open_partial_closes_its_fd_when_checking_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ds").mkdir()
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds")
    entry = Entry(
        "big", Kind.FILE, 0o644, 0, 4, None, (ChunkRef(bytes(32), bytes(32), 0, 4, 4, 0),)
    )
    (tmp_path / "ds" / fsops.partial_name(entry)).write_bytes(b"left over")  # to be cut

    def broken(fd: int, length: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "ftruncate", broken)
    before = len(list(Path("/proc/self/fd").iterdir()))
    try:
        with pytest.raises(OSError, match="Input/output"):
            writer.open_partial(entry)
    finally:
        monkeypatch.undo()
        os.close(writer.root_fd)
    assert len(list(Path("/proc/self/fd").iterdir())) == before - 1  # only the root was closed


def test_open_partial_cuts_only_a_partial_file_longer_than_its_good_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new partial file is never cut (ext4 writes back a file cut to size 0 on close);
    a left-over one is cut after its good chunks."""
    (tmp_path / "ds").mkdir()
    data = os.urandom(8)
    first = ChunkRef(codec.digest(data[:4]), bytes(32), 0, 4, 4, 0)
    second = ChunkRef(codec.digest(data[4:]), bytes(32), 4, 4, 4, 0)
    entry = Entry("big", Kind.FILE, 0o644, 0, 8, None, (first, second))
    cuts: list[int] = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (cuts.append(n), real(fd, n)))
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds")
    partial = tmp_path / "ds" / fsops.partial_name(entry)
    try:
        fd, good = writer.open_partial(entry)
        os.close(fd)
        assert (good, cuts, partial.stat().st_size) == (0, [], 0)
        partial.write_bytes(data[:4] + b"torn")
        fd, good = writer.open_partial(entry)
        os.close(fd)
        assert (good, cuts, partial.read_bytes()) == (1, [4], data[:4])
    finally:
        os.close(writer.root_fd)


# -- 8. a file edited between the walk and its replacement ---------------------------------


@pytest.mark.parametrize("path", ["thread", "workers", "large"])
@pytest.mark.parametrize("walked", ["as written", "nothing"])
async def test_a_file_a_user_saves_after_the_walk_is_trashed_not_replaced(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, path: str, walked: str
) -> None:
    """Where the walk finds the file as datamover wrote it (the base's, so it is to be
    replaced in place), or nothing (the version adds it), a user saves a file before the
    rename: the user's file goes to the trash, not under the fetched one."""
    a, b, size = await _sites_writing_by(path, make_site, monkeypatch)
    src = a.data / "ds"
    if walked == "as written":
        (src / "results.csv").write_bytes(os.urandom(size))
    (src / "other.csv").write_bytes(b"other\n")
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        new = os.urandom(size)
        (src / "results.csv").write_bytes(new)
        await push(site_a, "/proj/ds")
        mine = b.data / "ds" / "results.csv"
        real = stage_module._Stager._dispatch

        async def saved_meanwhile(self: stage_module._Stager, actions: list) -> None:
            if any(action.path == "results.csv" for action in actions):
                mine.write_text("an hour of the user's work\n")  # planned: walked already
            await real(self, actions)

        monkeypatch.setattr(stage_module._Stager, "_dispatch", saved_meanwhile)
        staged = await stage(site_b, "/proj/ds")
        assert staged.trashed == ["results.csv"] and staged.trashed_count == 1
        trashed = Path(staged.trash_dir or "") / "results.csv"
        assert trashed.read_text() == "an hour of the user's work\n"
        assert mine.read_bytes() == new
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_mode_changed_on_one_name_of_a_shared_inode_leaves_the_others(
    make_site: MakeSite, tmp_path: Path
) -> None:
    """Two files of the version that a user hard-linked together at the site, and a third
    name of the inode outside the tree: a version that changes one file's mode gives it to
    that name alone (a copy renamed over it), so the stage converges and verifies, and
    the other names keep theirs. In place, the mode flipped between the two names at
    every stage and `verify` failed after each."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "hl"
    src.mkdir()
    for name in ("f", "g"):
        (src / name).write_text("same\n")
        os.chmod(src / name, 0o644)
    os.utime(src / "g", ns=(os.stat(src / "f").st_mtime_ns,) * 2)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/hl")
        await stage(site_b, "/proj/hl")
        dst = b.data / "hl"
        (dst / "g").unlink()
        os.link(dst / "f", dst / "g")
        os.link(dst / "f", tmp_path / "snapshot")  # a `cp -al` copy outside the tree
        os.chmod(src / "f", 0o600)
        await push(site_a, "/proj/hl")
        for _ in range(2):
            staged = await stage(site_b, "/proj/hl")
            assert staged.kept_files == 2 and staged.trashed == []
            checked = await verify(site_b, "/proj/hl")
            assert checked.ok, checked.problems
        f, g, outside = (os.stat(p) for p in (dst / "f", dst / "g", tmp_path / "snapshot"))
        assert (stat.S_IMODE(f.st_mode), stat.S_IMODE(g.st_mode)) == (0o600, 0o644)
        assert stat.S_IMODE(outside.st_mode) == 0o644 and outside.st_ino == g.st_ino
        assert f.st_ino != g.st_ino and f.st_nlink == 1
        assert (dst / "f").read_text() == "same\n"
        assert f.st_mtime_ns == os.stat(src / "f").st_mtime_ns
    finally:
        await site_a.close()
        await site_b.close()


async def _hard_linked_then_mode_changed(
    make_site: MakeSite, content: bytes, mode: int = 0o644
) -> tuple[SiteEnv, SiteEnv, Path]:
    """Files f and g of one version, both `content` and `mode`, staged at site B, where g
    is then made a second name of f; site A then pushes a version giving f mode 0o600."""
    a, b = await make_site("site-a"), await make_site("site-b")
    src = a.data / "hl"
    src.mkdir()
    for name in ("f", "g"):
        (src / name).write_bytes(content)
        os.chmod(src / name, mode)
    os.utime(src / "g", ns=(os.stat(src / "f").st_mtime_ns,) * 2)
    a.cli_json("push", "/proj/hl")
    b.cli_json("stage", "/proj/hl")
    dst = b.data / "hl"
    (dst / "g").unlink()
    os.link(dst / "f", dst / "g")
    # Staged again as it is: the tree is held since after the link (whose ctime a later
    # stage then does not take for a change to read the file for).
    assert b.cli_json("stage", "/proj/hl")["kept_files"] == 2
    os.chmod(src / "f", 0o600)
    a.cli_json("push", "/proj/hl")
    return a, b, dst


async def test_a_copy_made_to_change_a_shared_files_mode_keeps_holes_owner_and_xattrs(
    make_site: MakeSite,
) -> None:
    """The copy `_unshare` renames over the name keeps what the mode change in place kept:
    the file's holes (a sparse 24 MiB file stayed sparse), its extended attributes and, as
    root, its owner."""
    content = os.urandom(1 << 20) + bytes(22 << 20) + os.urandom(1 << 20)
    _, b, dst = await _hard_linked_then_mode_changed(make_site, content)
    before = os.stat(dst / "f")
    assert before.st_blocks * 512 < 12 << 20  # staged sparse
    os.setxattr(dst / "f", "user.project", b"docking")
    os.chown(dst / "f", 65534, 65534)
    staged = b.cli_json("stage", "/proj/hl")
    assert staged["kept_files"] == 2
    f, g = os.stat(dst / "f"), os.stat(dst / "g")
    assert (stat.S_IMODE(f.st_mode), stat.S_IMODE(g.st_mode)) == (0o600, 0o644)
    assert f.st_ino != g.st_ino and f.st_blocks <= before.st_blocks + 256
    assert (f.st_uid, f.st_gid) == (65534, 65534)
    assert os.getxattr(dst / "f", "user.project") == b"docking"
    assert (dst / "f").read_bytes() == content
    assert b.cli("verify", "/proj/hl").returncode == 0


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A POSIX ACL as its extended attribute holds it: (tag, permissions, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


async def test_a_shared_files_copy_keeps_its_group_and_gains_no_inherited_acl(
    make_site: MakeSite,
) -> None:
    """The copy is a new file: it took this process's group, and the access ACL the
    directory's default ACL gives new files (user 65534 could then read it), where a
    change of mode in place changed neither."""
    _, b, dst = await _hard_linked_then_mode_changed(make_site, b"shared\n")
    os.chown(dst / "f", 0, 100)
    anyone = 0xFFFFFFFF
    os.setxattr(
        dst,
        "system.posix_acl_default",
        _acl([(0x01, 6, anyone), (0x02, 6, 65534), (0x04, 4, anyone), (0x10, 6, anyone)])
        + struct.pack("<HHI", 0x20, 0, anyone),
    )
    assert b.cli_json("stage", "/proj/hl")["kept_files"] == 2
    f = os.stat(dst / "f")
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (0, 100, 0o600)
    assert "system.posix_acl_access" not in os.listxattr(dst / "f")
    assert os.stat(dst / "f").st_ino != os.stat(dst / "g").st_ino


def test_a_copy_of_a_file_cut_short_meanwhile_ends_where_its_data_does(tmp_path: Path) -> None:
    """`copy_data` of a file shorter than the size it was seen at (a user's save cut it):
    no error (the caller sees the file changed and drops the copy); holes stay holes."""
    src = tmp_path / "src"
    with open(src, "wb") as out:
        out.write(b"a" * 4096)
        out.seek(8 << 20)
        out.write(b"b" * 4096)
    size = os.path.getsize(src)
    for seen in (size, size + (1 << 20)):  # as it is, and as it was before a cut
        dst = tmp_path / f"dst{seen}"
        fd, out_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            crossfs.copy_data(fd, out_fd, seen)
        finally:
            os.close(fd)
            os.close(out_fd)
        assert dst.read_bytes()[:size] == src.read_bytes()
        assert os.stat(dst).st_blocks * 512 < 1 << 20  # the 8 MiB hole is a hole


async def test_a_shared_file_that_cannot_be_read_is_named_not_changed_for_every_name(
    make_site: MakeSite,
) -> None:
    """Without the right to read it (no root's override), the file cannot be copied: its
    mode was changed in place, for both names, at every stage, `verify` failing after each.
    Now the stage stops with one line saying why, and neither name changes."""
    _, b, dst = await _hard_linked_then_mode_changed(make_site, b"same\n", mode=0o200)
    proc = cli_unprivileged(b, "stage", "/proj/hl")
    assert proc.returncode == 7, proc.stderr
    assert proc.stderr.startswith("datamover: error: 'f' shares its file with 1 other name(s)")
    assert len(proc.stderr.splitlines()) == 1
    assert stat.S_IMODE(os.stat(dst / "g").st_mode) == 0o200
    assert os.stat(dst / "f").st_ino == os.stat(dst / "g").st_ino


def test_a_replacement_checks_what_it_replaces(tmp_path: Path) -> None:
    """`replaces` is what the walk saw: unchanged, it is replaced with nothing trashed; a
    file or symlink changed since goes to the trash first."""
    (tmp_path / "ds").mkdir()
    ds = tmp_path / "ds"
    for name in ("same", "edited", "link"):
        (ds / name).write_text("v1\n")
    os.remove(ds / "link")
    (ds / "link").symlink_to("v1")

    def seen(name: str) -> tuple[int, int, int]:
        st = os.lstat(ds / name)
        return st.st_ino, st.st_size, st.st_mtime_ns

    walked = {name: seen(name) for name in ("same", "edited", "link")}
    (ds / "edited").write_text("the user's\n")
    (ds / "link").unlink()
    (ds / "link").symlink_to("the-users-own-target")
    writer = TreeWriter(open_root(tmp_path, ("ds",)), ds, tmp_path / "trash")
    try:
        writer.write_file(Entry("same", Kind.FILE, 0o644, 0), [b"v2\n"], walked["same"])
        writer.write_file(Entry("edited", Kind.FILE, 0o644, 0), [b"v2\n"], walked["edited"])
        writer.symlink(Entry("link", Kind.SYMLINK, 0o777, 0, target="v2"), "v2", walked["link"])
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert writer.trashed == ["edited", "link"] and writer.trashed_count == 2
    assert (tmp_path / "trash" / "edited").read_text() == "the user's\n"
    assert os.readlink(tmp_path / "trash" / "link") == "the-users-own-target"
    assert [(ds / n).read_text() for n in ("same", "edited")] == ["v2\n", "v2\n"]
    assert os.readlink(ds / "link") == "v2"


@pytest.mark.parametrize("noreplace", [True, False])
def test_a_new_file_never_replaces_what_appeared_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noreplace: bool
) -> None:
    """With `RENAME_NOREPLACE`, and without it (NFS: looked for first)."""
    if not noreplace:
        monkeypatch.setattr(fsops, "_renameat2", None)
    ds = tmp_path / "ds"
    ds.mkdir()
    writer = TreeWriter(open_root(tmp_path, ("ds",)), ds, tmp_path / "trash")
    try:
        writer.write_file(Entry("fresh", Kind.FILE, 0o644, 0), [b"v2\n"])
        (ds / "taken").write_text("the user's\n")
        writer.write_file(Entry("taken", Kind.FILE, 0o644, 0), [b"v2\n"])
    finally:
        writer.close()
        os.close(writer.root_fd)
    assert writer.trashed == ["taken"]
    assert (tmp_path / "trash" / "taken").read_text() == "the user's\n"
    assert [(ds / n).read_text() for n in ("fresh", "taken")] == ["v2\n", "v2\n"]
