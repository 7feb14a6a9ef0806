"""Stage's trash and batches: setid bits and owners of copies across file systems, a
directory swapped for a symlink while it is moved across, what a batch of small files
fetches at once, and how many trash moves a worker process reports."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from datamover.chunking import codec
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import PermanentError
from datamover.transfer import crossfs, fetch
from datamover.transfer import stage as stage_module
from datamover.transfer.fetch import Range, plan_ranges
from datamover.transfer.fsops import TRASHED_SAMPLE, TreeWriter, open_root
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.writers import write_batch
from tests.fixtures_sites import MakeSite

PACK = bytes(32)

# -- a worker's trash moves are all counted ---------------------------------------------------


def test_a_worker_reports_every_trash_move_not_only_its_sample(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    data = b"version bytes"
    ref = ChunkRef(codec.digest(data), PACK, 0, len(data), len(data), codec.Codec.RAW)
    ranges = plan_ranges([ref], 0, 1 << 20)
    files = []
    for i in range(TRASHED_SAMPLE + 50):
        # Saved by a user where the walk saw nothing: moved to the trash before the write.
        (tmp_path / "ds" / f"f{i:03}").write_text("a user's file\n")
        files.append((f"f{i:03}", 0o644, 0, (ref,), None))
    written = write_batch(str(tmp_path), ("ds",), ranges, [data], files, str(tmp_path / "trash"))
    assert len(list((tmp_path / "trash").iterdir())) == TRASHED_SAMPLE + 50
    assert written.trashed_count == TRASHED_SAMPLE + 50
    assert written.trashed == [f"f{i:03}" for i in range(TRASHED_SAMPLE)]


# -- what a batch of small files fetches at once ----------------------------------------------


def _scattered(count: int, size: int, apart: int) -> list[tuple[Entry, None]]:
    """A batch of `count` files of `size` bytes whose chunks lie `apart` bytes apart in one
    pack (the files between them are there already, or never were)."""
    batch = []
    for i in range(count):
        ref = ChunkRef(bytes([i % 256]) * 32, PACK, i * apart, size, size, codec.Codec.RAW)
        batch.append((Entry(f"f{i:05}", Kind.FILE, 0o644, 0, size, chunks=(ref,)), None))
    return batch


def _held(ranges: Sequence[Range]) -> int:
    return sum(r.end - r.start for r in ranges)


def test_a_batch_of_scattered_files_never_fetches_more_than_batch_bytes_at_once() -> None:
    gap, max_request, limit = 256 << 10, 16 << 20, 64 << 20
    batch = _scattered(4096, 4096, (256 << 10) - 1)  # every gap is coalesced
    whole = plan_ranges((c for e, _ in batch for c in e.chunks), gap, max_request)
    assert _held(whole) > 1000 << 20  # about 1 GiB held for 16 MiB of files
    parts = stage_module.split_fetch(batch, gap, max_request, limit)
    assert [f for part, _ in parts for f in part] == batch  # every file once, in order
    assert all(_held(ranges) <= limit for _, ranges in parts)
    for part, ranges in parts:  # each part's ranges are what the real planner makes of it
        assert ranges == plan_ranges((c for e, _ in part for c in e.chunks), gap, max_request)


def test_a_batch_a_little_over_by_its_own_bytes_is_not_split() -> None:
    # A batch is cut once it reaches batch_bytes, so it ends a little over; files that do
    # not compress take as much stored: every such batch was halved and fetched in two
    # rounds, one after the other (1.6-2x the time with a store 40 ms away).
    batch = _scattered(5, 300_000, 300_000)  # neighbours, no gaps between them
    parts = stage_module.split_fetch(batch, 256 << 10, 16 << 20, 1_000_000)
    assert len(parts) == 1 and _held(parts[0][1]) == 1_500_000


def test_a_batch_of_neighbours_is_fetched_in_one_part() -> None:
    batch = _scattered(4096, 4096, 4096)
    [(part, ranges)] = stage_module.split_fetch(batch, 256 << 10, 16 << 20, 64 << 20)
    assert part == batch and len(ranges) == 1 and _held(ranges) == 4096 * 4096


def test_one_file_whose_gaps_do_not_fit_is_fetched_without_them() -> None:
    refs = tuple(
        ChunkRef(bytes([i]) * 32, PACK, i * (1 << 20), 4096, 4096, codec.Codec.RAW)
        for i in range(8)
    )
    batch = [(Entry("f", Kind.FILE, 0o644, 0, 8 * 4096, chunks=refs), None)]
    [(part, ranges)] = stage_module.split_fetch(batch, 2 << 20, 16 << 20, 64 << 10)
    assert part == batch and _held(ranges) == 8 * 4096


async def test_a_stage_of_scattered_missing_files_holds_at_most_batch_bytes(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit = 64 << 10
    a = await make_site("site-a")
    b = await make_site("site-b", coalesce_gap=1 << 20, batch_bytes=limit, write_workers=-1)
    (a.data / "ds").mkdir()
    for i in range(64):
        (a.data / "ds" / f"f{i:02}").write_bytes(os.urandom(4096))
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/ds")
        await stage(site_b, "/proj/ds")
        for i in range(0, 64, 8):  # every eighth file is gone: 28 KiB between the missing
            (b.data / "ds" / f"f{i:02}").unlink()
        held: list[int] = []
        real = fetch.Fetcher.fetch

        async def recording(
            self: fetch.Fetcher, ranges: Sequence[Range], owners: Any = None
        ) -> list[bytes]:
            held.append(_held(ranges))
            return await real(self, ranges, owners)

        monkeypatch.setattr(stage_module.Fetcher, "fetch", recording)
        result = await stage(site_b, "/proj/ds")
    finally:
        await site_a.close()
        await site_b.close()
    assert result.fetched_files == 8 and held and sum(held) >= 8 * 4096
    assert max(held) <= limit, held
    for i in range(64):
        assert (b.data / "ds" / f"f{i:02}").read_bytes() == (
            a.data / "ds" / f"f{i:02}"
        ).read_bytes()


# -- a directory moved to a trash on another file system --------------------------------------


def _shm_trash(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    return Path(tempfile.mkdtemp(dir=shm, prefix="dm-trash-test-"))


def _tree_and_victim(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ds"
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "user.txt").write_text("the user's\n")
    (root / "d" / "sub" / "deep.txt").write_text("deep\n")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.db").write_text("not in the tree\n")
    (victim / "sub").mkdir()
    (victim / "sub" / "deep.txt").write_text("not in the tree either\n")
    return root, victim


def _trash_d(tmp_path: Path, root: Path, trash: Path) -> PermanentError | None:
    writer = TreeWriter(open_root(tmp_path, ("ds",)), root, trash)
    try:
        writer.trash("d")
    except PermanentError as exc:
        return exc
    finally:
        writer.close()
        os.close(writer.root_fd)
    return None


def test_a_directory_swapped_for_a_symlink_after_the_look_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        root, victim = _tree_and_victim(tmp_path)
        swapped: list[str] = []

        def swapping(real: Any) -> Any:
            def look(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
                st = real(path, *args, **kwargs)
                where = str(path)
                if not swapped and where.rpartition("/")[2] == "d" and str(trash) not in where:
                    # A local user swaps the directory for a link, right after the look.
                    swapped.append(where)
                    (root / "d").rename(root / "d.moved")
                    (root / "d").symlink_to(victim)
                return st

            return look

        monkeypatch.setattr(os, "lstat", swapping(os.lstat))
        monkeypatch.setattr(os, "stat", swapping(os.stat))
        error = _trash_d(tmp_path, root, trash)
        monkeypatch.undo()
        assert swapped
        assert sorted(p.name for p in victim.rglob("*")) == ["deep.txt", "precious.db", "sub"]
        assert not any(p.name == "precious.db" for p in trash.rglob("*"))
        assert error is not None and "cannot move 'd' to the trash" in error.message
        assert (root / "d.moved" / "user.txt").read_text() == "the user's\n"
    finally:
        shutil.rmtree(trash)


def test_a_directory_inside_swapped_for_a_symlink_during_the_copy_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        root, victim = _tree_and_victim(tmp_path)
        real = crossfs.copy_file

        def swap_sub(src: int, st: os.stat_result, dst_dir: int, name: str) -> None:
            real(src, st, dst_dir, name)
            if (root / "d" / "sub").is_dir() and not (root / "d" / "sub").is_symlink():
                (root / "d" / "sub").rename(root / "sub.moved")
                (root / "d" / "sub").symlink_to(victim / "sub")

        monkeypatch.setattr(crossfs, "copy_file", swap_sub)
        _trash_d(tmp_path, root, trash)
        monkeypatch.undo()
        assert (victim / "sub" / "deep.txt").read_text() == "not in the tree either\n"
        assert (victim / "precious.db").exists()
        copies = [p for p in trash.rglob("deep.txt")]
        assert all(p.read_text() == "deep\n" for p in copies)
    finally:
        shutil.rmtree(trash)


def test_a_directory_swapped_for_a_symlink_before_its_removal_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        root, victim = _tree_and_victim(tmp_path)
        real = crossfs.copy_tree

        def copy_then_swap(src: int, dst: int) -> dict[str, crossfs.Seen]:
            copied = real(src, dst)
            (root / "d").rename(root / "d.moved")
            (root / "d").symlink_to(victim)
            return copied

        monkeypatch.setattr(crossfs, "copy_tree", copy_then_swap)
        _trash_d(tmp_path, root, trash)
        monkeypatch.undo()
        assert sorted(p.name for p in victim.rglob("*")) == ["deep.txt", "precious.db", "sub"]
        assert (trash / "d" / "user.txt").read_text() == "the user's\n"
        assert (trash / "d" / "sub" / "deep.txt").read_text() == "deep\n"
    finally:
        shutil.rmtree(trash)


def test_a_directory_moved_across_keeps_its_links_special_files_modes_and_times(
    tmp_path: Path,
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        root = tmp_path / "ds"
        (root / "d" / "ro").mkdir(parents=True)
        (root / "d" / "ro" / "f").write_bytes(b"x" * 100_000)
        os.chmod(root / "d" / "ro" / "f", 0o640)
        os.utime(root / "d" / "ro" / "f", ns=(1, 1_600_000_000_123_456_789))
        (root / "d" / "abs").symlink_to("/etc/passwd")
        os.mkfifo(root / "d" / "pipe")
        os.chmod(root / "d" / "ro", 0o555)
        os.utime(root / "d" / "ro", ns=(1, 1_500_000_000_000_000_000))
        assert _trash_d(tmp_path, root, trash) is None
        assert not (root / "d").exists()
        st = os.stat(trash / "d" / "ro" / "f")
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
        assert (trash / "d" / "ro" / "f").read_bytes() == b"x" * 100_000
        assert os.readlink(trash / "d" / "abs") == "/etc/passwd"
        assert stat.S_ISFIFO(os.lstat(trash / "d" / "pipe").st_mode)
        st = os.stat(trash / "d" / "ro")
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o555, 1_500_000_000_000_000_000)
    finally:
        for p in trash.rglob("*"):
            if p.is_dir() and not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(trash)


def test_a_sparse_file_moved_across_keeps_its_holes(tmp_path: Path) -> None:
    """A user's 4 GiB sparse file with two 1 MiB runs of data, trashed to another file
    system, arrives with the same bytes and about its 2 MiB of data blocks, not 4 GiB."""
    trash = _shm_trash(tmp_path)
    try:
        root = tmp_path / "ds"
        (root / "d").mkdir(parents=True)
        sparse, size = root / "d" / "sparse.img", 4 << 30
        with open(sparse, "wb") as f:
            f.write(b"a" * (1 << 20))
            f.seek(3 << 30)
            f.write(b"b" * (1 << 20))
            f.truncate(size)
        if os.stat(sparse).st_blocks * 512 > 64 << 20:
            pytest.skip("the test's file system does not keep holes")
        assert _trash_d(tmp_path, root, trash) is None
        moved = trash / "d" / "sparse.img"
        st = os.stat(moved)
        assert st.st_size == size
        assert st.st_blocks * 512 <= 16 << 20  # 2 MiB of data and the file system's slack
        with open(moved, "rb") as f:
            assert f.read(1 << 20) == b"a" * (1 << 20)
            assert f.read(1 << 20) == bytes(1 << 20)
            f.seek(3 << 30)
            assert f.read(1 << 20) == b"b" * (1 << 20)
            f.seek(size - 4096)
            assert f.read() == bytes(4096)
    finally:
        shutil.rmtree(trash)


def _killed_mid_copy(tmp_path: Path, root: Path, trash: Path, rel: str) -> None:
    """Trash `rel` in a child process that dies (as by SIGKILL: no cleanup runs) once the
    first MiB of a file's copy is written."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:

            def die_mid_copy(src: int, dst: int, size: int) -> None:
                os.pwrite(dst, os.pread(src, 1 << 20, 0), 0)
                os._exit(9)

            crossfs.copy_data = die_mid_copy  # type: ignore[assignment]
            writer = TreeWriter(open_root(tmp_path, ("ds",)), root, trash)
            writer.trash(rel)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


