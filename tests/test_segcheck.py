"""Previous segments found unchanged by worker processes (`segcheck`, `Scanner.check_ahead`):
the walk passes over them, and the pieces are those of a walk without workers."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import pytest

from datamover.chunking.chunker import ChunkerParams
from datamover.domain.manifest import Entry, Kind
from datamover.domain.paths import sort_key
from datamover.errors import Corrupt, InvalidInput
from datamover.repo.manifest import SegmentRef
from datamover.site import Site
from datamover.transfer import procpool, readers, scan, segcheck
from datamover.transfer.push import _parent_manifest, _previous, push
from datamover.transfer.scan import Done, Passed, SameSegment, Scanner, Unchanged
from datamover.transfer.stage import stage
from datamover.transfer.walk import Walker
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree, snapshot

# -- the walk's skip ----------------------------------------------------------------------


def _tree(root: Path, seed: int) -> None:
    """Nested directories, files, empty directories and symlinks, some names sorting
    between others' components (`a`, `a-b`, `a~`)."""
    rng = random.Random(seed)
    names = ["a", "a-b", "a~", "b", "c0", "c1", "z"]
    for i in range(rng.randint(20, 60)):
        depth = rng.randint(1, 4)
        parts = [rng.choice(names) for _ in range(depth)]
        path = root.joinpath(*parts)
        if path.exists() or path.is_symlink():
            continue
        if any(p.is_file() or p.is_symlink() for p in [*path.parents, path] if p != root):
            continue
        kind = rng.random()
        if kind < 0.6:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{i}\n")
        elif kind < 0.85:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to("a")


def _walk(
    root: Path,
    bound: tuple[str, ...] | None = None,
    inclusive: bool = False,
    stop: tuple[str, ...] | None = None,
) -> list[str]:
    walker = Walker(str(root), strict=True, stat_files=False)
    try:
        if bound is not None:
            walker.skip(bound, inclusive)
        if stop is not None:
            walker.stop_after(stop)
        return [e.path for e in walker]
    finally:
        walker.close()


@pytest.mark.parametrize("seed", range(12))
def test_a_skip_passes_exactly_the_entries_before_its_bound(tmp_path: Path, seed: int) -> None:
    _tree(tmp_path, seed)
    everything = _walk(tmp_path)
    assert len(everything) > 5
    keys = [sort_key(p) for p in everything]
    # Bounds at entries and between them (a name that is not there).
    bounds = [*keys, *((*k[:-1], k[-1] + "0") for k in keys), ("a", "zz"), ("0",), ("zz",)]
    for bound in bounds:
        for inclusive in (False, True):
            pairs = zip(everything, keys, strict=True)
            want = [p for p, k in pairs if k > bound or (k == bound and not inclusive)]
            assert _walk(tmp_path, bound, inclusive) == want, (bound, inclusive)
        stop = [p for p, k in zip(everything, keys, strict=True) if k <= bound]
        assert _walk(tmp_path, stop=bound) == stop, bound


def test_a_skip_asked_mid_walk_passes_a_directory_just_yielded(tmp_path: Path) -> None:
    for d in ("a", "a/x", "b"):
        (tmp_path / d).mkdir()
    for f in ("a/1", "a/x/2", "a/x/3", "b/4", "c"):
        (tmp_path / f).write_text(f)
    for bound, inclusive, rest in [
        (("a",), True, ["a/1", "a/x", "a/x/2", "a/x/3", "b", "b/4", "c"]),  # below it: walked
        (("a", "x", "2"), True, ["a/x/3", "b", "b/4", "c"]),  # into it, unseen
        (("a", "x", "3"), True, ["b", "b/4", "c"]),
        (("b",), False, ["b", "b/4", "c"]),  # past all of it: not listed
    ]:
        walker = Walker(str(tmp_path), strict=True, stat_files=False)
        try:
            assert next(walker).path == "a"
            walker.skip(bound, inclusive)
            assert [e.path for e in walker] == rest, bound
        finally:
            walker.close()


# -- pieces with and without workers --------------------------------------------------------


