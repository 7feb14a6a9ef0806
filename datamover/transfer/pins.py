"""Pins a stage must respect: the jobs reading a replica's files (docs/design.md, "A pinned
replica keeps its version").

`check_pins` looks at the staged dataset's own pins before anything is fetched: a stage
bringing its replica to another version than the one recorded is `Pinned` while other jobs
hold it. `check_nested_pins` looks, once the manifest is fetched and before anything is
written, at pins on datasets nested with it (`/proj/ds` and `/proj/ds/sub` share a tree
where their prefixes map together): the stage is `Pinned` only if it would change what such
a job reads, so a job asking for `/proj/ds/sub` does not wait for one reading `/proj/ds`
when both hold the same files there. `record_overridden` records the pins a forced stage
went past at the version it staged.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datamover.catalog.access import Access, PinRow
from datamover.catalog.queries import ReplicaRow
from datamover.domain.manifest import Entry, Kind
from datamover.domain.paths import printable, sort_key
from datamover.errors import Corrupt, InvalidInput, NotFound, Pinned
from datamover.repo.layout import VersionDoc
from datamover.repo.manifest import SegmentRef
from datamover.site import Site

log = logging.getLogger(__name__)


def counted(pins: list[PinRow], keep: tuple[str, str] | None, others_only: bool) -> list[PinRow]:
    """The pins of `pins` a stage must respect: all but the caller's own (`keep`, its
    `(pin id, tenant)`; a requeued job holds its pin already), and with `others_only` (a
    forced stage of a token without `admin`) only other tenants' than `keep`'s."""
    return [
        p
        for p in pins
        if (p.pin, p.tenant) != keep
        and not (others_only and keep is not None and p.tenant == keep[1])
    ]


def holders(
    pins: list[PinRow], keep: tuple[str, str] | None, operator: bool = False
) -> tuple[str, str]:
    """`(who, how)` for a refusal over `pins` (non-empty): who holds the files, as the
    caller may be told, and how to stage anyway. Through the daemon (`keep` given, not
    `operator`), other tenants' pin ids are neither named nor counted to a tenant. A stage
    run in this process (`operator`, or no `keep`: the CLI without the daemon, which holds
    the catalog and its pins) is told the first three pins and their tenants, which
    `datamover release --pin ID --tenant T` takes, and `--force`, which it may give."""
    if operator or keep is None:
        named = ", ".join(f"{p.pin!r} (tenant {p.tenant!r})" for p in pins[:3])
        who = ("pin " if len(pins) == 1 else "pins ") + named
        if len(pins) > 3:
            who += f" and {len(pins) - 3} more"
        return who, "--force"
    foreign = any(p.tenant != keep[1] for p in pins)
    mine = [p for p in pins if p.tenant == keep[1]]
    who = f"pin {mine[0].pin!r}" if mine else "another tenant's pin"
    if len(mine) > 1:
        who += f" and {len(mine) - 1} more"
    if mine and foreign:
        who += " and other tenants' pins"
    elif not mine and len(pins) > 1:
        who += " and others"
    return who, "an admin token's --force" if foreign else "--force"


async def check_pins(
    site: Site,
    doc: VersionDoc,
    root: Path,
    keep: tuple[str, str] | None,
    others_only: bool = False,
    operator: bool = False,
    forced: bool = False,
) -> list[PinRow]:
    """Raise `Pinned` if the replica at `root` is recorded at another version than `doc`'s
    while pins other than `keep` hold it (`counted`): a pin is a job reading the tree, and
    a stage of another version would change its files under it (and, without `--delete`,
    leave the older version's extra files beside the newer's). `forced` (`--force` of an
    admin or of the CLI here) raises nothing.

    Returns the pins the stage goes past, whose jobs' files it changes (with `others_only`,
    only `keep`'s tenant's can be: any other tenant's raised); none where the version does
    not change."""
    replica = await site.catalog.replica(doc.dataset)
    if replica is None or replica.root != str(root) or replica.version == doc.version:
        return []  # no tree recorded here (or mapped elsewhere now), or no change of version
    pins = await Access(site.catalog.engine).pins(dataset=doc.dataset)
    others = [] if forced else counted(pins, keep, others_only)
    if not others:
        return counted(pins, keep, False)
    who, how = holders(others, keep, operator)
    raise Pinned(
        f"{doc.dataset!r} is held at version {replica.version} by {who}: staging "
        f"version {doc.version} would change files under the jobs reading them; stage it "
        f"once they are released (`datamover release`), or with {how}"
    )


async def record_overridden(
    site: Site, dataset: str, version: str, overridden: list[PinRow]
) -> None:
    """After a forced stage of `dataset` to `version`: the pins it went past (`overridden`,
    from `check_pins`) are recorded at `version`, which their jobs now read (a warning
    names them). They had kept the version they were taken at, so `datamover pins` named a
    version the tree no longer held, and a later refusal another one."""
    keys = [(p.pin, p.tenant) for p in overridden]
    moved = await Access(site.catalog.engine).move_pins(dataset, version, keys)
    if moved:
        named = ", ".join(f"{p.pin!r} (tenant {p.tenant!r}, was {p.version})" for p in moved[:3])
        more = f" and {len(moved) - 3} more" if len(moved) > 3 else ""
        log.warning(
            "stage of %s: --force changed the files under pins %s%s; they are recorded at "
            "version %s now",
            dataset,
            named,
            more,
            version,
        )


@dataclass(frozen=True)
class _Nested:
    """Pins at one version of a dataset sharing the staged one's tree: `inner` is the
    deeper of the two datasets, `rel` its path below the outer one."""

    dataset: str
    version: str
    pins: list[PinRow]
    inner: str
    rel: str
    below: bool  # the pinned dataset lies below the staged one


async def check_nested_pins(
    site: Site,
    doc: VersionDoc,
    root: Path,
    refs: list[SegmentRef],
    keep: tuple[str, str] | None,
    others_only: bool = False,
    delete: bool = False,
    operator: bool = False,
) -> None:
    """Raise `Pinned` if staging `doc` (its manifest list `refs`, prefetched) at `root`
    would change files that jobs pinning a nested dataset read, pins other than `keep`
    (`counted`).

    A nested dataset counts where it shares the tree: its prefix maps to the same place
    below (or above) `root`, and this site has a replica record of it there (a pin on a
    dataset with no replica here guards no tree, as for the dataset itself). What its jobs
    read is the version pinned (or, for a pin without one, the recorded version). The
    stage changes it if the two versions differ in the shared part: a file or symlink
    whose kind, mode, size, content or target differs, an entry the staged version adds,
    with `delete` one it lacks, and a file or symlink where the deeper dataset's root or a
    directory above it is (staged, it replaces that tree whole). Times are not compared:
    restamping a file changes no byte a job reads. Only the segments covering the shared
    part (and the directories above it) are fetched. A version that cannot be read or is
    corrupt counts as changed."""
    nested = await _nested(site, doc.dataset, root, keep, others_only)
    for held in nested:
        try:
            other = await site.repo.read_version(held.dataset, held.version)
            if held.below:  # the staged version's part below `rel` against all of `other`
                changed = await _change_below(site, refs, held.rel, other, delete)
            else:  # all of the staged version against `other`'s part below `rel`
                changed = await _change_above(site, other, held.rel, refs, delete)
        except (NotFound, Corrupt):
            changed = ""  # what the jobs read cannot be read: assume a change
        if changed is not None:
            changed = posixpath.normpath(f"{held.inner}/{changed}") if changed else held.inner
        if changed is None:
            continue
        who, how = holders(held.pins, keep, operator)
        raise Pinned(
            f"{held.dataset!r} is held at version {held.version} by {who}: staging "
            f"{doc.dataset!r} version {doc.version} would change {printable(changed)!r} "
            f"under the jobs reading it; stage it once they are released "
            f"(`datamover release`), or with {how}"
        )


async def overwritten_below(
    site: Site, doc: VersionDoc, root: Path, refs: list[SegmentRef], delete: bool
) -> list[str]:
    """The nested datasets below `doc`'s whose trees, shared with `root` and recorded
    `ready` at this site, staging `doc` (its prefetched manifest list `refs`) would change:
    `doc`'s part below each differs from the version recorded there (as
    `check_nested_pins` compares). Their records are to be marked `overwritten` before the
    stage writes, so that a push of theirs does not publish what the stage put there (an
    older version's files, maybe) as their newest, and a stage of theirs is not answered
    as already done. A version that cannot be read counts as changed."""
    changed: list[str] = []
    for record in await site.catalog.replicas_near(doc.dataset):
        if record.state != "ready" or not record.dataset.startswith(doc.dataset + "/"):
            continue
        place = _shared(site, doc.dataset, root, record)
        if place is None:
            continue
        rel = place[0]
        try:
            other = await site.repo.read_version(record.dataset, record.version)
            first = await _change_below(site, refs, rel, other, delete)
        except (NotFound, Corrupt):
            first = ""  # cannot be compared: counted as changed
        if first is not None:
            changed.append(record.dataset)
    return changed


async def _change_below(
    site: Site, refs: list[SegmentRef], rel: str, inner: VersionDoc, delete: bool
) -> str | None:
    """What staging the version of `refs` (prefetched) changes in the tree of the nested
    dataset `rel` below it, which holds version `inner`: its first path, relative to `rel`
    ("" for `rel` itself), or None. A file or symlink the outer version holds at `rel` or a
    directory above it replaces the whole tree."""
    inner_refs = await site.repo.prefetch(inner)
    return await asyncio.to_thread(_compare_below, site, refs, rel, inner_refs, delete)


async def _change_above(
    site: Site, outer: VersionDoc, rel: str, refs: list[SegmentRef], delete: bool
) -> str | None:
    """What staging the version of `refs` (prefetched), the nested dataset `rel` below the
    dataset whose tree holds version `outer`, changes of `outer`'s files: as `_change_below`,
    the other way round. Only `outer`'s segments that hold `rel`'s part or a directory
    above it are fetched."""
    outer_refs = await site.repo.segments(outer)
    wanted = {id(r) for r in _covering(outer_refs, rel)}
    for path in _above(rel):
        wanted.update(id(r) for r in _holding(outer_refs, path))
    part = [r for r in outer_refs if id(r) in wanted]
    for ref in part:
        await site.repo.manifest_object(ref.digest, ref.stored_size)

    def compare() -> str | None:
        blocked = _not_a_directory(site, part, rel)
        if blocked is not None:
            return blocked
        return _first_change(
            _entries(site, refs), _below(_entries(site, _covering(part, rel)), rel), delete
        )

    return await asyncio.to_thread(compare)


def _compare_below(
    site: Site, refs: list[SegmentRef], rel: str, inner_refs: list[SegmentRef], delete: bool
) -> str | None:
    """`_change_below`'s comparison (blocking)."""
    blocked = _not_a_directory(site, refs, rel)
    if blocked is not None:
        return blocked
    return _first_change(
        _below(_entries(site, _covering(refs, rel)), rel), _entries(site, inner_refs), delete
    )


def _above(rel: str) -> list[str]:
    """`rel` and every directory above it: `a`, `a/b`, `a/b/c` for `a/b/c`."""
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _holding(refs: list[SegmentRef], path: str) -> list[SegmentRef]:
    """The segments whose path range holds `path`."""
    key = sort_key(path)
    return [r for r in refs if sort_key(r.first_path) <= key <= sort_key(r.last_path)]


def _not_a_directory(site: Site, refs: list[SegmentRef], rel: str) -> str | None:
    """Where the version of `refs` (cached) holds something other than a directory at
    `rel` or a directory above it, as a path relative to `rel` ("" for `rel` itself, `..`
    for the directory above it, and so on); None if nowhere. Staged, such an entry
    replaces the nested tree whole (the planner moves the directory to the trash)."""
    paths = _above(rel)
    for depth, path in enumerate(paths):
        for entry in _entries(site, _holding(refs, path)):
            if entry.path == path:
                if entry.kind != Kind.DIR:
                    return "/".join([".."] * (len(paths) - 1 - depth))
                break
    return None


async def _nested(
    site: Site, dataset: str, root: Path, keep: tuple[str, str] | None, others_only: bool
) -> list[_Nested]:
    """The counted pins on datasets nested with `dataset` that share its tree at `root`,
    grouped by dataset and version."""
    pins = counted(await Access(site.catalog.engine).pins_near(dataset), keep, others_only)
    if not pins:
        return []
    records = {r.dataset: r for r in await site.catalog.replicas_near(dataset)}
    places = {d: place for d, r in records.items() if (place := _shared(site, dataset, root, r))}
    grouped: dict[tuple[str, str], list[PinRow]] = {}
    for pin in pins:
        record = records.get(pin.dataset)
        if record is None or pin.dataset not in places:
            continue  # no replica here, or not this tree
        grouped.setdefault((pin.dataset, pin.version or record.version), []).append(pin)
    nested = []
    for (d, v), ps in sorted(grouped.items()):
        rel, below = places[d]
        nested.append(_Nested(d, v, ps, d if below else dataset, rel, below))
    return nested


def _shared(site: Site, dataset: str, root: Path, record: ReplicaRow) -> tuple[str, bool] | None:
    """`(rel, below)` when `record`, of a dataset above or below `dataset` (whose tree is
    at `root`), is the tree at its place in `root` or around it: `rel` is the deeper
    dataset's path below the other, `below` whether `record`'s is the deeper one. None when
    this site maps it elsewhere now (another tree) or recorded it elsewhere (before a
    remap). Exactly at its place, unlike push's looser `_shares`: the comparisons here
    line the two manifests up at `rel`."""
    below = record.dataset.startswith(dataset + "/")
    outer, inner = (dataset, record.dataset) if below else (record.dataset, dataset)
    rel = inner[len(outer) + 1 :]
    try:
        mapped = site.config.namespace.resolve(record.dataset)
    except InvalidInput:  # no longer mapped at this site
        return None
    parts = rel.split("/")
    at = root.joinpath(*parts) == mapped if below else mapped.joinpath(*parts) == root
    return (rel, below) if at and record.root == str(mapped) else None


def _covering(refs: list[SegmentRef], rel: str) -> list[SegmentRef]:
    """The segments of a sorted manifest list that may hold entries below `rel` (a
    contiguous run: `rel`'s subtree is contiguous in manifest order)."""
    key = sort_key(rel)
    n = len(key)
    return [r for r in refs if sort_key(r.last_path)[:n] >= key >= sort_key(r.first_path)[:n]]


def _entries(site: Site, refs: list[SegmentRef]) -> Iterator[Entry]:
    """The entries of cached segments `refs`, in order (blocking)."""
    return site.repo.iter_cached(refs, check=False)


def _below(entries: Iterator[Entry], rel: str) -> Iterator[Entry]:
    """The entries below `rel`, with paths relative to it, in the same order."""
    prefix = rel + "/"
    cut = len(prefix)
    inside = False
    for e in entries:
        if e.path.startswith(prefix):
            inside = True
            yield Entry(e.path[cut:], e.kind, e.mode, e.mtime_ns, e.size, e.target, e.chunks)
        elif inside:
            return  # past the subtree


def _alike(a: Entry, b: Entry) -> bool:
    """Whether staging `a` over `b` leaves what a reader sees as it was."""
    if a.kind != b.kind:
        return False
    if a.kind == Kind.DIR:
        return True
    if a.kind == Kind.SYMLINK:
        return a.target == b.target
    return (
        a.mode == b.mode
        and a.size == b.size
        and len(a.chunks) == len(b.chunks)
        and all(x.digest == y.digest for x, y in zip(a.chunks, b.chunks, strict=True))
    )


def _first_change(new: Iterator[Entry], held: Iterator[Entry], delete: bool) -> str | None:
    """The first path, in manifest order, that staging the sorted entries `new` over a tree
    holding the sorted entries `held` would change (with `delete`, remove); None if none."""
    n, h = next(new, None), next(held, None)
    while n is not None or h is not None:
        if h is None or (n is not None and sort_key(n.path) < sort_key(h.path)):
            assert n is not None
            return n.path  # added
        if n is None or sort_key(h.path) < sort_key(n.path):
            if delete:
                return h.path  # removed
            h = next(held, None)
            continue
        if not _alike(n, h):
            return n.path
        n, h = next(new, None), next(held, None)
    return None
