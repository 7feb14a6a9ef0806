"""The walk's directory listing: one short string per name, sorted as the names are, so a
directory of a million entries costs tens of MB, not a `DirEntry` and an `lstat` result
each; and its name checks (invalid names, Unicode collisions) over that listing."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datamover.errors import InvalidInput
from datamover.transfer.walk import Walker

_FILES = 5000


def _paths(root: Path, **kwargs: bool) -> list[str]:
    walker = Walker(str(root), strict=kwargs.pop("strict", True), **kwargs)
    try:
        return [e.path for e in walker]
    finally:
        walker.close()


def test_a_wide_directory_is_walked_in_bounded_memory_per_entry(tmp_path: Path) -> None:
    # Before: the listing held every DirEntry, and each kept the `lstat` result the walk
    # asked it for until the directory was done: about 800 bytes an entry (a re-stage of
    # 300,000 files in one directory peaked at 330 MB against 111 MB now).
    for i in range(_FILES):
        os.close(os.open(tmp_path / f"ligand_{i:08d}.pdbqt", os.O_CREAT | os.O_WRONLY, 0o644))
    for stat_files in (True, False):
        tracemalloc.start()
        try:
            walker = Walker(str(tmp_path), strict=True, stat_files=stat_files)
            count = sum(1 for _ in walker)
            walker.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert count == _FILES
        assert peak / _FILES < 200, (stat_files, peak / _FILES)


def test_the_walk_yields_names_in_order_with_prefixes_first(tmp_path: Path) -> None:
    for name in ("a b", "a", "ab", "a-", "b", "\u00e9", "Z"):
        (tmp_path / name).write_text(name)
    (tmp_path / "a.d").mkdir()
    (tmp_path / "a.d" / "x").write_text("x")
    (tmp_path / "link").symlink_to("a")
    assert _paths(tmp_path) == ["Z", "a", "a b", "a-", "a.d", "a.d/x", "ab", "b", "link", "\u00e9"]
    assert _paths(tmp_path, stat_files=False) == _paths(tmp_path)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("caf\u00e9", "cafe\u0301"),  # NFC and decomposed
        ("K", "\u212a"),  # the Kelvin sign normalises to an ASCII letter
        ("a\u0323\u0301", "a\u0301\u0323"),  # neither in NFC form, one NFC form
    ],
)
def test_names_that_collide_under_normalisation_are_refused_in_any_order(
    tmp_path: Path, first: str, second: str
) -> None:
    (tmp_path / first).write_text("1")
    (tmp_path / second).write_text("2")
    with pytest.raises(InvalidInput, match="collide under Unicode normalisation"):
        _paths(tmp_path)
    assert sorted(_paths(tmp_path, strict=False)) == sorted([first, second])


def test_a_special_file_does_not_collide_and_a_lone_decomposed_name_is_kept(
    tmp_path: Path,
) -> None:
    (tmp_path / "caf\u00e9").write_text("1")
    os.mkfifo(tmp_path / "cafe\u0301")
    (tmp_path / "na\u0308ive").write_text("2")  # not NFC, and nothing else normalises alike
    assert _paths(tmp_path) == ["caf\u00e9", "na\u0308ive"]


class _CountingEntries:
    """`os.scandir` whose entries count the calls that read their type (each an `lstat`
    where a file system leaves the type out of the listing)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.type_reads = 0

    def __call__(self, fd: int) -> Any:
        counter = self

        class Entry:
            def __init__(self, inner: os.DirEntry[str]) -> None:
                self.name = inner.name
                self._inner = inner

            def is_file(self, follow_symlinks: bool = True) -> bool:
                counter.type_reads += 1
                return self._inner.is_file(follow_symlinks=follow_symlinks)

            def is_dir(self, follow_symlinks: bool = True) -> bool:
                counter.type_reads += 1
                return self._inner.is_dir(follow_symlinks=follow_symlinks)

            def is_symlink(self) -> bool:
                counter.type_reads += 1
                return self._inner.is_symlink()

        class Listing:
            def __enter__(self) -> Iterator[Entry]:
                self._it = counter.real(fd)
                return (Entry(e) for e in self._it)

            def __exit__(self, *exc: object) -> None:
                self._it.close()

        return Listing()


def test_a_walk_that_looks_at_every_entry_reads_no_type_from_the_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: every listing read each entry's type, which on a file system that leaves it
    # out (XFS without ftype, some NFS and FUSE mounts) is an `lstat` of its own: stage
    # and verify, which `lstat` every entry anyway, made two per entry.
    for i in range(20):
        (tmp_path / f"f{i:02d}").write_text("x")
    (tmp_path / "d").mkdir()
    counting = _CountingEntries(os.scandir)
    monkeypatch.setattr(os, "scandir", counting)
    assert len(_paths(tmp_path, strict=False)) == 21  # stage's and verify's walk
    assert counting.type_reads == 0
    assert len(_paths(tmp_path)) == 21  # push's checks names, and so reads types
    assert counting.type_reads > 0
