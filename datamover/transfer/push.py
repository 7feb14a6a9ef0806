"""Push: publish the site's local tree of a dataset as a new version.

Flow (DESIGN.md "push"): resolve the local directory, stream the sorted walk merged with the
parent version's manifest (and with the segments an interrupted run already uploaded), read
and chunk only what changed, upload only chunks the store lacks, write manifest segments,
then the manifest list, then the version document — the single act that publishes. All of
it holds this host's lock of the dataset's tree shared (`locks`), so no stage of the dataset
writes the tree here while it is read.

Crash safety: packs are indexed in the catalog only after they are stored, and segments are
checkpointed only after theirs are; a rerun after SIGKILL finds both and sends neither again.
A pack stored in the moment between its upload and its indexing is found too: a run taking
over an interrupted one asks the store for its first packs before sending them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from datamover.aio import every
from datamover.catalog.queries import CheckpointRow, ReplicaRow, owner_alive, owner_id
from datamover.chunking.chunker import ChunkerParams
from datamover.console import counted
from datamover.domain.ids import new_version_id
from datamover.domain.manifest import ChunkRef, Entry, Kind
from datamover.domain.paths import check_logical_path, sort_key
from datamover.errors import Busy, Conflict, Corrupt, InvalidInput
from datamover.repo.layout import VersionDoc, check_key_length
from datamover.repo.manifest import SegmentRef, encode_list
from datamover.repo.repository import Repository, utc_now
from datamover.site import Site
from datamover.transfer import ctimes
from datamover.transfer.fsops import check_root, check_state_outside
from datamover.transfer.locks import take_lock
from datamover.transfer.manifest_writer import ManifestWriter
from datamover.transfer.packer import Packer, Ref
from datamover.transfer.progress import NoProgress, Progress
from datamover.transfer.readers import RootMoved, TreeRoot, anchor
from datamover.transfer.reuse import ReuseCheck
from datamover.transfer.scan import (
    Done,
    NewChunk,
    Passed,
    Previous,
    SameSegment,
    Scanner,
    root_moved,
)

#: A push touches its checkpoint this often; one untouched for `_STALE_AFTER` belongs to a
#: process that is gone (`_holder_alive`), with room for clocks that disagree by minutes.
_TOUCH_EVERY = 60.0
_STALE_AFTER = timedelta(minutes=15)

#: Reused segments whose checkpoint rows are written together (see `on_segment` in `push`);
#: a rerun after a crash compares at most this many segments again.
_CHECKPOINT_BATCH = 256

#: Passes that read again the files whose packs the store lost (`ReuseCheck`); one is
#: enough unless packs keep vanishing while the push runs.
_HEAL_PASSES = 2

#: Replica states of a tree no stage is writing: `overwritten` is a nested dataset's whose
#: files a stage of one above it changed (that one's record says what the tree holds).
_SETTLED = ("ready", "overwritten")
# Latest versions whose documents a push tries, newest first, for a readable parent.
_PARENT_TRIES = 16

log = logging.getLogger(__name__)


@dataclass
class PushResult:
    """The summary of a push (`--json` prints it)."""

    dataset: str
    version: str
    parent: str | None
    unchanged: bool
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes: int = 0
    uploaded_bytes: int = 0
    files_read: int = 0
    bytes_read: int = 0
    new_chunks: int = 0
    new_chunk_bytes: int = 0
    packs: int = 0
    seconds: float = 0.0
    skipped_special: list[str] = field(default_factory=list)  # the first 100 of them
    skipped_special_count: int = 0
    #: Files named as stage's partial files (`.dm-<16 hex>.part`), which no version holds
    #: (a stage would take them for its own leftovers); the first 100 of them.
    skipped_partial: list[str] = field(default_factory=list)
    skipped_partial_count: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _unfinished(batch: list[object], current: dict[bytes, Ref]) -> dict[bytes, Ref]:
    """What `current` must keep after `batch`: the chunks of a file whose `Done` is still to
    come (a batch ends after about 8 MiB of data, in the middle of a file more often than
    not), and nothing of the files it completed, so the map holds one file's chunks at most."""
    i = len(batch) - 1
    while i >= 0 and not isinstance(batch[i], (Done, SameSegment)):
        i -= 1
    if i == len(batch) - 1:
        return {}
    if i < 0:
        return current  # the same file goes on
    return {p.digest: current[p.digest] for p in batch[i + 1 :] if isinstance(p, NewChunk)}