@pytest.mark.parametrize("rel", ["big.bin", "d"])
def test_a_move_killed_mid_copy_leaves_no_partial_copy_under_the_entry_s_name(
    tmp_path: Path, rel: str
) -> None:
    """Killed mid-copy, a cross-file-system move leaves the original whole and only a
    `.dm-moving-` leftover in the trash, never a cut copy under the entry's own name; the
    move run again puts the whole entry there."""
    trash = _shm_trash(tmp_path)
    try:
        root = tmp_path / "ds"
        (root / "d").mkdir(parents=True)
        data = os.urandom(3 << 20)
        (root / "big.bin").write_bytes(data)
        (root / "d" / "big.bin").write_bytes(data)
        _killed_mid_copy(tmp_path, root, trash, rel)
        assert (root / rel).exists()
        assert not (trash / rel).exists()
        assert [p.name[:11] for p in trash.iterdir()] == [".dm-moving-"]
        writer = TreeWriter(open_root(tmp_path, ("ds",)), root, trash)
        try:
            writer.trash(rel)
        finally:
            writer.close()
            os.close(writer.root_fd)
        assert not (root / rel).exists()
        whole = trash / rel if rel == "big.bin" else trash / rel / "big.bin"
        assert whole.read_bytes() == data
    finally:
        shutil.rmtree(trash)


