"""Stage's worker-process writer, called in this process: the parts a stage cannot show."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from datamover.chunking import codec
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.errors import Conflict, Corrupt
from datamover.transfer.fetch import plan_ranges
from datamover.transfer.fsops import TreeWriter, open_root
from datamover.transfer.writers import write_batch

PACK = bytes(32)


def _batch(files: dict[str, bytes]) -> tuple[list, list[bytes], list]:
    """One pack holding `files` raw, the ranges covering it, and the wire files."""
    blob = bytearray()
    wire = []
    for path, data in files.items():
        ref = ChunkRef(codec.digest(data), PACK, len(blob), len(data), len(data), codec.Codec.RAW)
        blob += data
        wire.append((path, 0o640, 1_600_000_000_123_456_789, (ref,), None))
    ranges = plan_ranges([w[3][0] for w in wire], 1 << 20, 1 << 30)
    return ranges, [bytes(blob[r.start : r.end]) for r in ranges], wire


def test_writes_files_with_mode_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "ds" / "d").mkdir(parents=True)
    ranges, blobs, wire = _batch({"d/a": b"alpha", "d/b": b"", "top": b"x" * 5000})
    # Nothing unlocked, nothing trashed.
    assert write_batch(str(tmp_path), ("ds",), ranges, blobs, wire) == ({}, [], 0)
    st = os.stat(tmp_path / "ds" / "d" / "a")
    assert (tmp_path / "ds" / "d" / "a").read_bytes() == b"alpha"
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_600_000_000_123_456_789)
    assert (tmp_path / "ds" / "top").read_bytes() == b"x" * 5000
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == ["a", "b", "d", "top"]


def test_a_bad_chunk_names_its_file_and_writes_nothing_torn(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    ranges, blobs, wire = _batch({"good": b"fine", "bad": b"precious"})
    blobs[0] = blobs[0][:-1] + b"X"
    with pytest.raises(Corrupt, match=r"'bad'.*corrupt"):
        write_batch(str(tmp_path), ("ds",), ranges, blobs, wire)
    assert list((tmp_path / "ds").iterdir()) == []  # verified before anything is written


def test_refuses_a_symlink_in_the_root_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "ds").symlink_to(elsewhere)
    with pytest.raises(Conflict, match="refusing to write through it"):
        open_root(tmp_path / "base", ("ds",), create=False)
    ranges, blobs, wire = _batch({"f": b"data"})
    with pytest.raises(Conflict):
        write_batch(str(tmp_path / "base"), ("ds",), ranges, blobs, wire)
    assert list(elsewhere.iterdir()) == []


def test_errors_keep_their_paths_across_processes() -> None:
    err = pickle.loads(pickle.dumps(Corrupt("'x/y': the data is corrupt", ["x/y"])))
    assert type(err) is Corrupt and err.message == "'x/y': the data is corrupt"
    assert err.paths == ["x/y"] and str(err) == err.message


def _other_file_system(tmp_path: Path) -> Path:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    return shm


def test_trash_on_another_file_system_copies_and_never_follows_a_swapped_symlink(
    tmp_path: Path,
) -> None:
    shm = _other_file_system(tmp_path)
    trash = Path(tempfile.mkdtemp(dir=shm, prefix="dm-trash-test-"))
    try:
        root = tmp_path / "ds"
        (root / "d" / "sub").mkdir(parents=True)
        (root / "d" / "x").write_text("mine")
        (root / "d" / "sub" / "y").write_text("deep")
        (root / "d" / "link").symlink_to("x")
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "x").write_text("not ours")
        writer = TreeWriter(open_root(tmp_path, ("ds",)), root, trash)
        try:
            writer.trash("d/sub")  # a directory: copied whole, then removed
            writer.trash("d/link")  # a symlink stays a symlink
            writer.dir_fd("d")  # the writer holds `d` open ...
            (root / "d").rename(root / "d-moved")  # ... when `d` is swapped for a symlink
            (root / "d").symlink_to(outside)
            writer.trash("d/x")
        finally:
            writer.close()
            os.close(writer.root_fd)
        assert (trash / "d" / "sub" / "y").read_text() == "deep"
        assert os.readlink(trash / "d" / "link") == "x"
        assert (trash / "d" / "x").read_text() == "mine"
        assert (outside / "x").read_text() == "not ours"  # never reached through the symlink
        assert sorted(p.name for p in (root / "d-moved").iterdir()) == []
        assert writer.trashed == ["d/sub", "d/link", "d/x"]
    finally:
        shutil.rmtree(trash)


# -- replacing a file: one exchange of names, then the old file unlinked --------------------


def _replacing(tmp_path: Path) -> tuple[TreeWriter, int, tuple[int, int, int]]:
    """A writer over `tmp_path/ds` holding `f` (old) and its replacement `.new` (new)."""
    from datamover.transfer import fsops

    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "f").write_text("old\n")
    (tmp_path / "ds" / ".new").write_text("new\n")
    writer = TreeWriter(open_root(tmp_path, ("ds",)), tmp_path / "ds", tmp_path / "trash")
    return writer, writer.dir_fd(""), fsops._identity(os.lstat(tmp_path / "ds" / "f"))


def _recording(monkeypatch: pytest.MonkeyPatch, refuse: int | None = None) -> list[int]:
    """Record the flags of every `renameat2`; with `refuse`, fail exchanges with it."""
    import ctypes

    from datamover.transfer import fsops

    flags: list[int] = []
    real = fsops._renameat2

    def renameat2(a: int, b: bytes, c: int, d: bytes, flag: int) -> int:
        flags.append(flag)
        if refuse is not None and flag == fsops._RENAME_EXCHANGE:
            ctypes.set_errno(refuse)
            return -1
        return real(a, b, c, d, flag)

    monkeypatch.setattr(fsops, "_renameat2", renameat2)
    return flags


def test_a_replaced_file_is_exchanged_and_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamover.transfer import fsops

    writer, dfd, seen = _replacing(tmp_path)
    flags = _recording(monkeypatch)
    try:
        writer.rename_into_place(".new", "f", dfd, seen)
    finally:
        os.close(writer.root_fd)
    assert flags == [fsops._RENAME_EXCHANGE]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["f"]
    assert (tmp_path / "ds" / "f").read_text() == "new\n"
    assert writer.trashed_count == 0


def test_a_file_system_without_exchange_renames_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    writer, dfd, seen = _replacing(tmp_path)
    flags = _recording(monkeypatch, refuse=errno.EINVAL)  # NFS, Lustre
    try:
        writer.rename_into_place(".new", "f", dfd, seen)
        assert not writer._exchange  # not asked again by this writer
    finally:
        os.close(writer.root_fd)
    assert len(flags) == 1
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["f"]
    assert (tmp_path / "ds" / "f").read_text() == "new\n"


def _replace_after_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], None]
) -> TreeWriter:
    """Replace `ds/f` by `ds/.new` (`_replacing`), with `change(ds)` made by a user just
    after `make_way` looked at `f` and before the new file takes its name."""
    writer, dfd, seen = _replacing(tmp_path)
    real = TreeWriter.make_way

    def make_way(self: TreeWriter, rel: str, dfd: int, replaces: object) -> None:
        real(self, rel, dfd, replaces)  # type: ignore[arg-type]
        change(tmp_path / "ds")

    monkeypatch.setattr(TreeWriter, "make_way", make_way)
    try:
        writer.rename_into_place(".new", "f", dfd, seen)
    finally:
        os.close(writer.root_fd)
    return writer


def test_a_directory_that_took_the_name_after_the_look_goes_to_the_trash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make_way` saw the file; a user's directory took its name before the exchange: the
    exchange swaps file and directory, the unlink refuses the directory, and it is swapped
    back and moved to the trash, never removed."""

    def change(ds: Path) -> None:
        (ds / "f").unlink()
        (ds / "f").mkdir()
        (ds / "f" / "mine").write_text("a user's\n")

    writer = _replace_after_a_change(tmp_path, monkeypatch, change)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["f"]
    assert (tmp_path / "ds" / "f").read_text() == "new\n"
    assert (tmp_path / "trash" / "f" / "mine").read_text() == "a user's\n"
    assert writer.trashed == ["f"]


