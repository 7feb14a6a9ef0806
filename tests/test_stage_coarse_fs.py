"""Stage onto a file system of coarse timestamps (a real one: an ext4 of 128-byte inodes, on
a loop device, keeps whole seconds, as Lustre or NFS keep coarser ones than the file system
a version was pushed from): a directory or file whose mtime is the version's as this file
system stores it is left be by `TreeWriter.set_attrs`, as the plan and verify already
compare (`fsops.stored_mtime`), so a group-shared directory of another user is not given
an mtime it cannot be given.

Before: the mtime was compared to the version's nanoseconds exactly, which a coarse file
system never holds, so every stage set it again, and for another user's directory failed
(operation not permitted, exit 7) every time.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.transfer import fsops
from tests.fixtures_sites import MakeSite, cli_unprivileged

NS = 1_000_000_000
#: A version's mtime, with nanoseconds a file system of whole seconds does not keep.
T = 1_700_000_000_123_456_789
#: Root without the capabilities that let it ignore file permissions and ownership.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


@contextlib.contextmanager
def coarse_ext4(at: Path) -> Iterator[Path]:
    """A 16 MiB ext4 of 128-byte inodes (whole-second timestamps) loop-mounted at `at` for
    the block, always unmounted after. The tests run as root: a failed mkfs or mount is a
    failure, never a skip; so is a file system that turns out to keep nanoseconds."""
    image = at.with_name(at.name + ".img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    try:
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True
        )
        at.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(at)], check=True)
        try:
            probe = at / "probe"
            probe.touch()
            os.utime(probe, ns=(T, T))
            assert probe.stat().st_mtime_ns == T // NS * NS, "not a file system of whole seconds"
            probe.unlink()
            yield at
        finally:
            subprocess.run(["umount", str(at)], check=True)
    finally:
        image.unlink()


_SET_ATTRS = """
import os, sys
from pathlib import Path
from datamover.domain.manifest import Entry, Kind
from datamover.transfer import fsops

base, name, mode, mtime = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3], 8), int(sys.argv[4])
writer = fsops.TreeWriter(os.open(base, os.O_RDONLY | os.O_DIRECTORY), base)
writer.set_attrs(Entry(name, Kind.DIR, mode, mtime))
"""


def _set_attrs_unprivileged(base: Path, name: str, mode: int, mtime_ns: int) -> None:
    """`TreeWriter.set_attrs` of directory `base/name` as the entry says, in a process of
    root without its capabilities (so another user's directory is not its own)."""
    args = [str(base), name, oct(mode), str(mtime_ns)]
    proc = subprocess.run(
        [*UNPRIVILEGED, sys.executable, "-c", _SET_ATTRS, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# One that can be opened for reading (`set_attrs`), one that cannot (`_set_attrs_by_path`).
@pytest.mark.parametrize("mode", [0o777, 0o711], ids=["readable", "unreadable"])
def test_a_directory_of_another_user_at_the_versions_mtime_as_stored_is_left_be(
    tmp_path: Path, mode: int
) -> None:
    with coarse_ext4(tmp_path / "coarse") as base:
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, mode)
        os.utime(shared, ns=(T, T))  # stored: T's whole seconds
        os.chown(shared, 65534, 65534)
        # Before: "'shared': operation not permitted" (a utime the directory does not need).
        _set_attrs_unprivileged(base, "shared", mode, T)
        assert shared.stat().st_mtime_ns == T // NS * NS


def test_an_mtime_that_differs_on_a_coarse_file_system_is_still_set(tmp_path: Path) -> None:
    with coarse_ext4(tmp_path / "coarse") as base:
        own = base / "own"
        own.mkdir(mode=0o755)
        os.utime(own, ns=(T + 5 * NS, T + 5 * NS))
        _set_attrs_unprivileged(base, "own", 0o755, T)
        assert own.stat().st_mtime_ns == T // NS * NS
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert fsops.stored_mtime(fd)(T) == T // NS * NS  # the model the writer used
        finally:
            os.close(fd)


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_a_stage_onto_a_coarse_file_system_leaves_another_users_directory_be(
    make_site: MakeSite,
) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    (a.data / "ds" / "sub").mkdir(parents=True)
    (a.data / "ds" / "sub" / "f").write_text("data\n")
    for path in (a.data / "ds" / "sub" / "f", a.data / "ds" / "sub"):
        os.utime(path, ns=(T, T))
    assert a.cli("push", "/proj/ds").returncode == 0
    with coarse_ext4(b.data):
        assert b.cli("stage", "/proj/ds").returncode == 0
        sub = b.data / "ds" / "sub"
        assert sub.stat().st_mtime_ns == T // NS * NS
        os.chown(sub, 65534, 65534)  # a colleague's now, as the version has it
        proc = cli_unprivileged(b, "stage", "/proj/ds")
        # Before: exit 7, "'sub': operation not permitted", on every stage.
        assert proc.returncode == 0, proc.stderr
        assert (sub / "f").read_text() == "data\n"
