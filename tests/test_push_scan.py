"""The push scanner: what it takes for unchanged, and what it leaves open when a push fails."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import pytest

from datamover.errors import InvalidInput
from datamover.transfer.push import push
from datamover.transfer.scan import coarsened
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree

_S = 10**9
#: A push takes its tree as holding its version from a little before its walk
#: (`ctimes.SLACK`): a file changed just before it is read again by the next push.
_SLACK = 0.05


@pytest.mark.parametrize(
    ("local", "previous", "same"),
    [
        (1_700_000_000 * _S, 1_700_000_000 * _S + 999_999_999, True),  # 1 s
        (1_700_000_000 * _S, 1_700_000_001 * _S + 999_999_999, True),  # 2 s, on an even second
        (1_700_000_001 * _S, 1_700_000_002 * _S + 1, False),  # 2 s, but an odd second
        (1_700_000_000_123_400, 1_700_000_000_123_456, True),  # 100 ns
        (1_700_000_000_120_000_000, 1_700_000_000_129_999_999, True),  # 10 ms
        (1_700_000_000_120_000_001, 1_700_000_000_120_000_002, False),  # no granule's cut
        (1_700_000_001 * _S, 1_700_000_000 * _S + 1, False),  # later: a change
        (1_700_000_000 * _S, 1_700_000_000 * _S, False),  # equal: not asked
        (-2 * _S, -_S - _S // 2, True),  # before 1970 cut towards minus infinity
        (-_S, -_S - _S // 2, False),  # not towards zero
    ],
)
def test_coarsened_is_a_cut_to_a_granule(local: int, previous: int, same: bool) -> None:
    assert coarsened(local, previous) is same


def _set_mtimes(root: Path, mtime_ns: dict[str, int]) -> None:
    for rel, ns in mtime_ns.items():
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)


@pytest.mark.parametrize("granule", [1_000, _S, 2 * _S], ids=["1us", "1s", "2s"])
async def test_mtimes_a_coarser_file_system_cut_are_unchanged(
    make_site: MakeSite, granule: int
) -> None:
    """A tree staged from a version of nanosecond mtimes onto a file system of coarser ones
    (Lustre, ext4 with 128-byte inodes: 1 s; FAT: 2 s) holds each mtime cut down to its
    granule: a push there reads nothing and publishes nothing. An mtime that is no such cut
    is a change."""
    a = await make_site("site-a")
    src = a.data / "run1"
    make_tree(src)
    paths = sorted(src.rglob("*"))
    fine = {
        str(p.relative_to(src)): 1_700_000_000 * _S + 7_654_321 * n + 1 for n, p in enumerate(paths)
    }
    _set_mtimes(src, fine)
    site = await a.open()
    try:
        first = await push(site, "/proj/run1")
        assert first.files_read == first.files > 0 and first.dirs > 0 and first.symlinks > 0
        versions = await site.repo.version_ids("/proj/run1")

        cut = {rel: ns - ns % granule for rel, ns in fine.items()}
        assert all(cut[rel] != fine[rel] for rel in fine)
        _set_mtimes(src, cut)
        time.sleep(_SLACK)
        noop = await push(site, "/proj/run1")
        # Setting an mtime moves the ctime, so each file is read once (as one staged with
        # cut mtimes is not: the stage wrote it before its site's record of the tree); its
        # bytes are the version's, and the version is the answer.
        assert noop.unchanged and noop.version == first.version
        assert noop.files_read == first.files and noop.uploaded_bytes == 0
        assert await site.repo.version_ids("/proj/run1") == versions
        again = await push(site, "/proj/run1")  # what the cut mtimes stand for is kept
        assert again.unchanged and again.files_read == 0

        _set_mtimes(src, {"d01/lig0011.pdbqt": fine["d01/lig0011.pdbqt"] // _S * _S + _S})
        time.sleep(_SLACK)
        changed = await push(site, "/proj/run1")
        assert not changed.unchanged and changed.parent == first.version
        assert changed.files_read == 1

        _set_mtimes(src, {"d02": fine["d02"] // _S * _S + _S})
        dir_changed = await push(site, "/proj/run1")
        assert not dir_changed.unchanged and dir_changed.parent == changed.version
        assert dir_changed.files_read == 0
    finally:
        await site.close()


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def test_a_failed_push_leaves_no_descriptor_open(make_site: MakeSite) -> None:
    """A push refused deep in a tree closes the walk's descriptors (one per level) itself,
    not at the next full garbage collection, which a daemon runs seldom."""
    a = await make_site("site-a")
    deep = a.data / "run" / "/".join(["d"] * 40)
    deep.mkdir(parents=True)
    (deep / "f").write_text("data\n")
    (deep / "bad\x01name").write_text("data\n")
    site = await a.open()
    gc.collect()
    gc.disable()
    try:
        with pytest.raises(InvalidInput, match="invalid name"):
            await push(site, "/proj/run")  # the first opens what later pushes reuse
        before = _open_fds()
        for _ in range(3):
            with pytest.raises(InvalidInput, match="invalid name"):
                await push(site, "/proj/run")
        assert _open_fds() <= before + 2
    finally:
        gc.enable()
        await site.close()