async def _parent_refs(site: Site, dataset: str) -> list[SegmentRef]:
    doc = await site.repo.read_version(dataset, await site.repo.latest(dataset) or "")
    refs = await _parent_manifest(site, doc)
    assert refs is not None
    return refs


@contextlib.asynccontextmanager
async def _pushed(
    make_site: MakeSite, **tree: Any
) -> AsyncIterator[tuple[Site, Path, list[SegmentRef]]]:
    """`/proj/run1` (`make_tree(**tree)`) pushed once at a site cutting segments of eight
    entries: the open site (closed after), the tree, and the version's segment lines."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, **tree)
    site = await a.open()
    try:
        await push(site, "/proj/run1")
        yield site, src, await _parent_refs(site, "/proj/run1")
    finally:
        await site.close()


def _scan(
    site: Site,
    tree: Path,
    refs: list[SegmentRef],
    ahead: bool,
    links: Callable[[str], str] = str,
) -> tuple[list[object], list[SegmentRef]]:
    """What a push's scan of `tree` against `refs` gives, chunks left out, each piece as a
    comparable value, and the segments workers found unchanged (`links`: the scanner's)."""
    root, held = readers.anchor(str(tree.parent), (tree.name,))
    passed = Passed()
    scanner = Scanner(
        root,
        _previous(site.repo, [], refs, True, passed),
        ChunkerParams(),
        workers=2 if ahead else 0,
        links=links,
    )
    if ahead:
        scanner.check_ahead(refs, site.repo.cache_file, passed)
    try:
        pieces: list[object] = []
        found: list[SegmentRef] = []
        while batch := scanner.next_batch():
            for p in batch:
                if isinstance(p, SameSegment):
                    if p.entries is None:
                        found.append(p.ref)
                    pieces.append(("same", p.ref, p.counts()))
                elif isinstance(p, Done):
                    pieces.append(("done", p.entry, p.digests, p.same))
        stats = scanner.stats
        pieces.append(
            ("stats", stats.files_unchanged, stats.skipped_special, stats.skipped_special_count)
        )
        return pieces, found
    finally:
        scanner.close()
        os.close(held)


def _wait_for_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk reaches each segment handed out only after its worker answered (a slow
    walk, workers done early: a schedule that may happen at any time)."""
    checked = Scanner._checked

    def waiting(self: Scanner, path: str) -> SameSegment | None:
        got = self._checking.get(path)
        if got is not None:
            concurrent.futures.wait([got[2]])
        return checked(self, path)

    monkeypatch.setattr(Scanner, "_checked", waiting)


def _counting_decodes(site: Site) -> list[int]:
    """Count the entries the site's manifest cache decodes from now on (in this process)."""
    count = [0]
    iter_cached = site.repo.iter_cached

    def counted(refs: list[SegmentRef], check: bool = True) -> Iterator[Entry]:
        for entry in iter_cached(refs, check):
            count[0] += 1
            yield entry

    site.repo.iter_cached = counted  # type: ignore[method-assign]
    return count


def _damaged(good: Path, copy: Path) -> Path:
    """A copy of `good` with its last byte changed."""
    data = good.read_bytes()
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return copy


def _later(path: Path) -> None:
    """Give `path` a new mtime (and ctime), as a writer would."""
    st = path.lstat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000), follow_symlinks=False)


def _mutate(src: Path, refs: list[SegmentRef], rng: random.Random) -> list[str]:
    """A few changes where segments begin and end, inside them and between them."""
    done: list[str] = []
    for _ in range(rng.randint(1, 4)):
        ref = rng.choice(refs)
        where = rng.choice([ref.first_path, ref.last_path])
        target = src / where
        how = rng.choice(["rewrite", "touch", "chmod", "remove", "add-after", "add-before", "fifo"])
        if not target.exists() and how not in ("add-after", "add-before"):
            continue
        if how == "rewrite" and target.is_file() and not target.is_symlink():
            target.write_text("rewritten\n")
        elif how == "touch":
            _later(target)
        elif how == "chmod" and not target.is_symlink():
            target.chmod(0o700 if target.is_dir() else 0o640)
        elif how == "remove":
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        elif how in ("add-after", "add-before", "fifo"):
            name = (
                where + "~" if how != "add-before" else where[:-1] + chr(ord(where[-1]) - 1) + "~"
            )
            new = src / name
            if new.exists() or not new.parent.is_dir():
                continue
            if how == "fifo":
                os.mkfifo(new)
            else:
                new.write_text("added\n")
        done.append(f"{how} {where}")
    return done


