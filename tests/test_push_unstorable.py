"""Push refuses, naming it, what a manifest cannot hold, before anything is published: a
version no reader accepts cannot be staged, and every later push of the dataset, which reads
it as its parent, would fail too."""

from __future__ import annotations

import json
import os
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from datamover.chunking.chunker import Chunker, ChunkerParams
from datamover.domain.manifest import Entry, Kind
from datamover.errors import InvalidInput
from datamover.repo.manifest import MAX_FILE_CHUNKS
from datamover.transfer import scan
from datamover.transfer.push import push
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


#: The smallest chunks a repository may have (`max_size` at its least, 1 KiB), so a file of
#: more chunks than a manifest holds for one file is 12 GiB, not 48 TiB.
_TINY_CHUNKS = ChunkerParams(
    min_size=64, avg_size=256, max_size=1024, normalization=1, small_file_limit=1024
)


async def _tiny_chunks(env: SiteEnv) -> None:
    """Give the bucket a repository config of `_TINY_CHUNKS` before anything is pushed."""
    config = {
        "format": 1,
        "hash": "blake3",
        "created": "2026-11-29T18:15:00.000000Z",
        "chunker": _TINY_CHUNKS.to_json(),
    }
    site = await env.open()
    try:
        await site.store.put("config", json.dumps(config).encode())
    finally:
        await site.close()


async def _keys(env: SiteEnv, prefix: str) -> list[str]:
    site = await env.open()
    try:
        return [info.key async for info in site.store.list(prefix)]
    finally:
        await site.close()


async def test_a_file_its_size_shows_too_large_for_a_manifest_is_refused_unread(
    make_site: MakeSite,
) -> None:
    # A file of more chunks than a segment can hold for it (12.6 million) was read and
    # uploaded whole, and only its segment was refused, with a message naming no file.
    # Its size alone proves it here: at 1 KiB at most a chunk, one byte more than that many.
    a = await make_site("site-a")
    await _tiny_chunks(a)
    root = a.data / "t"
    (root / "d").mkdir(parents=True)
    (root / "d" / "a.txt").write_text("small\n")
    size = MAX_FILE_CHUNKS * 1024 + 1
    huge = root / "d" / "huge.img"
    huge.touch()
    os.truncate(huge, size)  # sparse: reading it (12 GiB, 12.6 million chunks) takes hours
    if os.stat(huge).st_blocks > 2048:
        pytest.skip("this file system keeps no sparse files")
    said = _one_line_error(a, "push", "/proj/t", code=InvalidInput.exit_code)
    assert said == (
        f"'d/huge.img' has more chunks than a manifest can hold for one file "
        f"({MAX_FILE_CHUNKS}): {size} bytes, at least {MAX_FILE_CHUNKS + 1} chunks of at "
        "most 1024 bytes; split it into smaller files and push again"
    )
    assert _versions(a) == []
    assert await _keys(a, "manifests/") == []


async def test_a_file_whose_chunks_pass_the_bound_is_refused_as_it_is_read(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is lowered (`scan.MAX_FILE_CHUNKS`): the real one, 12.6 million chunks,
    takes a file of 12 GiB even at the smallest chunks a repository may have, and hours to
    read. A file whose size does not prove it too large is refused at its first chunk
    past the bound, before the version (or any segment) is written."""
    a = await make_site("site-a")
    await _tiny_chunks(a)
    root = a.data / "t"
    root.mkdir()
    data = random.Random(7).randbytes(32 << 10)
    (root / "f.bin").write_bytes(data)
    fd = os.open(root / "f.bin", os.O_RDONLY)
    try:
        count = sum(1 for _ in Chunker(_TINY_CHUNKS).chunks(fd, len(data)))
    finally:
        os.close(fd)
    assert len(data) // 1024 < count - 1  # the size alone does not prove it
    site = await a.open()
    try:
        monkeypatch.setattr(scan, "MAX_FILE_CHUNKS", count - 1)
        with pytest.raises(InvalidInput) as caught:
            await push(site, "/proj/t")
        assert caught.value.message == (
            f"'f.bin' has more chunks than a manifest can hold for one file ({count - 1}); "
            "split it into smaller files and push again"
        )
        assert await site.repo.version_ids("/proj/t") == []
        assert await _keys(a, "manifests/") == []
        monkeypatch.setattr(scan, "MAX_FILE_CHUNKS", count)  # exactly the bound: taken
        pushed = await push(site, "/proj/t")
        doc = await site.repo.resolve("/proj/t", pushed.version)
        [entry] = site.repo.iter_cached(await site.repo.prefetch(doc), check=True)
        assert len(entry.chunks) == count
    finally:
        await site.close()