def _previous(
    repo: Repository,
    resumed: list[SegmentRef],
    parent: list[SegmentRef],
    marked: bool,
    passed: Passed | None = None,
) -> Iterator[Entry | SegmentRef]:
    """Sorted entries to compare the walk with: what an interrupted run already stored, then
    the parent's entries beyond it. With `marked`, each segment streamed whole
    (`_reusable`) comes after its `SegmentRef`, for the scanner to find it unchanged as a
    whole (`SameSegment`). The entries of a marked parent segment the walk has passed over
    (`passed`, by its place in `parent`: `Scanner.check_ahead`) are skipped, from where the
    stream is when it does; they are not decoded."""
    passed = passed if passed is not None else Passed()
    cutoff: tuple[str, ...] | None = None
    for ref in resumed:
        if marked:
            yield ref
        yield from repo.iter_cached([ref], check=False)
    if resumed:
        cutoff = sort_key(resumed[-1].last_path)
    for place, ref in enumerate(parent):
        if cutoff is None or sort_key(ref.first_path) > cutoff:
            if marked:
                yield ref
                yield from _unless_passed(repo, ref, place, passed)
            else:
                yield from repo.iter_cached([ref], check=False)
        elif sort_key(ref.last_path) > cutoff:  # straddles the cut-off: what is beyond it
            beyond = repo.iter_cached([ref], check=False)
            yield from (e for e in beyond if sort_key(e.path) > cutoff)


def _unless_passed(
    repo: Repository, ref: SegmentRef, place: int, passed: Passed
) -> Iterator[Entry]:
    """The entries of segment `ref`, at `place` in the parent's list, until the walk has
    passed over it (`passed`)."""
    if passed.covers(place):
        return
    moves = passed.moves
    for entry in repo.iter_cached([ref], check=False):
        if passed.moves != moves:
            if passed.covers(place):
                return
            moves = passed.moves
        yield entry


def _reusable(resumed: list[SegmentRef], parent: list[SegmentRef]) -> list[SegmentRef]:
    """The segments `_previous` streams whole: every resumed one, and the parent's that lie
    entirely beyond the resumed ones (a parent segment straddling the cut-off fed only part
    of the stream, so equal bounds would not mean equal entries)."""
    if not resumed:
        return parent
    cutoff = sort_key(resumed[-1].last_path)
    return [*resumed, *(r for r in parent if sort_key(r.first_path) > cutoff)]


def _holder_alive(checkpoint: CheckpointRow, now: datetime) -> bool:
    """Whether the process recorded on an unfinished push may still be running it.

    A running push touches its checkpoint every `_TOUCH_EVERY` seconds, so one silent for
    `_STALE_AFTER` has died or lost the catalog, and its push may be taken over, on this
    host too: a process id that exists again (after a reboot, ids are soon reused) is no
    proof that the push lives, and trusting it blocked the dataset for good. On this host a
    process id that is gone ends the claim at once."""
    if not owner_alive(checkpoint.owner):
        return False
    return now - checkpoint.touched < _STALE_AFTER


async def _resumable_segments(
    site: Site, dataset: str, tree: Path
) -> tuple[CheckpointRow | None, list[SegmentRef]]:
    """The unfinished push of `dataset` to take over (None: there is none) and the segments
    it stored, or `Busy` if its process is still running it.

    Only a checkpoint of the tree at `tree` is resumed: its segments say which files were
    unchanged by name, size and mtime, which another directory (the namespace mapped
    elsewhere since) may match with other bytes. One of another tree, or recorded before
    trees were (migration 0007), starts the run over. The segments are checked in the store,
    not only in the local cache: a bucket restored from an older copy, or objects deleted by
    hand, must not let a rerun reuse chunks that are gone. If any is missing, the run starts
    over (its packs still deduplicate).
    """
    found = await site.catalog.checkpoint(dataset)
    if found is None:
        return None, []
    if found.owner != owner_id() and _holder_alive(found, datetime.now(UTC)):
        raise Busy(f"a push of {dataset!r} is already running ({found.owner})")
    if found.root != str(tree) or found.started_at is None:
        log.warning(
            "push of %s: the interrupted run read %s, not %s; starting over",
            dataset,
            found.root or "a tree it did not record",
            tree,
        )
        return found, []
    segments = await site.catalog.checkpoint_segments(dataset)
    if segments and not await site.repo.all_stored(segments):
        log.warning("push of %s: an interrupted run's objects are gone; starting over", dataset)
        return found, []
    return found, segments