@pytest.mark.parametrize("seed", range(6))
async def test_workers_give_the_pieces_a_walk_without_them_gives(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Each scan with workers runs twice: as it comes (the walk takes over segments no
    worker began), and with the walk waiting for every answer (so the workers do pass
    over segments, whatever the machine's load)."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=120, seed=seed, big=1 << 20)
    site = await a.open()

    def with_workers(changes: list[str]) -> list[SegmentRef]:
        assert _scan(site, src, refs, ahead=True)[0] == serial, changes
        decoded[0] = 0
        with monkeypatch.context() as m:
            _wait_for_workers(m)
            parallel, found = _scan(site, src, refs, ahead=True)
        assert parallel == serial, changes
        assert len(found) >= 1  # the workers did find some: not all walked here
        # The entries of the segments passed over are not decoded here.
        taken = sum(r.entries for r in refs) - sum(r.entries for r in found)
        assert decoded[0] <= taken + len(found)  # a first one may be taken before a pass
        return found

    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        assert len(refs) >= 15
        decoded = _counting_decodes(site)
        serial, none = _scan(site, src, refs, ahead=False)
        assert none == [] and decoded[0] == sum(r.entries for r in refs)
        assert len(with_workers([])) >= len(refs) - 3  # all but the two the walk takes

        time.sleep(0.01)
        done = _mutate(src, refs, random.Random(seed))
        try:
            serial, _ = _scan(site, src, refs, ahead=False)
        except InvalidInput:
            with pytest.raises(InvalidInput):
                _scan(site, src, refs, ahead=True)
            return
        with_workers(done)
    finally:
        await site.close()


async def test_a_worker_answers_only_for_the_segment_it_was_given(make_site: MakeSite) -> None:
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=80)
    site = await a.open()
    root, held = readers.anchor(str(src.parent), (src.name,))
    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        ref = refs[3]

        def check(cached: str, ref: SegmentRef = ref) -> Unchanged | None:
            return segcheck.check(root, cached, ref, ChunkerParams(), str, None, 1)

        found = check(site.repo.cache_file(ref.digest))
        assert found is not None and found.files + found.dirs + found.symlinks == ref.entries
        assert found.bytes == ref.bytes and found.ends
        assert check(site.repo.cache_file(refs[4].digest)) is None  # another segment's bytes
        assert check(str(src / "missing")) is None
        longer = dataclasses.replace(ref, stored_size=ref.stored_size + 1)  # its line is wrong
        assert check(site.repo.cache_file(ref.digest), longer) is None
        damaged = _damaged(Path(site.repo.cache_file(ref.digest)), src.parent / "damaged")
        assert check(str(damaged)) is None
        # A change at its last entry, or past it, is the segment's or not.
        last = src / ref.last_path
        _later(last)
        assert check(site.repo.cache_file(ref.digest)) is None
        nxt = src / refs[4].first_path
        _later(nxt)
        assert check(site.repo.cache_file(refs[4].digest), refs[4]) is None
        assert check(site.repo.cache_file(refs[2].digest), refs[2]) is not None
    finally:
        os.close(held)
        await site.close()


async def test_a_re_push_with_workers_publishes_the_tree(make_site: MakeSite) -> None:
    a, b = await make_site("site-a", segment_entries=8), await make_site("site-b")
    src = a.data / "run1"
    make_tree(src, files=150, big=1 << 20)
    site, site_b = await a.open(), await b.open()
    try:
        first = await push(site, "/proj/run1")
        noop = await push(site, "/proj/run1")
        assert noop.unchanged and noop.version == first.version
        assert (noop.files, noop.dirs, noop.symlinks, noop.bytes) == (
            first.files,
            first.dirs,
            first.symlinks,
            first.bytes,
        )
        refs = await _parent_refs(site, "/proj/run1")
        rng = random.Random(7)
        for _ in range(3):
            time.sleep(0.01)
            _mutate(src, refs, rng)
            for fifo in [p for p in src.rglob("*") if p.is_fifo()]:
                fifo.unlink()  # stage keeps no special files; the snapshot would differ
            again = await push(site, "/proj/run1")
            await stage(site_b, "/proj/run1")
            assert snapshot(b.data / "run1") == snapshot(src)
            refs = await _parent_refs(site, "/proj/run1")
            assert again.files == sum(
                1 for p in src.rglob("*") if p.is_file() and not p.is_symlink()
            )
    finally:
        await site.close()
        await site_b.close()


async def test_a_command_walks_a_few_segments_itself(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the fork server is not running (a command, not a daemon), starting it costs
    more than walking a few segments: only a tree of `_CHECKS_COLD` segments or more is
    checked ahead."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=40, big=1 << 20)
    site = await a.open()
    root, held = readers.anchor(str(src.parent), (src.name,))
    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        assert len(refs) > scan._CHECKS_COLD
        for warm, segments, checked in [
            (False, refs[: scan._CHECKS_COLD - 1], False),
            (False, refs, True),
            (True, refs[:2], True),
        ]:
            monkeypatch.setattr(procpool, "_warm", warm)
            scanner = Scanner(root, iter(()), ChunkerParams(), workers=2)
            try:
                scanner.check_ahead(segments, site.repo.cache_file, Passed())
                assert bool(scanner._to_check) == checked, (warm, len(segments))
                assert scanner._pool is None  # not on the caller's (the event loop's) thread
            finally:
                scanner.close()
    finally:
        os.close(held)
        await site.close()


async def test_a_line_of_another_size_than_its_segment_is_corrupt_either_way(
    make_site: MakeSite,
) -> None:
    async with _pushed(make_site, files=120) as (site, src, refs):
        refs[5] = dataclasses.replace(refs[5], stored_size=refs[5].stored_size + 1)
        for ahead in (False, True):
            with pytest.raises(Corrupt, match="its line in the manifest list"):
                _scan(site, src, refs, ahead)


async def test_segments_whose_first_path_is_gone_make_room_for_others(
    make_site: MakeSite, walk_waits: None
) -> None:
    """A segment handed to a worker whose first path the walk never meets (removed) is
    dropped once the walk is past it: the workers go on finding later ones."""
    async with _pushed(make_site, files=400, big=1 << 20) as (site, src, refs):
        for ref in refs[1:9]:  # more than the four handed out at first (two workers)
            if (src / ref.first_path).is_file():
                (src / ref.first_path).unlink()
        serial, _ = _scan(site, src, refs, ahead=False)
        parallel, found = _scan(site, src, refs, ahead=True)
        assert parallel == serial
        unchanged = sum(1 for p in serial if p[0] == "same")
        assert unchanged > 30 and len(found) >= unchanged - 12  # all but a few around the gaps


@pytest.mark.parametrize("fails", ["no fork server", "no fork"])
async def test_a_re_push_whose_workers_cannot_start_walks_every_segment(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """Where no fork server can run (a locked-down container), or one starts but cannot fork
    (EAGAIN under RLIMIT_NPROC, ENOMEM) and its pool's start ends with whatever
    multiprocessing raises, a re-push walks every segment itself instead of failing."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=120)
    site = await a.open()
    try:
        first = await push(site, "/proj/run1")

        def refuse() -> None:
            raise PermissionError(1, "Operation not permitted")

        def broken(workers: int) -> Any:
            raise EOFError("unexpected EOF")

        if fails == "no fork server":
            monkeypatch.setattr(forkserver, "ensure_running", refuse)
            monkeypatch.setattr(procpool, "_warm", False)
        else:
            monkeypatch.setattr(procpool, "start", broken)
            monkeypatch.setattr(procpool, "_warm", True)
        again = await push(site, "/proj/run1")
        assert again.unchanged and again.version == first.version
        assert again.files == first.files
    finally:
        await site.close()


async def test_a_check_that_fails_is_walked_here(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that raises (here: its arguments cannot be sent to a worker) is no answer:
    the walk goes through the segment itself."""
    async with _pushed(make_site, files=80) as (site, src, refs):
        serial, _ = _scan(site, src, refs, ahead=False)
        _wait_for_workers(monkeypatch)
        parallel, found = _scan(site, src, refs, ahead=True, links=lambda t: t)
        assert parallel == serial and found == []


async def test_no_worker_starts_while_every_segment_has_a_change(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers start once the walk found a segment unchanged itself: where changes are
    spread over the whole tree, they would find none."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    make_tree(src, files=120, big=1 << 20)
    site = await a.open()
    started: list[int] = []
    real_start = procpool.start

    def counting_start(workers: int) -> Any:
        started.append(workers)
        return real_start(workers)

    monkeypatch.setattr(procpool, "start", counting_start)
    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        time.sleep(0.01)
        for ref in refs:  # a change in every segment
            _later(src / ref.first_path)
        serial, _ = _scan(site, src, refs, ahead=False)
        assert started == []
        parallel, found = _scan(site, src, refs, ahead=True)
        assert parallel == serial and found == [] and started == []
        # Pushed as they are, nothing changed: the walk finds the first segment unchanged,
        # and the workers start.
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        _wait_for_workers(monkeypatch)
        parallel, found = _scan(site, src, refs, ahead=True)
        assert started == [2] and found
    finally:
        await site.close()


@pytest.fixture
def walk_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_wait_for_workers` for the whole test."""
    _wait_for_workers(monkeypatch)


@pytest.mark.parametrize("field", ["stored_size", "entries", "bytes"])
@pytest.mark.parametrize("gone", ["all", "last three"])
async def test_a_wrong_line_of_a_segment_gone_from_the_tree_is_corrupt_either_way(
    make_site: MakeSite, walk_waits: None, field: str, gone: str
) -> None:
    """A segment no worker passed over is read to its end, where its line in the list is
    checked, even where its files are gone and workers passed over those after it."""
    async with _pushed(make_site, files=200) as (site, src, refs):
        j = next(
            i
            for i in range(4, len(refs) - 2)
            if all(e.kind == Kind.FILE for e in site.repo.iter_cached([refs[i]], check=False))
        )
        entries = list(site.repo.iter_cached([refs[j]], check=False))
        for entry in entries if gone == "all" else entries[-3:]:
            (src / entry.path).unlink()
        wrong = {field: getattr(refs[j], field) + 1}
        refs[j] = dataclasses.replace(refs[j], **wrong)
        for ahead in (False, True):
            with pytest.raises(Corrupt):
                _scan(site, src, refs, ahead)
        # Right, the line passes both ways, and workers passed over segments after it.
        refs[j] = dataclasses.replace(refs[j], **{field: getattr(refs[j], field) - 1})
        serial, _ = _scan(site, src, refs, ahead=False)
        parallel, found = _scan(site, src, refs, ahead=True)
        assert parallel == serial
        assert any(r.first_path > refs[j].last_path for r in found)


async def test_workers_go_on_after_every_segment_handed_out_lost_its_first_path(
    make_site: MakeSite, walk_waits: None
) -> None:
    """Every segment handed out at first (two per worker) lost its first path: none is
    ever met, and the walk, going through them itself, drops them to hand out more."""
    a = await make_site("site-a", segment_entries=8)
    src = a.data / "run1"
    (src / "d").mkdir(parents=True)
    for i in range(160):
        (src / "d" / f"f{i:03d}").write_text(f"{i}\n")
    site = await a.open()
    try:
        await push(site, "/proj/run1")
        refs = await _parent_refs(site, "/proj/run1")
        assert len(refs) >= 16 and all(r.first_path.startswith("d/f") for r in refs[1:])
        for ref in refs[2:7]:  # the walk takes the first two; workers get the next four
            (src / ref.first_path).unlink()
        serial, _ = _scan(site, src, refs, ahead=False)
        parallel, found = _scan(site, src, refs, ahead=True)
        assert parallel == serial
        assert len(found) >= len(refs) - 9
    finally:
        await site.close()
