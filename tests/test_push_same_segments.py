"""A re-push takes the previous segments the walk found unchanged as wholes (`SameSegment`):
not an entry at a time, and as the parent cut them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from datamover.chunking.chunker import ChunkerParams
from datamover.domain.manifest import Kind
from datamover.domain.paths import sort_key
from datamover.repo.manifest import SegmentRef
from datamover.site import Site
from datamover.transfer import readers
from datamover.transfer.push import _parent_manifest, _previous, push
from datamover.transfer.scan import Done, SameSegment, Scanner
from datamover.transfer.stage import stage
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree, snapshot


async def _parent_refs(site: Site, dataset: str) -> list[SegmentRef]:
    doc = await site.repo.read_version(dataset, await site.repo.latest(dataset) or "")
    refs = await _parent_manifest(site, doc)
    assert refs is not None
    return refs


def _scan(site: Site, tree: Path, refs: list[SegmentRef], marked: bool = True) -> list[object]:
    """Every piece but chunks a scan of `tree` against the manifest `refs` gives."""
    root, held = readers.anchor(str(tree.parent), (tree.name,))
    scanner = Scanner(root, _previous(site.repo, [], refs, marked), ChunkerParams())
    try:
        pieces: list[object] = []
        while batch := scanner.next_batch():
            pieces.extend(p for p in batch if isinstance(p, (Done, SameSegment)))
        return pieces
    finally:
        scanner.close()
        os.close(held)


def _whole(pieces: list[object]) -> list[SegmentRef]:
    return [p.ref for p in pieces if isinstance(p, SameSegment)]


def _paths(pieces: list[object]) -> list[str]:
    out: list[str] = []
    for p in pieces:
        if isinstance(p, SameSegment):
            out.extend(e.path for e in p.entries)
        elif isinstance(p, Done):
            out.append(p.entry.path)
    return out


def _after(path: str) -> str:
    """A name sorting right after the file at `path` and before whatever followed it."""
    return path + "~"


async def test_the_scan_gives_each_unchanged_segment_whole(make_site: MakeSite) -> None:
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=200)  # 227 entries, >= 40 segments
    site = await a.open()
    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        assert len(refs) >= 40
        everything = _scan(site, src, refs)
        assert _whole(everything) == refs  # no entry alone
        paths = _paths(everything)
        assert len(paths) == 227 and paths == sorted(paths, key=lambda p: p.split("/"))
        # Without the marks (a heal pass) the same walk is an entry at a time.
        unmarked = _scan(site, src, refs, marked=False)
        assert _whole(unmarked) == [] and _paths(unmarked) == paths
        assert all(isinstance(p, Done) and p.same for p in unmarked)

        # Four segments of files: one with a file rewritten inside it, one whose first
        # entry is gone, one whose last entry is gone, and one after which a file is added
        # before the next segment.
        files = [
            i
            for i, r in enumerate(refs[:-1])
            if r.entries > 2
            and r.first_path.endswith(".pdbqt")
            and r.last_path.endswith(".pdbqt")
            and r.last_path.split("/")[0] == refs[i + 1].first_path.split("/")[0]
        ]
        assert len(files) > 10
        changed, emptied, followed, ended = files[1], files[4], files[7], files[10]
        inside = [p for p in paths if refs[changed].first_path < p < refs[changed].last_path]
        (src / inside[0]).write_text("rewritten\n")
        (src / refs[emptied].first_path).unlink()
        (src / refs[ended].last_path).unlink()
        (src / _after(refs[followed].last_path)).write_text("added\n")
        touched_dirs = {
            refs[i].first_path.split("/")[0] for i in (emptied, followed, ended)
        }  # their mtimes moved
        for d in touched_dirs:
            os.utime(src / d, ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))

        after = _scan(site, src, refs)
        whole = _whole(after)
        touched = {
            r
            for r in refs
            if any(
                sort_key(r.first_path) <= sort_key(d) <= sort_key(r.last_path) for d in touched_dirs
            )
        }
        # Every other segment comes whole, those after a segment's last entry went too.
        assert set(refs) - set(whole) == {refs[changed], refs[emptied], refs[ended]} | touched
        assert refs[followed] in whole and refs[followed + 1] in whole
        assert refs[ended + 1] in whole
        assert len(_paths(after)) == 226  # two files gone, one added
    finally:
        await site.close()


async def test_an_unchanged_tree_is_its_version_whatever_segment_size_is_set(
    make_site: MakeSite, segment_encodes: list[int]
) -> None:
    """Segments of the parent are taken whole as it cut them: a site whose
    `segment_entries` changed (or a tree pushed elsewhere with another) publishes nothing
    for a tree that did not change, and encodes no segment."""
    encoded = segment_encodes
    a, b = await make_site("site-a", segment_entries=8), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src, files=200)
    site = await a.open()
    try:
        first = await push(site, "/proj/run1")
        assert max(encoded) <= 8 and len(encoded) >= 40
    finally:
        await site.close()
    a.config_path.write_text(
        a.config_path.read_text().replace("segment_entries = 8", "segment_entries = 64")
    )
    encoded.clear()
    site, site_b = await a.open(), await b.open()
    try:
        assert site.config.transfer.segment_entries == 64
        again = await push(site, "/proj/run1")
        assert again.unchanged and again.version == first.version and encoded == []
        assert (again.files, again.dirs, again.symlinks, again.bytes) == (
            first.files,
            first.dirs,
            first.symlinks,
            first.bytes,
        )
        assert again.files_read == 0 and again.uploaded_bytes == 0

        # A change: its segment is cut again by the new rule, and what follows it until
        # a cut falls where the parent's did; the tree published is the tree.
        time.sleep(0.05)
        (src / "d05" / "lig0055.pdbqt").write_text("changed\n")
        changed = await push(site, "/proj/run1")
        assert not changed.unchanged and changed.files_read == 1
        assert len(encoded) >= 1 and sum(encoded) < 227
        await stage(site_b, "/proj/run1")
        assert snapshot(b.data / "run1") == snapshot(src)
    finally:
        await site.close()
        await site_b.close()


async def test_kinds_are_counted_in_segments_taken_whole(make_site: MakeSite) -> None:
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=60)
    for i in range(30):  # segments of symlinks and of directories alone
        (src / "links").mkdir(exist_ok=True)
        (src / "links" / f"l{i:02d}").symlink_to(f"../d00/lig000{i % 10}.pdbqt")
        (src / "dirs" / f"e{i:02d}").mkdir(parents=True)
    site = await a.open()
    try:
        first = await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        whole = [p for p in _scan(site, src, refs) if isinstance(p, SameSegment)]
        kinds = {e.kind for p in whole for e in p.entries if p.counts()[0] == 0}
        assert {Kind.DIR, Kind.SYMLINK} <= kinds
        noop = await push(site, "/proj/run1")
        assert noop.unchanged
        assert (noop.files, noop.dirs, noop.symlinks, noop.bytes) == (
            first.files,
            first.dirs,
            first.symlinks,
            first.bytes,
        )
        assert first.symlinks == 32 and first.dirs >= 38
    finally:
        await site.close()