# -- set-user-ID and set-group-ID bits and owners of copies in the trash ----------------------


def _setid_tree(root: Path) -> tuple[int, int]:
    """A local user's set-user-ID program, set-group-ID directory and FIFO in `root`; their
    uid and gid."""
    nobody = pwd.getpwnam("nobody")
    (root / "x" / "shared").mkdir(parents=True)
    for path in (root / "x" / "tool", root / "x" / "shared" / "tool"):
        path.write_bytes(b"\x7fELF not really\n")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        os.chmod(path, 0o6755)
    os.mkfifo(root / "x" / "shared" / "pipe")
    os.chown(root / "x" / "shared" / "pipe", nobody.pw_uid, nobody.pw_gid)
    os.chmod(root / "x" / "shared" / "pipe", 0o2644)
    os.chown(root / "x" / "shared", nobody.pw_uid, nobody.pw_gid)
    os.chmod(root / "x" / "shared", 0o2775)
    return nobody.pw_uid, nobody.pw_gid


def _trash_both(tmp_path: Path, trash: Path) -> None:
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", trash)
    try:
        writer.trash("x/tool")
        writer.trash("x/shared")
    finally:
        writer.close()
        os.close(writer.root_fd)


def _owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a file of another user")
def test_as_root_copies_in_the_trash_keep_their_owner_and_only_so_their_setid_bits(
    tmp_path: Path,
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        uid, gid = _setid_tree(tmp_path / "ds")
        run = trash / "run" / "proj"
        _trash_both(tmp_path, run)
        assert _owner_and_mode(run / "x" / "tool") == (uid, gid, 0o6755)  # never root's
        assert _owner_and_mode(run / "x" / "shared" / "tool") == (uid, gid, 0o6755)
        assert _owner_and_mode(run / "x" / "shared") == (uid, gid, 0o2775)
        assert _owner_and_mode(run / "x" / "shared" / "pipe") == (uid, gid, 0o2644)
        for made in (trash / "run", run, run / "x"):  # nobody else may look into the trash
            assert stat.S_IMODE(os.stat(made).st_mode) == 0o700, made
    finally:
        shutil.rmtree(trash)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a file of another user")
def test_copies_that_cannot_keep_their_owner_lose_their_setid_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash = _shm_trash(tmp_path)
    try:
        _setid_tree(tmp_path / "ds")
        monkeypatch.setattr(os, "geteuid", lambda: 4321)  # as if not root: no chown
        _trash_both(tmp_path, trash)
        monkeypatch.undo()
        me = os.getuid(), os.getgid()
        assert _owner_and_mode(trash / "x" / "tool") == (*me, 0o755)
        assert _owner_and_mode(trash / "x" / "shared" / "tool") == (*me, 0o755)
        assert _owner_and_mode(trash / "x" / "shared") == (*me, 0o775)
        assert _owner_and_mode(trash / "x" / "shared" / "pipe") == (*me, 0o644)
    finally:
        shutil.rmtree(trash)


def test_a_removed_directory_that_still_shows_links_is_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # overlayfs (a lower layer's directory, whose rename is EXDEV) still shows links on the
    # open directory after its `rmdir`: the move was taken for a failed one, the stage
    # failed, and the replica was marked failed, though the directory was whole in the trash.
    trash = _shm_trash(tmp_path)
    try:
        root = tmp_path / "ds"
        (root / "d").mkdir(parents=True)
        (root / "d" / "f").write_text("the user's\n")
        real = os.fstat

        def fstat(fd: int) -> os.stat_result:
            st = real(fd)
            if stat.S_ISDIR(st.st_mode) and st.st_nlink == 0:
                return os.stat_result((st.st_mode, st.st_ino, st.st_dev, 2, *tuple(st)[4:]))
            return st

        monkeypatch.setattr(os, "fstat", fstat)
        assert _trash_d(tmp_path, root, trash) is None
        monkeypatch.undo()
        assert not (root / "d").exists()
        assert (trash / "d" / "f").read_text() == "the user's\n"
    finally:
        shutil.rmtree(trash)
