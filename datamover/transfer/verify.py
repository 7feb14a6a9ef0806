"""Verify: does the local tree match a version's manifest, byte for byte?

Checks every entry's presence, kind, mode, symlink target, file size, mtime and content (each
chunk re-hashed with BLAKE3 at its manifest offset); local entries the version does not have
count as differences unless `allow_extra`, except sockets, FIFOs and devices, which push
skips (they hold no data): one the version has nothing at is listed, not a difference (one
where the version has an entry is). Directories' mtimes are compared too (stage sets them
last), except with `allow_extra`, since adding a file changes its directory's mtime;
symlinks' mtimes are not (stage keeps a link that points right as it is). An mtime counts
as the entry's when it is what this file system stores for the entry's (1 s timestamps, no
time before 1901), as stage compares them (`fsops.stored_mtime`). The dataset's directory
must be a directory itself, not a symlink below the configured one: stage never writes
through one, so a tree reached through it is not the one stage maintains.
Read-only (the timestamp probe's file has no name where the file system allows); streams
both sides. The walk holds the dataset's lock shared (`locks`): a verify does not start
while a stage of the dataset runs on this host (`Conflict`), and a stage waits while a
verify walks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datamover.domain.manifest import Entry, Kind, without_setid
from datamover.domain.namespace import Namespace
from datamover.domain.paths import PARTIAL_RE, check_logical_path, printable, sort_key
from datamover.errors import DatamoverError, InvalidInput, NotFound
from datamover.repo.manifest import SegmentRef
from datamover.site import Site
from datamover.transfer.fsops import check_root, content_problem, lazy_stored_mtime, same_mtime
from datamover.transfer.locks import take_lock
from datamover.transfer.walk import SKIPPED_SAMPLE, LocalEntry, Walker

log = logging.getLogger(__name__)

_MAX_LISTED = 100  # problems named


@dataclass
class VerifyResult:
    """The outcome of a verify (`--json` prints it)."""

    dataset: str
    version: str
    ok: bool = True
    files_checked: int = 0
    bytes_checked: int = 0
    problem_count: int = 0
    problems: list[str] = field(default_factory=list)
    #: Local sockets, FIFOs and devices the version has nothing at: push skips them, so
    #: they are no difference (the first 100 named, all counted).
    skipped_special: list[str] = field(default_factory=list)
    skipped_special_count: int = 0
    seconds: float = 0.0
    #: When the version compared with was the one staged here (no version asked for): the
    #: latest version published, if that is another one, so a tree that matches what was
    #: staged is not taken for up to date. None otherwise.
    newer: str | None = None

    def add(self, problem: str) -> None:
        """Record one difference (only the first 100 are kept verbatim)."""
        self.ok = False
        self.problem_count += 1
        if len(self.problems) < _MAX_LISTED:
            self.problems.append(problem)

    def skip_special(self, path: str) -> None:
        """Record a special file the version has no entry at."""
        self.skipped_special_count += 1
        if len(self.skipped_special) < SKIPPED_SAMPLE:
            self.skipped_special.append(path)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _compare(
    root: str,
    local: LocalEntry,
    entry: Entry,
    result: VerifyResult,
    links: Namespace,
    allow_extra: bool,
    stored_mtime: Callable[[int], int],
) -> None:
    path = entry.path
    if local.kind != entry.kind:
        want = entry.kind.name.lower()
        have = local.kind.name.lower() if local.kind is not None else "special file"
        result.add(f"{path}: is a {have}, expected a {want}")
        return
    if entry.kind == Kind.SYMLINK:
        if not links.same_link(local.target or "", entry.target or ""):
            want = links.link_to_local(entry.target or "")
            result.add(f"{path}: symlink points to {local.target!r}, expected {want!r}")
        return
    if local.mode != entry.mode:
        result.add(f"{path}: mode {local.mode:o}, expected {entry.mode:o}")
    if entry.kind == Kind.DIR:
        if not allow_extra and not same_mtime(local.mtime_ns, entry.mtime_ns, stored_mtime):
            result.add(f"{path}: modification time differs from the version")
        return
    result.files_checked += 1
    result.bytes_checked += entry.size
    if local.size != entry.size:
        result.add(f"{path}: size {local.size}, expected {entry.size}")
        return
    problem = content_problem(root, entry)
    if problem is not None:
        result.add(f"{path}: {problem}")
        return
    if not same_mtime(local.mtime_ns, entry.mtime_ns, stored_mtime):
        result.add(f"{path}: modification time differs from the version")


def _verify(
    site: Site,
    root: str,
    refs: list[SegmentRef],
    allow_extra: bool,
    result: VerifyResult,
    stop: threading.Event,
) -> None:
    """`_merge`, with mtimes compared as the dataset directory's file system stores them
    (probed there at the first mtime that differs, as stage does). A directory whose mode
    is the version's and denies its owner reading or searching it (0o600) gets those bits
    while the walk is in it, and its mode back as the walk leaves it."""
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        root_fd = -1  # the walk reports why
    walker = Walker(root, strict=False, lookup_threads=site.config.transfer.lookup_threads)
    try:
        stored = lazy_stored_mtime(root_fd) if root_fd >= 0 else int
        _merge(walker, site, root, refs, allow_extra, result, stored, stop)
    finally:
        walker.close()
        if root_fd >= 0:
            os.close(root_fd)


def _merge(
    walker: Walker,
    site: Site,
    root: str,
    refs: list[SegmentRef],
    allow_extra: bool,
    result: VerifyResult,
    stored_mtime: Callable[[int], int],
    stop: threading.Event,
) -> None:
    """Merge the local walk with the version's entries, recording every difference, until
    both end or `stop` is set."""
    links = site.config.namespace
    target = without_setid(site.repo.iter_cached(refs, check=True))
    local = next(walker, None)
    entry = next(target, None)
    while (local is not None or entry is not None) and not stop.is_set():
        lkey = sort_key(local.path) if local else None
        ekey = sort_key(entry.path) if entry else None
        if entry is not None and (lkey is None or (ekey is not None and ekey < lkey)):
            result.add(f"{entry.path}: missing")
            entry = next(target, None)
        elif local is not None and (ekey is None or (lkey is not None and lkey < ekey)):
            if local.kind is None:
                result.skip_special(local.path)
            elif allow_extra:
                pass
            elif PARTIAL_RE.match(local.path.rpartition("/")[2]):
                result.add(
                    f"{printable(local.path)}: a partial file of an interrupted stage (stage "
                    "again to finish it)"
                )
            else:
                result.add(f"{printable(local.path)}: not in the version")
            if local.kind == Kind.DIR:
                walker.prune()
            local = next(walker, None)
        else:
            assert local is not None and entry is not None
            _compare(root, local, entry, result, links, allow_extra, stored_mtime)
            if local.kind == entry.kind == Kind.DIR and local.mode == entry.mode:
                walker.allow_unlock()  # the version's mode (0o600), no user's chmod
            if local.kind == Kind.DIR and entry.kind != Kind.DIR:
                walker.prune()
            local = next(walker, None)
            entry = next(target, None)


def _root_problem(base: Path, parts: tuple[str, ...]) -> str | None:
    """Why the dataset's directory is not one stage would write into (`fsops.check_root`),
    or None."""
    try:
        check_root(base, parts)
    except (NotFound, InvalidInput) as exc:
        return exc.message
    return None


async def verify(
    site: Site, logical: str, *, version: str | None = None, allow_extra: bool = False
) -> VerifyResult:
    """Compare the local tree of `logical` with `version` (default: the version staged here,
    else the latest)."""
    started = time.monotonic()
    dataset = check_logical_path(logical)
    base, parts = site.config.namespace.split(dataset)
    root = base.joinpath(*parts)
    staged = False
    if version is None:
        replica = await site.catalog.replica(dataset)
        if replica is not None and replica.state == "ready":
            version, staged = replica.version, True
    doc = await site.repo.resolve(dataset, version)
    refs = await site.repo.prefetch(doc)
    result = VerifyResult(dataset, doc.version)
    if staged:
        result.newer = await _newer(site, dataset, doc.version)
    lock = await take_lock(site.state_dir, dataset, reader="verify")
    try:
        problem = await asyncio.to_thread(_root_problem, base, parts)
        if problem is not None:
            result.add(problem)
        else:
            await _walk(site, str(root), refs, allow_extra, result)
    finally:
        if lock is not None:
            os.close(lock)
    result.seconds = round(time.monotonic() - started, 3)
    return result


async def _newer(site: Site, dataset: str, version: str) -> str | None:
    """The latest version of `dataset` if it is newer than `version`. Best effort: the
    note is not worth failing the verify for, so a listing the store refuses or fails (a
    key that may read but not list) is a warning and no note."""
    try:
        latest = await site.repo.latest(dataset)
    except DatamoverError as exc:
        log.warning("could not look for versions newer than %s: %s", version, exc)
        return None
    return latest if latest is not None and latest > version else None


async def _walk(
    site: Site, root: str, refs: list[SegmentRef], allow_extra: bool, result: VerifyResult
) -> None:
    """`_verify` in a thread. Shielded: the lock that keeps stages out must be held until
    the walk, which may give a directory its owner's bits, has given back every mode; a
    cancel stops it at its next entry and waits for that."""
    stop = threading.Event()
    walk = asyncio.ensure_future(
        asyncio.to_thread(_verify, site, root, refs, allow_extra, result, stop)
    )
    try:
        await asyncio.shield(walk)
    except BaseException:
        stop.set()
        await asyncio.gather(walk, return_exceptions=True)
        raise
