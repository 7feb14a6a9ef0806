"""Stage writes a new file without a name (`O_TMPFILE`) and links it at its path once it is
complete: no temporary name, no rename; the named way where the file system cannot."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.domain.manifest import Entry, Kind
from datamover.transfer import fsops
from datamover.transfer.fsops import TreeWriter, open_root

MTIME = 1_600_000_000_123_456_789


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "ds" / "d").mkdir(parents=True)
    yield tmp_path / "ds"


def _writer(ds: Path) -> TreeWriter:
    return TreeWriter(open_root(ds.parent, (ds.name,), create=False), ds, ds.parent / "trash")


def _close(writer: TreeWriter) -> None:
    writer.close()
    os.close(writer.root_fd)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _entry(path: str, mode: int = 0o640) -> Entry:
    return Entry(path, Kind.FILE, mode, MTIME, 0)


def test_a_new_file_has_no_name_until_it_is_complete(
    ds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real = TreeWriter._link_into_place

    def looking(self: TreeWriter, fd: int, rel: str, dfd: int) -> bool:
        st = os.fstat(fd)
        seen.append((_names(ds / "d"), st.st_size, st.st_mtime_ns, st.st_nlink))
        return real(self, fd, rel, dfd)

    monkeypatch.setattr(TreeWriter, "_link_into_place", looking)
    renamed: list[str] = []
    monkeypatch.setattr(TreeWriter, "rename_into_place", lambda *a: renamed.append(a[2]))
    writer = _writer(ds)
    try:
        writer.write_file(_entry("d/f"), [b"complete\n"])
        writer.write_file(_entry("d/g", 0o755), [b"abc", b"def"])
    finally:
        _close(writer)
    # Complete, with its mtime, and at no name while it was written.
    assert seen == [([], 9, MTIME, 0), (["f"], 6, MTIME, 0)]
    assert renamed == []
    assert _names(ds / "d") == ["f", "g"]
    assert (ds / "d" / "f").read_bytes() == b"complete\n"
    assert (ds / "d" / "g").read_bytes() == b"abcdef"
    st = os.stat(ds / "d" / "g")
    assert (st.st_mode & 0o7777, st.st_mtime_ns, st.st_nlink) == (0o755, MTIME, 1)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000, 0o777])
@pytest.mark.parametrize("mode", [0o644, 0o755, 0o600, 0o000, 0o444, 0o1755, 0o2750, 0o4755])
def test_every_mode_is_kept_whatever_the_umask(ds: Path, umask: int, mode: int) -> None:
    """Whatever umask the writer was made under, or the process has by the time it writes."""
    before = os.umask(0o022)
    try:
        writer = _writer(ds)
        os.umask(umask)
        writer.write_file(_entry("d/f", mode), [b"data\n"])
    finally:
        os.umask(before)
        _close(writer)
    st = os.stat(ds / "d" / "f")
    assert st.st_mode & 0o7777 == mode
    assert (ds / "d" / "f").read_bytes() == b"data\n"


def _default_acl(*entries: tuple[int, int]) -> bytes:
    """A POSIX ACL as the kernel's xattr holds it: version 2, then (tag, permissions, id)."""
    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries
    )


def test_a_default_acl_does_not_change_the_modes(ds: Path) -> None:
    """A directory with a default ACL masks a new file's mode with it instead of the umask
    (`other::---` takes 0o644 to 0o640): the mode is set after the file is made."""
    user_obj, group_obj, other = 0x01, 0x04, 0x20
    try:
        os.setxattr(
            ds / "d",
            "system.posix_acl_default",
            _default_acl((user_obj, 7), (group_obj, 5), (other, 0)),
        )
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on the test directory's file system: {exc}")
    writer = _writer(ds)
    try:
        writer.write_file(_entry("d/f", 0o644), [b"data\n"])
        writer.write_file(_entry("d/x", 0o755), [b"data\n"])
    finally:
        _close(writer)
    modes = {p.name: p.stat().st_mode & 0o7777 for p in (ds / "d").iterdir()}
    assert modes == {"f": 0o644, "x": 0o755}


def test_a_file_system_without_unnamed_files_gets_temporary_names(
    ds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refuses the unnamed open (as NFS and Lustre do with EOPNOTSUPP; here
    EINVAL, for `O_TMPFILE` without write access): the file is written under a temporary
    name and renamed, and the writer does not try again."""
    monkeypatch.setattr(fsops, "_UNNAMED_FILE", os.O_TMPFILE | os.O_RDONLY | os.O_CLOEXEC)
    renamed: list[str] = []
    real = TreeWriter.rename_into_place

    def spy(self: TreeWriter, tmp: str, rel: str, dfd: int, replaces: object) -> None:
        renamed.append(rel)
        real(self, tmp, rel, dfd, replaces)  # type: ignore[arg-type]

    monkeypatch.setattr(TreeWriter, "rename_into_place", spy)
    writer = _writer(ds)
    try:
        writer.write_file(_entry("d/f"), [b"one\n"])
        assert not writer._unnamed
        writer.write_file(_entry("d/g"), [b"two\n"])
    finally:
        _close(writer)
    assert renamed == ["d/f", "d/g"]
    assert (ds / "d" / "f").read_text() == "one\n" and (ds / "d" / "g").read_text() == "two\n"
    assert _names(ds / "d") == ["f", "g"]


def test_a_refused_link_writes_the_file_again_named(
    ds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `/proc` to name the file through (a container without it): the link fails, the
    file is written again under a temporary name, and the writer stops trying."""
    monkeypatch.setattr(fsops, "_PROC_FD", str(ds.parent / "no-proc"))
    writer = _writer(ds)
    try:
        writer.write_file(_entry("d/f", 0o600), [b"content\n"])
        assert not writer._unnamed
    finally:
        _close(writer)
    assert _names(ds / "d") == ["f"]
    st = os.stat(ds / "d" / "f")
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o600, MTIME)
    assert (ds / "d" / "f").read_text() == "content\n"


def test_a_full_disk_at_the_link_is_named_and_leaves_nothing(
    ds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room for the directory entry: the error names the file, and the unnamed file
    goes with its descriptor (not written again under a temporary name)."""
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    writer = _writer(ds)
    monkeypatch.setattr(fsops.os, "link", full)
    try:
        with pytest.raises(OSError) as caught:
            writer.write_file(_entry("d/f"), [b"content\n"])
    finally:
        monkeypatch.undo()
        _close(writer)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(ds / "d" / "f")
    assert writer._unnamed and _names(ds / "d") == []