@pytest.mark.parametrize("how", ["saved into", "renamed over"])
def test_a_file_a_user_changed_after_the_look_goes_to_the_trash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """`make_way` saw the file as the walk did; a user saved into it (or renamed a new
    file onto its name) before the exchange: the file the exchange took out is not the
    one the walk saw, so it goes to the trash, not away."""

    def change(ds: Path) -> None:
        if how == "saved into":
            (ds / "f").write_text("a user's newer save\n")
        else:
            (ds / ".save").write_text("a user's newer save\n")
            (ds / ".save").rename(ds / "f")

    writer = _replace_after_a_change(tmp_path, monkeypatch, change)
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["f"]
    assert (tmp_path / "ds" / "f").read_text() == "new\n"
    assert (tmp_path / "trash" / "f").read_text() == "a user's newer save\n"
    assert writer.trashed == ["f"]


@pytest.mark.parametrize("saves", [1, 5])
@pytest.mark.parametrize("how", ["renamed", "linked"])
def test_a_user_saving_again_at_a_new_files_path_after_its_move_keeps_every_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saves: int, how: str
) -> None:
    """Where the walk saw nothing, a user's file found at the rename goes to the trash;
    before, one saved again between that move and the rename was taken out by an exchange
    and unlinked. Now the rename is tried again without replacing, and each save goes to
    the trash (`f`, `f~1`, ...); a path saved again at every try is left as it is. The
    same for a file written unnamed and linked at its path (`write_file`), which leaves no
    temporary name either way."""
    ds = tmp_path / "ds"
    ds.mkdir()
    root_fd = open_root(tmp_path, ("ds",), create=False)
    writer = TreeWriter(root_fd, ds, tmp_path / "trash")
    real = TreeWriter.trash
    later = iter(f"save {i}\n" for i in range(2, saves + 2))

    def trash_then_user_saves(self: TreeWriter, rel: str) -> None:
        real(self, rel)
        for text in later:
            (ds / rel).write_text(text)
            break

    monkeypatch.setattr(TreeWriter, "trash", trash_then_user_saves)
    (ds / "f").write_text("save 1\n")
    (ds / ".new").write_text("version\n")
    dfd = os.open(ds, os.O_RDONLY | os.O_DIRECTORY)

    def place() -> None:
        if how == "renamed":
            writer.rename_into_place(".new", "f", dfd, None)
        else:
            (ds / ".new").unlink()
            writer.write_file(Entry("f", Kind.FILE, 0o644, 0), [b"version\n"])

    try:
        if saves == 1:
            place()
        else:
            with pytest.raises(Conflict, match="saved again each time"):
                place()
    finally:
        os.close(dfd)
        writer.close()
        os.close(root_fd)
    kept = sorted(p.read_text() for p in (tmp_path / "trash").iterdir())
    if saves == 1:
        assert (ds / "f").read_text() == "version\n"
        assert kept == ["save 1\n", "save 2\n"]
    else:
        assert (ds / "f").read_text() == "save 4\n"  # the last save, left in place
        assert kept == ["save 1\n", "save 2\n", "save 3\n"]
    if how == "linked":
        assert [p.name for p in ds.iterdir()] == ["f"]


def test_a_batch_for_a_dataset_directory_put_in_the_stages_ones_place_is_refused(
    tmp_path: Path,
) -> None:
    """A worker opens the dataset's directory again by path: one renamed away and replaced
    by another directory since the stage opened it got the worker's files, the stage's own
    writes the old one, and the stage ended "ready" over a tree missing files."""
    (tmp_path / "ds").mkdir()
    st = os.stat(tmp_path / "ds")
    (tmp_path / "ds").rename(tmp_path / "ds.old")
    (tmp_path / "ds").mkdir()
    ranges, blobs, files = _batch({"f": b"data\n"})
    with pytest.raises(Conflict, match="was replaced while stage wrote it"):
        write_batch(str(tmp_path), ("ds",), ranges, blobs, files, root_id=(st.st_dev, st.st_ino))
    assert list((tmp_path / "ds").iterdir()) == []
    # the directory it opened: written
    st = os.stat(tmp_path / "ds")
    write_batch(str(tmp_path), ("ds",), *_batch({"f": b"data\n"}), root_id=(st.st_dev, st.st_ino))
    assert (tmp_path / "ds" / "f").read_bytes() == b"data\n"
