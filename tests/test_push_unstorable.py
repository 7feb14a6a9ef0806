"""Push refuses, naming it, what a manifest cannot hold, before anything is published: a
version no reader accepts cannot be staged, and every later push of the dataset, which reads
it as its parent, would fail too."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from datamover.domain.manifest import Entry, Kind
from datamover.errors import InvalidInput
from datamover.transfer.scan import check_storable
from tests.fixtures_sites import MakeSite, SiteEnv

#: 2500-01-01T00:00:00Z, beyond a signed 64-bit count of nanoseconds (ext4 keeps 2446).
FAR = 16725225600 * 10**9


def _one_line_error(env: SiteEnv, *args: str, code: int) -> str:
    """Run a CLI command expected to fail with `code`; its one stderr line, prefix cut."""
    r = env.cli(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("datamover: error: "), line
    return line.removeprefix("datamover: error: ")


def _stored_time(path: Path) -> str:
    """The mtime this file system kept for `path`, as a push's message gives it."""
    seconds = os.lstat(path).st_mtime_ns // 10**9
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
async def test_an_mtime_a_manifest_cannot_hold_is_refused(make_site: MakeSite, kind: str) -> None:
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "t"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "f").write_text("data\n")
    (root / "dir" / "l").symlink_to("f")
    first = a.cli_json("push", "/proj/t")
    odd = {"file": "dir/f", "directory": "dir", "symlink": "dir/l"}[kind]
    os.utime(root / odd, ns=(FAR, FAR), follow_symlinks=False)
    assert os.lstat(root / odd).st_mtime_ns >= 1 << 63  # past 2262-04-11 where it is kept
    touch = "touch -h" if kind == "symlink" else "touch"
    said = _one_line_error(a, "push", "/proj/t", code=InvalidInput.exit_code)
    assert said == (
        f"mtime of {odd!r} is {_stored_time(root / odd)}, outside what a manifest can hold "
        f"(1677-09-21..2262-04-11); give it another time ({touch}) and push again"
    )
    assert _versions(a) == [first["version"]]  # nothing published
    staged = b.cli_json("stage", "/proj/t")  # the latest is still a version readers take
    assert staged["version"] == first["version"]
    os.utime(root / odd, ns=(10**18, 10**18), follow_symlinks=False)  # 2001
    again = a.cli_json("push", "/proj/t")
    assert again["parent"] == first["version"] and not again["unchanged"]
    assert b.cli_json("stage", "/proj/t")["version"] == again["version"]


def _versions(env: SiteEnv, dataset: str = "/proj/t") -> list[str]:
    """The ids `ls` lists for `dataset`."""
    listing = env.cli_json("ls", dataset)
    assert listing["errors"] == []
    return [v["version"] for d in listing["datasets"] for v in d["versions"]]


async def test_a_first_push_with_such_an_mtime_publishes_nothing(make_site: MakeSite) -> None:
    a = await make_site("site-a")
    (a.data / "t").mkdir()
    (a.data / "t" / "f").write_text("data\n")
    os.utime(a.data / "t" / "f", ns=(FAR, FAR))
    said = _one_line_error(a, "push", "/proj/t", code=InvalidInput.exit_code)
    assert said.startswith("mtime of 'f' is ")
    assert _versions(a) == []


@pytest.mark.parametrize(
    ("mtime_ns", "shown"),
    [
        ((1 << 63), "2262-04-11T23:47:16Z"),
        (-(1 << 63) - 1, "1677-09-21T00:12:43Z"),
        (-(10**11) * 10**9, "-100000000000 s from 1970-01-01T00:00:00Z"),
        (10**12 * 10**9, "1000000000000 s from 1970-01-01T00:00:00Z"),
    ],
)
def test_the_walks_entries_are_checked_at_both_ends(mtime_ns: int, shown: str) -> None:
    for kind in Kind:
        entry = Entry("d/x", kind, 0o755, mtime_ns)
        with pytest.raises(InvalidInput) as caught:
            check_storable(entry)
        assert caught.value.message.startswith(f"mtime of 'd/x' is {shown}, outside ")
        assert caught.value.paths == ["d/x"]
    for fine in (-(1 << 63), (1 << 63) - 1, 0):
        check_storable(Entry("d/x", Kind.FILE, 0o644, fine))


def _deep(root: Path, depth: int) -> None:
    """Directories `depth` levels deep below `root`, named 255 bytes each, a file at the
    bottom (made from each parent's descriptor: no path this long can be opened)."""
    name = "d" * 255
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


async def test_a_path_longer_than_a_manifest_holds_is_refused(make_site: MakeSite) -> None:
    # 257 levels of 255-byte names make a path of 65,791 bytes; a reader takes 65,536. The
    # walk opens each directory from its parent, so nothing on the way stops it.
    a, b = await make_site("site-a"), await make_site("site-b")
    root = a.data / "deep"
    root.mkdir()
    _deep(root, 257)
    said = _one_line_error(a, "push", "/proj/deep", code=InvalidInput.exit_code)
    name = "d" * 255
    assert said == (
        f"path '{name}/{name}/.../{name}/{name}' (257 components) is 65791 bytes long, "
        "more than a manifest can hold (65536); make the tree shallower or its names "
        "shorter and push again"
    )
    assert _versions(a, "/proj/deep") == []
    shutil.rmtree(root / name / name)
    _deep(root / name, 254)  # 'd.../f' 255 levels down: 65,281 bytes
    pushed = a.cli_json("push", "/proj/deep")
    assert pushed["dirs"] == 255 and pushed["files"] == 1
    assert b.cli_json("stage", "/proj/deep")["version"] == pushed["version"]  # readable