@contextlib.asynccontextmanager
async def _holding(site: Site, dataset: str) -> AsyncIterator[None]:
    """Touch the checkpoint every `_TOUCH_EVERY` seconds while the body runs (see
    `_holder_alive`); a failed touch is logged and the push goes on. If the body fails, the
    claim is given up (`Catalog.release_checkpoint`) and the segments kept: a site daemon
    whose push failed lives on, and its claim would otherwise refuse every push of the
    dataset from another process of this host until the daemon pushed it again."""
    me = owner_id()
    touch = functools.partial(site.catalog.touch_checkpoint, dataset, me)
    try:
        async with every(_TOUCH_EVERY, touch, f"push of {dataset}: could not touch its checkpoint"):
            yield
    except BaseException:
        try:  # shielded: a cancelled push gives its claim up too (a touch after it is a no-op)
            await asyncio.shield(site.catalog.release_checkpoint(dataset, me))
        except Exception as exc:  # the original error is the one to report
            log.warning("push of %s: could not give up its checkpoint: %s", dataset, exc)
        raise


async def push(
    site: Site,
    logical: str,
    *,
    checksum: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> PushResult:
    """Push the local tree of `logical` as a new version; see the module docstring.

    Holds this host's lock of the dataset's tree shared (`locks`) from before it looks at
    the tree until the version is published: a stage of the dataset running here is
    `Conflict` before anything is written, and one started meanwhile waits. A tree a stage
    at this site did not finish (killed, failed: `_check_staged`) is `Conflict` too, unless
    `force`."""
    started = time.monotonic()
    dataset = check_key_length(check_logical_path(logical), site.name)  # before any I/O
    lock = await take_lock(site.state_dir, dataset, reader="push")
    try:
        return await _push(site, dataset, checksum, force, progress or NoProgress(), started)
    finally:
        if lock is not None:
            os.close(lock)


def _check_staged(
    dataset: str, replica: ReplicaRow | None, root: Path, nearby: list[ReplicaRow]
) -> None:
    """`Conflict` if the replica record says a stage of `dataset` into this site's tree did
    not finish: the tree then holds some files of the version it was bringing and some of
    the one before (or none), and published as the latest it would have every site staging
    it with `--delete` remove the rest. (One running here holds the lock; this is one that
    was killed or failed.) The same for a dataset above or below `dataset` (`nearby`, the
    records sharing its tree), whose stage may also be running: their locks are their own."""
    if replica is not None and replica.state == "overwritten" and replica.root == str(root):
        raise Conflict(
            f"{dataset!r}: a stage of a dataset above it changed files of this tree after "
            f"version {replica.version} was staged here, so it may hold older files; stage "
            f"it again (datamover stage {dataset}) or publish the tree as it is with --force"
        )
    if replica is not None and replica.state != "ready" and replica.root == str(root):
        raise Conflict(
            f"{dataset!r}: a stage of version {replica.version} into this tree did not "
            "finish, so it holds files of two versions; finish it (datamover stage "
            f"{dataset} --version {replica.version}) or publish the tree as it is with --force"
        )
    # A dataset above or below this one shares files with its tree: a stage of it that is
    # running, or did not finish, leaves this tree part one version, part another.
    near = next((r for r in nearby if r.state not in _SETTLED), None)
    if near is not None:
        raise Conflict(
            f"{dataset!r}: a stage of {near.dataset!r} (version {near.version}), which "
            "shares files with this tree, is running or did not finish; push after it ends "
            f"(datamover stage {near.dataset} --version {near.version}) or publish the tree "
            "as it is with --force"
        )


def _check_current(
    site: Site, dataset: str, replica: ReplicaRow | None, root: Path, latest: VersionDoc | None
) -> None:
    """`Conflict` if this site's tree of `dataset` holds an older version than the latest:
    it was staged (or pushed) here at that version, and published as it is it would undo
    every change made since (files added elsewhere gone from the latest, the old content of
    changed ones back), which a stage with `--delete` then carries to every site. A record
    made before the latest was published by this site is not counted (one kept from
    before pushes were recorded, or a push that ended between publishing and recording),
    while one made after it is (this site staged an older version since: a rollback).
    A record newer than the latest names a version the store no longer lists."""
    if (
        latest is None
        or replica is None
        or replica.root != str(root)
        or replica.state != "ready"
        or replica.version >= latest.version
        or (latest.site == site.name and _before(replica.updated_at, latest.created))
    ):
        return
    raise Conflict(
        f"{dataset!r}: the tree here holds version {replica.version}, but site "
        f"{latest.site!r} has published {latest.version} since; pushed as it is, it would "
        f"undo that version's changes. Stage the latest first (datamover stage {dataset}: "
        "files changed here since go to the trash, to take back from there), or publish "
        "this tree over it with --force"
    )


def _holds_parent(site: Site, replica: ReplicaRow | None, root: Path, parent: VersionDoc) -> bool:
    """Whether this site's record says its tree at `root` holds version `parent`, staged or
    pushed here and not changed by a stage since: only then may a file whose size and mtime
    are the parent's be taken as unchanged without reading it.

    A push of this site that published `parent` and was cut before it recorded that (a
    SIGKILL, a daemon draining) left the record of the version before (or none, for a
    first push), made before `parent` was: that tree is the one `parent` was read from,
    and trusted too, as `_check_current` takes it as current."""
    if replica is None:
        return parent.site == site.name and parent.parent is None
    if replica.root != str(root) or replica.state != "ready":
        return False
    if replica.version == parent.version:
        return True
    return (
        parent.site == site.name
        and replica.version == parent.parent
        and _before(replica.updated_at, parent.created)
    )


def _before(recorded: datetime | None, created: str) -> bool:
    """Whether a record's time (naive from SQLite: UTC) is before a version's `created`."""
    if recorded is None:
        return True
    if recorded.tzinfo is None:
        recorded = recorded.replace(tzinfo=UTC)
    made = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return recorded < made


async def _nearby(site: Site, dataset: str, root: Path) -> list[ReplicaRow]:
    """The replica records of datasets above or below `dataset` that share its tree."""
    return [r for r in await site.catalog.replicas_near(dataset) if _shares(site, root, r)]


async def _check_nested_unchanged(
    site: Site, dataset: str, root: Path, before: list[ReplicaRow]
) -> None:
    """`Conflict` if a stage of a dataset above or below `dataset` that shares its tree
    ran while the push read it: a record running or unfinished now, or at another version
    than `before` (`_nearby` when the push began), or new. Its lock is not the push's, so
    the tree may hold files of two versions of it. A restage of the same version (a job's
    prolog, again) is no change; compared by value, not by time, so no clock matters. A
    push of a nested dataset meanwhile, which records the version it published, counts
    as a change too (rare: nothing was written, and pushing again goes through)."""
    held = {r.dataset: (r.version, r.state) for r in before}
    changed = next(
        (
            r
            for r in await _nearby(site, dataset, root)
            if r.state not in _SETTLED or held.get(r.dataset) != (r.version, r.state)
        ),
        None,
    )
    if changed is None:
        return
    # A record settled again at another version: a stage that ended, or a push of it.
    what = (
        f"a stage of {changed.dataset!r}, which shares files with this tree, ran"
        if changed.state not in _SETTLED
        else f"{changed.dataset!r}, which shares files with this tree, was staged or pushed "
        f"(version {changed.version})"
    )
    raise Conflict(
        f"{dataset!r}: {what} while it was read; nothing was published. Push again (its "
        "uploads are kept), or publish the tree as it is with --force"
    )


def _shares(site: Site, root: Path, replica: ReplicaRow) -> bool:
    """Whether `replica`, of a dataset above or below the one at `root`, is a tree this
    site maps into or onto `root` now: nested prefixes may map elsewhere (`/proj/ref` to
    another file system), and a record from before a remap names a tree not mapped."""
    try:
        mapped = site.config.namespace.resolve(replica.dataset)
    except InvalidInput:
        return False
    if replica.root != str(mapped):
        return False
    return mapped.is_relative_to(root) or root.is_relative_to(mapped)


async def _readable_parent(
    site: Site, dataset: str
) -> tuple[str | None, VersionDoc | None, str | None]:
    """`(id, document, newest id)`: the parent of a new version of `dataset` and the
    greatest id listed, which the new one must follow. The parent is the latest version,
    or where that one's document is malformed (`Corrupt`: a damaged object, a writer's
    bug), the newest of the `_PARENT_TRIES` latest that reads, with a warning; none when
    none does. A malformed
    latest document had failed every push of the dataset, `--force` too, until someone
    removed the object by hand; passed over, it stays where it is (a stage of it still
    says it is corrupt) and is no longer the latest once this push publishes."""
    ids = await site.repo.version_ids(dataset)
    newest = ids[-1] if ids else None
    for version in reversed(ids[-_PARENT_TRIES:]):
        try:
            doc = await site.repo.read_version(dataset, version)
        except Corrupt as exc:
            log.warning(
                "%s: version %s cannot be read (%s); it is passed over as the parent of the new "
                "version",
                dataset,
                version,
                exc,
            )
            continue
        if newest != version and not _followable(newest):
            # Dated at the end of time: nothing can follow it, so it stays the latest.
            log.warning(
                "%s: version %s is dated where no version can follow it; the new version "
                "follows %s, and %s stays the latest until it is removed from the store",
                dataset,
                newest,
                version,
                newest,
            )
            newest = version
        return version, doc, newest
    if ids:
        log.warning(
            "%s: none of its %d latest versions can be read; the new version has no parent "
            "and every file is read",
            dataset,
            min(len(ids), _PARENT_TRIES),
        )
    return None, None, newest if _followable(newest) else None


def _followable(version: str | None) -> bool:
    """Whether a version id can follow `version` (`new_version_id` raises for one dated
    at the last representable microsecond)."""
    try:
        new_version_id("x", after=version)
    except Corrupt:
        return False
    return True


async def _parent_manifest(site: Site, parent: VersionDoc) -> list[SegmentRef] | None:
    """The parent version's manifest list, its segments in the local cache; None when the
    store lost part of it (and this site has no copy): the push then compares with nothing
    and reads every file, instead of failing every push of the dataset for good. Lost packs
    are healed by reading the files again; a lost manifest is healed the same way."""
    try:
        return await site.repo.prefetch(parent)
    except Corrupt as exc:
        log.warning(
            "%s: the parent version %s cannot be read (%s); every file is read again",
            parent.dataset,
            parent.version,
            exc.message,
        )
        return None


async def _push(
    site: Site, dataset: str, checksum: bool, force: bool, progress: Progress, started: float
) -> PushResult:
    """`push`, holding the dataset's lock: the dataset's directory is opened once checked
    (`readers.anchor`) and held open until the push ends, and the walk and every reader
    read only that directory (`readers.open_root`)."""
    base, parts = site.config.namespace.split(dataset)
    check_state_outside(site.state_dir, dataset, base.joinpath(*parts))
    await asyncio.to_thread(check_root, base, parts)  # a tree that is no directory: that first
    path = str(base.joinpath(*parts))
    try:
        root, held = await asyncio.to_thread(anchor, str(base), parts)
    except RootMoved:  # it changed since `check_root` looked
        raise root_moved(path) from None
    except PermissionError:  # the user's to fix, as an unreadable directory in the tree
        raise InvalidInput(f"cannot read {path!r}: permission denied", [""]) from None
    try:
        return await _push_tree(site, dataset, root, checksum, force, progress, started)
    finally:
        os.close(held)


async def _push_tree(
    site: Site,
    dataset: str,
    root: TreeRoot,
    checksum: bool,
    force: bool,
    progress: Progress,
    started: float,
) -> PushResult:
    """`push` of the tree at `root`, holding the dataset's lock and its directory."""
    tree = site.config.namespace.resolve(dataset)
    replica = await site.catalog.replica(dataset)
    nearby = await _nearby(site, dataset, tree)
    if not force:
        _check_staged(dataset, replica, tree, nearby)
    params = await site.repo.chunker_params(create=True)
    parent_id, parent, newest = await _readable_parent(site, dataset)
    if not force:
        _check_current(site, dataset, replica, tree, parent)
    if parent is not None and not checksum and not _holds_parent(site, replica, tree, parent):
        # Size and mtime can say a file is unchanged only in a tree known to hold the
        # parent: another site's tree, or one never staged or pushed here, may hold other
        # bytes under the parent's sizes and mtimes.
        log.info(
            "push of %s: this site's record does not say its tree holds version %s; every "
            "file is read (what the store has is not uploaded again)",
            dataset,
            parent.version,
        )
        checksum = True
    # Files changed since the tree was known to hold the version have a later ctime: read
    # whatever their size and mtime (a file replaced under its old mtime, `cp -p`).
    changed_since = None if checksum or replica is None else replica.held_since_ns
    walk_began = datetime.now(UTC)
    found, resumed = await _resumable_segments(site, dataset, tree)
    await site.catalog.start_checkpoint(
        dataset, parent_id, owner_id(), bool(resumed), found, str(tree), ctimes.moment(walk_began)
    )
    # A file the interrupted run took from its checkpoint is read if replaced since that run
    # walked it (a first push has no record of the tree to tell that by).
    resumed_since = found.started_ns if resumed and found is not None else None
    async with _holding(site, dataset):
        parent_refs = await _parent_manifest(site, parent) if parent else None
        parent_read = parent_refs is not None
        lost: set[bytes] = set()
        spent = PushResult(dataset, "", None, False)  # what passes given up on sent
        counted = _PassProgress(progress)
        objects = (
            [parent.manifest_digest, *(r.digest for r in parent_refs)]
            if parent and parent_refs is not None
            else []
        )
        parent_refs = parent_refs or []
        for _ in range(_HEAL_PASSES + 1):
            check = ReuseCheck(site.repo)
            check.manifests(objects)
            try:
                result, segments = await _build(
                    site,
                    dataset,
                    root=root,
                    params=params,
                    parent_refs=parent_refs,
                    resumed=resumed,
                    lost=lost,
                    check=check,
                    checksum=checksum,
                    progress=counted,
                    changed_since_ns=changed_since,
                    resumed_since_ns=resumed_since,
                    after_interrupted=found is not None,
                )
                lost_packs, lost_objects = await check.missing()
            finally:
                await check.cancel()
            if not lost_packs:
                break
            log.warning(
                "push of %s: %d pack(s) the parent version uses are gone from the store; "
                "reading the files that used them again",
                dataset,
                len(lost_packs),
            )
            lost |= lost_packs
            resumed, resumed_since = [], None  # the heal pass compares with the parent only
            counted.next_pass()
            _add_sent(spent, result)
        else:
            raise Corrupt(f"push of {dataset!r}: packs keep vanishing from the store")
        _add_sent(result, spent)
        for digest in lost_objects & {r.digest for r in segments}:
            result.uploaded_bytes += await _restore_manifest_object(site.repo, digest)
        result.parent = parent_id
        held = ctimes.moment(walk_began)  # the tree held what it publishes from then on

        if (
            parent is not None
            and parent_read
            and [r.digest for r in segments] == [r.digest for r in parent_refs]
        ):
            # The answer is the parent version: its list must be in the store too.
            if parent.manifest_digest in lost_objects:
                result.uploaded_bytes += await _restore_manifest_object(
                    site.repo, parent.manifest_digest
                )
            await site.catalog.clear_checkpoint(dataset, owner_id())
            await site.catalog.pushed_replica(
                dataset, str(tree), parent.version, result.files, result.bytes, held
            )
            result.version, result.unchanged = parent.version, True
            result.seconds = round(time.monotonic() - started, 3)
            return result
        if not force:
            _check_not_emptied(dataset, result, parent)
            await _check_nested_unchanged(site, dataset, tree, nearby)

        listing = encode_list(segments)
        list_digest = await site.repo.put_manifest_object(listing)
        doc = VersionDoc(
            dataset=dataset,
            # After every listed id, a passed-over malformed one too: it must not stay the
            # latest (its id may be ahead of this clock, from a site whose clock runs fast).
            version=new_version_id(site.name, after=newest),
            parent=parent_id,
            site=site.name,
            created=utc_now(),
            manifest=list_digest.hex(),
            manifest_size=len(listing),
            segments=len(segments),
            files=result.files,
            dirs=result.dirs,
            symlinks=result.symlinks,
            bytes=result.bytes,
        )
        body = doc.to_bytes()
        await site.repo.publish(doc)
        result.uploaded_bytes += len(listing) + len(body)
        result.version = doc.version
        await site.catalog.record_versions([doc])
        await site.catalog.clear_checkpoint(dataset, owner_id())
        await site.catalog.pushed_replica(
            dataset, str(tree), doc.version, doc.files, doc.bytes, held
        )
        result.seconds = round(time.monotonic() - started, 3)
        return result


def _check_not_emptied(dataset: str, result: PushResult, parent: VersionDoc | None) -> None:
    """`Conflict` if the tree is empty while the version it would follow is not: an
    unmounted file system shows an empty mount point, and published, an empty latest has
    every site staging it with `--delete` move its copy to the trash."""
    if parent is None or result.files or result.dirs or result.symlinks:
        return
    held = parent.files + parent.dirs + parent.symlinks
    if held:
        raise Conflict(
            f"{dataset!r}: the tree is empty, but the latest version {parent.version} holds "
            f"{counted(parent.files, 'file')} and "
            f"{counted(parent.dirs, 'directory', 'directories')}; is its file system mounted? "
            "Publish the empty tree with --force"
        )


def _add_sent(into: PushResult, other: PushResult) -> None:
    """Add what `other` sent to the store (a heal pass's predecessor) to `into`."""
    for name in ("uploaded_bytes", "packs", "new_chunks", "new_chunk_bytes"):
        setattr(into, name, getattr(into, name) + getattr(other, name))


async def _restore_manifest_object(repo: Repository, digest: bytes) -> int:
    """Upload again a manifest segment or list the store lost, from the local cache
    (verified against its digest when read); the bytes sent."""
    data = await asyncio.to_thread(repo.read_cached, digest)
    if data is None:
        raise Corrupt(
            f"manifest object {digest.hex()} is gone from the store and from the local cache"
        )
    log.warning("manifest object %s was gone from the store; uploaded it again", digest.hex())
    await repo.put_manifest_object(data)
    return len(data)


class _PassProgress:
    """`progress` across heal passes, each of which walks the whole tree again: a pass
    reports only what goes beyond what earlier passes reported, so counts never go back
    and no file is counted twice."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.files = self.bytes = 0  # reported so far
        self._files = self._bytes = 0  # this pass so far

    def next_pass(self) -> None:
        """A new pass starts from nothing."""
        self._files = self._bytes = 0

    def total(self, files: int | None, nbytes: int | None) -> None:
        """Passed on."""
        self.progress.total(files, nbytes)

    def advance(self, files: int, nbytes: int) -> None:
        """Counted; reported beyond the earlier passes' counts."""
        self._files += files
        self._bytes += nbytes
        more_files, more_bytes = max(0, self._files - self.files), max(0, self._bytes - self.bytes)
        if more_files or more_bytes:
            self.files += more_files
            self.bytes += more_bytes
            self.progress.advance(more_files, more_bytes)


def _entries_of(repo: Repository, ref: SegmentRef) -> list[Entry]:
    """The entries of segment `ref`, from the manifest cache (blocking)."""
    return list(repo.iter_cached([ref], check=False))


def _without(entries: Iterator[Entry | SegmentRef], lost: set[bytes]) -> Iterator[Entry]:
    """`entries` minus those with a chunk in a `lost` pack: the scanner then finds no
    previous entry for those files and reads them again. Segment marks are left out (no
    segment is taken whole then)."""
    for entry in entries:
        if isinstance(entry, Entry) and not any(c.pack in lost for c in entry.chunks):
            yield entry


async def _build(
    site: Site,
    dataset: str,
    *,
    root: TreeRoot,
    params: ChunkerParams,
    parent_refs: list[SegmentRef],
    resumed: list[SegmentRef],
    lost: set[bytes],
    check: ReuseCheck,
    checksum: bool,
    progress: Progress,
    changed_since_ns: int | None = None,
    resumed_since_ns: int | None = None,
    after_interrupted: bool = False,
) -> tuple[PushResult, list[SegmentRef]]:
    """Walk, read what changed, upload packs and segments; the counts and the manifest list.
    Files changed since `changed_since_ns` (`resumed_since_ns` for those the `resumed`
    segments hold) by their ctime are read (`Scanner`). `after_interrupted`: a push of the
    dataset did not finish before this one, so its first packs are looked for in the store
    before they are sent (`Packer.stored_first`).

    Previous entries with a chunk in a `lost` pack are not reused (their files are read
    again), nor is any segment taken whole then. Every reused chunk reference goes to
    `check`, whose answer the caller awaits.
    """
    t = site.config.transfer
    level = None if t.compression == "never" else t.zstd_level
    passed = Passed()  # how far the walk passed over segments (`Scanner.check_ahead`)
    previous = _previous(site.repo, resumed, parent_refs, marked=not lost, passed=passed)
    if lost:
        previous = _without(previous, lost)
    # Two readers per core: reading a cold tree waits on the disk as much as it computes.
    workers = t.read_workers if t.read_workers > 0 else 2 * (os.cpu_count() or 1)
    links = site.config.namespace.link_to_logical
    scanner = Scanner(
        root,
        previous,
        params,
        checksum,
        level,
        workers,
        links,
        changed_since_ns,
        t.lookup_threads,
    )
    if resumed and resumed_since_ns is not None:
        scanner.resume_cutoff(sort_key(resumed[-1].last_path), resumed_since_ns)
    if not resumed and not lost:
        scanner.check_ahead(parent_refs, site.repo.cache_file, passed)
    packer = Packer(site.store, site.catalog, t.pack_size, t.upload_concurrency, after_interrupted)

    # Checkpoint rows let a rerun skip what this run uploaded. A reused segment uploaded
    # nothing, so its row waits for the next new segment's (one transaction for both, so the
    # rows stay a prefix of the list) or for `_CHECKPOINT_BATCH` of them: a no-op push of
    # a 600-million-file tree would otherwise commit a row for each of ~150,000 segments.
    unrecorded: list[tuple[int, SegmentRef]] = []

    async def on_segment(seq: int, ref: SegmentRef, reused: bool) -> None:
        unrecorded.append((seq, ref))
        if reused and len(unrecorded) < _CHECKPOINT_BATCH:
            return
        rows = unrecorded.copy()
        unrecorded.clear()
        await site.catalog.add_checkpoint_segments(dataset, rows, owner_id())

    known = {r.digest for r in parent_refs} | {r.digest for r in resumed}
    reusable = [] if lost else _reusable(resumed, parent_refs)
    writer = ManifestWriter(site.repo, packer, t.segment_entries, known, reusable, on_segment)
    result = PushResult(dataset, "", None, False)
    current: dict[bytes, Ref] = {}  # where the chunks of files being assembled went
    previous: dict[bytes, ChunkRef] = {}  # the previous chunks of the large file being read
    reading: asyncio.Future[list[object]] = asyncio.ensure_future(
        asyncio.to_thread(scanner.next_batch)
    )
    try:
        while batch := await reading:
            reading = asyncio.ensure_future(asyncio.to_thread(scanner.next_batch))
            # Large files are read one after another: a batch may end one file and begin
            # others, so its chunks are looked up in the previous chunks of all of them,
            # and the last one's go on to the next batch.
            marks = [p for p in batch if isinstance(p, Previous)]
            offered = previous
            if marks:
                offered = dict(previous)
                for mark in marks:
                    offered.update((c.digest, c) for c in mark.chunks)
                previous = {c.digest: c for c in marks[-1].chunks}
            new = [p for p in batch if isinstance(p, NewChunk)]
            if new:
                refs = await packer.lookup([c.digest for c in new], offered)
                missing = [c for c in new if c.digest not in refs]
                if missing:
                    refs.update(await packer.add(missing))
                current.update(refs)
            files = nbytes = 0
            for piece in batch:
                if isinstance(piece, SameSegment):
                    if piece.found is not None:
                        check.ends(piece.found.ends)
                    else:
                        check.entries(piece.entries or [])
                    if check.full():
                        await check.flush()
                    n_files, n_dirs, n_links, n_bytes = piece.counts()
                    result.files += n_files
                    result.bytes += n_bytes
                    result.dirs += n_dirs
                    result.symlinks += n_links
                    files += n_files
                    nbytes += n_bytes
                    entries = piece.entries
                    if entries is None and not writer.takes_whole(piece.ref):
                        entries = await asyncio.to_thread(_entries_of, site.repo, piece.ref)
                    await writer.append_segment(piece.ref, entries or [])
                    continue
                if not isinstance(piece, Done):
                    continue
                entry = piece.entry
                if piece.digests is not None:
                    entry.chunks = tuple(current[d] for d in piece.digests)
                elif entry.chunks:
                    check.chunks(entry.chunks)
                    if check.full():
                        await check.flush()
                if entry.kind == Kind.FILE:
                    result.files += 1
                    result.bytes += entry.size
                    files += 1
                    nbytes += entry.size
                elif entry.kind == Kind.DIR:
                    result.dirs += 1
                else:
                    result.symlinks += 1
                await writer.append(entry, piece.same)
            current = _unfinished(batch, current)
            progress.advance(files, nbytes)
        await packer.close()
        segments = await writer.finish()
    except BaseException:
        await asyncio.gather(reading, return_exceptions=True)  # the thread must stop first
        await packer.abort()
        await writer.abort()
        raise
    finally:
        await asyncio.to_thread(scanner.close)

    stats = scanner.stats
    result.files_read, result.bytes_read = stats.files_read, stats.bytes_read
    result.skipped_special = stats.skipped_special
    result.skipped_special_count = stats.skipped_special_count
    result.skipped_partial = stats.skipped_partial
    result.skipped_partial_count = stats.skipped_partial_count
    result.new_chunks, result.new_chunk_bytes = (
        packer.stats.new_chunks,
        packer.stats.new_chunk_bytes,
    )
    result.packs = packer.stats.packs
    result.uploaded_bytes = packer.stats.pack_bytes + writer.uploaded_bytes
    return result, segments
