"""The repository: the self-describing layout of docs/format.md on top of a Store.

Owns the bucket's `config`, version documents (publish, list, resolve "latest") and manifest
objects, which it caches on local disk by digest: they are immutable, a stage reads them
twice (check, then apply) and the next push reads them again as its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import blake3

from datamover.aio import drain, gather_or_cancel
from datamover.chunking.chunker import ChunkerParams
from datamover.chunking.pack import least_sizes, pack_key
from datamover.domain.manifest import Entry, Kind
from datamover.domain.paths import check_logical_path, is_under
from datamover.errors import Corrupt, InvalidInput, NotFound, ObjectNotFound, PermanentError
from datamover.repo.layout import (
    CONFIG_KEY,
    FORMAT_VERSION,
    VersionDoc,
    dataset_prefixes,
    legacy_versions_prefix,
    manifest_key,
    parse_version_key,
    tree_prefixes,
    version_key,
    versions_prefix,
    versions_prefixes,
)
from datamover.repo.manifest import EntryChecker, SegmentRef, decode_list, decode_segment
from datamover.storage.base import MAX_KEY_BYTES, Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The most a config or version document may hold (they are a few hundred bytes).
DOCUMENT_LIMIT = 1 << 20


def utc_now() -> str:
    """Current UTC time in the format used by stored documents."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _all_true(checks: Iterable[Coroutine[Any, Any, bool]], batch: int = 256) -> bool:
    """Await `checks` a batch at a time (a bounded number of tasks); False at the first
    batch with a False (the rest are not started)."""
    pending: list[Coroutine[Any, Any, bool]] = []
    for check in checks:
        pending.append(check)
        if len(pending) == batch:
            if not all(await gather_or_cancel(pending)):
                return False
            pending = []
    return all(await gather_or_cancel(pending))


class Repository:
    """Repository operations over `store`, with a manifest cache under `cache_dir`."""

    def __init__(self, store: Store, cache_dir: Path, fetch_concurrency: int = 8) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.fetch_concurrency = fetch_concurrency
        self._fetch_limit = asyncio.Semaphore(fetch_concurrency)
        self.fetched_bytes = 0  # manifest bytes read from the store (not the cache)
        self._swept = False  # whether this process swept the cache's stale temporary files

    # -- repository config ---------------------------------------------------------------

    async def chunker_params(self, create: bool) -> ChunkerParams:
        """The repository's chunker parameters; with `create`, write defaults if absent.

        Raises `Corrupt` for a config that is not a JSON object with usable chunker
        parameters, `PermanentError` for a format or hash this datamover does not know.
        """
        try:
            raw = await self._get_document(CONFIG_KEY, "repository config")
        except ObjectNotFound:
            if not create:
                return ChunkerParams()
            params = ChunkerParams()
            doc = {
                "format": FORMAT_VERSION,
                "hash": "blake3",
                "created": utc_now(),
                "chunker": params.to_json(),
            }
            await self.store.put(CONFIG_KEY, json.dumps(doc, sort_keys=True).encode())
            # Two first writers may race; both wrote the same defaults, so reading back
            # below settles on whatever is there.
            raw = await self._get_document(CONFIG_KEY, "repository config")
        try:
            doc = json.loads(raw)
            fmt, digest = doc["format"], doc["hash"]
        except (ValueError, KeyError, TypeError, RecursionError):
            # Not the store's fault if something else answered (a web page at the endpoint):
            # a listing says so (`S3Store` refuses one that is not S3's), not "corrupt".
            async for _ in self.store.list(CONFIG_KEY):
                break
            raise Corrupt(f"repository config in {self.store.description} is malformed") from None
        # `true == 1` in Python: the type is checked too, or a config no writer made passes.
        if type(fmt) is not int or fmt != FORMAT_VERSION or digest != "blake3":
            raise PermanentError(
                f"repository in {self.store.description} has format {fmt!r} with hash "
                f"{digest!r}; this datamover understands format {FORMAT_VERSION} with blake3"
            )
        return ChunkerParams.from_json(doc.get("chunker"))

    async def _get_document(self, key: str, what: str) -> bytes:
        """A small JSON object (config, version document), read at most `DOCUMENT_LIMIT`
        bytes of: an untrusted store must not make a reader allocate whatever it holds.
        Raises `ObjectNotFound` if missing, `Corrupt` if larger than the limit."""
        data = await self.store.get(key, 0, DOCUMENT_LIMIT + 1)
        if len(data) > DOCUMENT_LIMIT:
            raise Corrupt(f"{what} is larger than {DOCUMENT_LIMIT} bytes: not one datamover wrote")
        return data

    # -- versions ------------------------------------------------------------------------

    async def version_ids(self, dataset: str) -> list[str]:
        """All version ids of `dataset`, ascending (oldest first), under its key and, for a
        long path, its legacy uncut key (docs/format.md, "Keys")."""
        ids = set()
        for prefix in versions_prefixes(dataset):
            async for info in self.store.list(prefix):
                parsed = parse_version_key(info.key)
                if parsed and parsed[0] == dataset:
                    ids.add(parsed[1])
        return sorted(ids)

    async def latest(self, dataset: str) -> str | None:
        """The greatest version id of `dataset`, or None if it has none."""
        ids = await self.version_ids(dataset)
        return ids[-1] if ids else None

    async def read_version(self, dataset: str, version: str) -> VersionDoc:
        """Read a version document (from its legacy uncut key if it is not under its key);
        raise `NotFound` if the dataset has no such version. A key longer than a store
        takes (a cut key a few bytes past the limit, where the uncut one fits) cannot hold
        it and is not asked for."""
        for key in (prefix + version for prefix in versions_prefixes(dataset)):
            if len(key) > MAX_KEY_BYTES:  # percent-encoded: one byte a character
                continue
            try:
                data = await self._get_document(key, f"version document {key}")
                break
            except ObjectNotFound:
                continue
        else:
            raise NotFound(f"dataset {dataset!r} has no version {version!r}")
        doc = VersionDoc.from_bytes(data, f"version document {key}")
        if doc.dataset != dataset or doc.version != version:
            raise Corrupt(f"version document {key} describes {doc.dataset!r} {doc.version!r}")
        return doc

    async def resolve(self, dataset: str, version: str | None) -> VersionDoc:
        """The named version, or the latest; raise `NotFound` naming what is missing."""
        if version is None:
            version = await self.latest(dataset)
            if version is None:
                raise NotFound(f"dataset {dataset!r} has no published version in the store")
        return await self.read_version(dataset, version)

    async def publish(self, doc: VersionDoc) -> None:
        """Write the version document: the single act that makes a version visible.

        Under the legacy uncut key when its parent is stored there and not under its own
        key, so a long path's versions written before keys were cut stay under one prefix
        (listed together, and seen by sites running an older datamover). A key longer than
        a store takes is not asked for: a parent's cut key can be a few bytes past the
        limit where its uncut key fits (a cut key is never shorter than the uncut one, so
        the version's own uncut key fits wherever `check_key_length` let it be pushed)."""
        key = version_key(doc.dataset, doc.version)
        legacy = legacy_versions_prefix(doc.dataset)
        if (
            legacy is not None
            and doc.parent is not None
            and not await self._stored_key(version_key(doc.dataset, doc.parent))
            and await self._stored_key(legacy + doc.parent)
        ):
            key = legacy + doc.version
        await self.store.put(key, doc.to_bytes())

    async def datasets(self, prefix: str = "/") -> AsyncIterator[tuple[str, str]]:
        """Yield `(dataset, version)` for every version under logical `prefix`, sorted by key
        (a long prefix's legacy uncut keys after the others, sorted among themselves): a
        dataset's versions come one after another."""
        async for dataset, version, _ in self.listed_versions(prefix):
            yield dataset, version

    async def listed_versions(
        self, prefix: str = "/", start_after: str = "", only: bool = False
    ) -> AsyncIterator[tuple[str, str, bool]]:
        """`datasets` as `(dataset, version, legacy)`, `legacy` telling a version under its
        dataset's uncut key (docs/format.md, "Keys"); with `start_after` (a key, as
        `resume_key` gives), only the versions whose keys sort after it, the listing before
        it not read. `InvalidInput` if `start_after` lies under none of the prefix's keys.
        With `only`, the versions of dataset `prefix` itself, its nested datasets' keys not
        listed. Only the keys of `prefix` and the datasets below it are listed
        (`tree_prefixes`), not those of datasets whose paths merely start with the same
        characters (`/proj/run10` for `/proj/run1`)."""
        prefix = "/" if prefix == "/" else check_logical_path(prefix)
        if prefix == "/":
            key_prefixes = dataset_prefixes("")
        elif only:
            key_prefixes = versions_prefixes(prefix)
        else:
            key_prefixes = tree_prefixes(prefix)
        if start_after:
            # The key prefixes are listed one after the other: resume in the first that
            # holds `start_after`.
            first = next((i for i, k in enumerate(key_prefixes) if start_after.startswith(k)), None)
            if first is None:
                raise InvalidInput(f"listing cursor lies outside the datasets under {prefix!r}")
            key_prefixes = key_prefixes[first:]
        for i, key_prefix in enumerate(key_prefixes):
            async for info in self.store.list(key_prefix, start_after if i == 0 else ""):
                parsed = parse_version_key(info.key)
                if parsed and (parsed[0] == prefix if only else is_under(parsed[0], prefix)):
                    yield parsed[0], parsed[1], not info.key.startswith(versions_prefix(parsed[0]))

    # -- manifest objects ----------------------------------------------------------------

    def _cache_path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.cache_dir / "manifests" / h[:2] / h

    def cache_file(self, digest: bytes) -> str:
        """Where manifest object `digest` is cached (it may not be): for a worker process
        to read and verify it itself."""
        return str(self._cache_path(digest))

    def _write_cache(self, digest: bytes, data: bytes) -> None:
        """Cache manifest object `data` under a temporary name in `manifests/tmp/`, renamed
        into place; a write that fails (a full disk, a quota) removes its temporary file and
        raises. The first write of a process sweeps the temporary files a killed writer
        left (`_sweep_tmp`)."""
        path = self._cache_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.cache_dir / "manifests" / "tmp"
        tmp_dir.mkdir(exist_ok=True)
        if not self._swept:
            self._swept = True
            _sweep_tmp(tmp_dir)
            _sweep_legacy_tmp(tmp_dir.parent)
        tmp = tmp_dir / f"{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def put_manifest_object(self, data: bytes) -> bytes:
        """Store a manifest segment or list by digest (and cache it); return the digest.
        Once it is stored, a cache write that fails is a warning, not a failure: readers
        fetch from the store what the cache lacks."""
        digest = blake3.blake3(data).digest()
        await self.store.put(manifest_key(digest), data)
        try:
            await asyncio.to_thread(self._write_cache, digest, data)
        except OSError as exc:
            log.warning(
                "manifest object %s is stored but could not be cached in %s: %s",
                digest.hex(),
                self.cache_dir,
                exc.strerror or exc,
            )
        return digest

    def read_cached(self, digest: bytes) -> bytes | None:
        """A verified manifest object from the local cache, or None (blocking I/O)."""
        path = self._cache_path(digest)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if blake3.blake3(data).digest() != digest:
            # Local damage: the caller fetches the object, and caching it renames a good
            # copy over this one. Not removed here: a writer may have renamed a good copy
            # into place since it was read, and no check before an unlink closes that gap.
            return None
        return data

    async def manifest_object(self, digest: bytes, size: int) -> bytes:
        """A manifest object by digest: from the cache, else fetched, verified and cached.

        `size` is its length as the referring object (version document, manifest list)
        states it: at most one byte more is read, so a store answering something larger
        costs no more memory than the real object would. Raises `Corrupt` if the object is
        missing, of another size, or does not match `digest`.
        """
        data = await asyncio.to_thread(self.read_cached, digest)
        if data is not None:
            return data
        key = manifest_key(digest)
        async with self._fetch_limit:
            try:
                data = await self.store.get(key, 0, size + 1) if size else b""
            except ObjectNotFound:
                raise Corrupt(f"manifest object {key} is missing from the store") from None
        self.fetched_bytes += len(data)
        if len(data) != size:
            raise Corrupt(
                f"manifest object {key} is {'more than ' if len(data) > size else ''}"
                f"{min(len(data), size)} bytes, its reference says {size}: the data is corrupt"
            )
        if blake3.blake3(data).digest() != digest:
            raise Corrupt(f"manifest object {key} does not match its digest: the data is corrupt")
        await asyncio.to_thread(self._write_cache, digest, data)
        return data

    async def segments(self, doc: VersionDoc) -> list[SegmentRef]:
        """The manifest list of a version (small: one line per segment).

        Raises `Corrupt` unless the list is as long as the version says and its lines add
        up to the version's totals (entries, file bytes); `iter_cached` then checks each
        line against its segment, so the totals a stage records are the manifest's.
        """
        what = f"manifest list {manifest_key(doc.manifest_digest)}"
        data = await self.manifest_object(doc.manifest_digest, doc.manifest_size)
        if len(data) != doc.manifest_size:  # a cached list is checked here
            raise Corrupt(
                f"{what} is {len(data)} bytes, its version {doc.version} says {doc.manifest_size}"
            )
        refs = await asyncio.to_thread(lambda: list(decode_list(data, what)))
        if len(refs) != doc.segments:
            raise Corrupt(f"{what} lists {len(refs)} segments, its version says {doc.segments}")
        entries = sum(r.entries for r in refs)
        if entries != doc.files + doc.dirs + doc.symlinks:
            raise Corrupt(
                f"{what} lists {entries} entries, its version {doc.version} says "
                f"{doc.files + doc.dirs + doc.symlinks}"
            )
        if sum(r.bytes for r in refs) != doc.bytes:
            raise Corrupt(
                f"{what} lists {sum(r.bytes for r in refs)} file bytes, its version "
                f"{doc.version} says {doc.bytes}"
            )
        return refs

    async def prefetch(self, doc: VersionDoc) -> list[SegmentRef]:
        """Bring every segment of `doc` into the local cache; return the manifest list.

        Bounded memory: `fetch_concurrency` segments are read at once and each is dropped
        once cached (readers take them from the cache: `iter_cached`), so at most that many
        are held, whatever the manifest's size. The first failure (`Corrupt`, a store
        error) cancels the fetches under way and is raised; the segments cached stay.
        """
        refs = await self.segments(doc)
        await drain(
            (self.manifest_object(ref.digest, ref.stored_size) for ref in refs),
            self.fetch_concurrency,
        )
        return refs

    async def all_stored(self, refs: list[SegmentRef]) -> bool:
        """Whether the store still has every segment of `refs` and every pack their entries
        reference, whole (`pack.least_sizes`: a pack cut short counts as missing); the
        segments end up in the local cache (a cached one is confirmed with a HEAD, a missing
        one fetched). Requests go `fetch_concurrency` at a time, and at most four times as
        many segments are checked together: a fetched segment is held until it is written
        to the cache, so a batch of 256 could hold 256 segments at once."""

        async def segment(ref: SegmentRef) -> bool:
            if await asyncio.to_thread(self.read_cached, ref.digest) is not None:
                return await self.stored(manifest_key(ref.digest))
            try:
                await self.manifest_object(ref.digest, ref.stored_size)
            except Corrupt:
                return False
            return True

        if not await _all_true((segment(r) for r in refs), batch=4 * self.fetch_concurrency):
            return False
        least = await asyncio.to_thread(
            lambda: least_sizes(c for e in self.iter_cached(refs, check=False) for c in e.chunks)
        )
        return await _all_true(self._holds(pack, size) for pack, size in least.items())

    async def _holds(self, pack: bytes, least: int) -> bool:
        size = await self.stored_size(pack_key(pack))
        return size is not None and size >= least

    async def _stored_key(self, key: str) -> bool:
        """`stored`, False for a key longer than a store takes (never asked)."""
        return len(key) <= MAX_KEY_BYTES and await self.stored(key)

    async def stored(self, key: str) -> bool:
        """Whether the store has `key` (one HEAD, within the fetch concurrency)."""
        return await self.stored_size(key) is not None

    async def stored_size(self, key: str) -> int | None:
        """The size of `key` in the store, None if it has no such object (one HEAD, within
        the fetch concurrency)."""
        async with self._fetch_limit:
            try:
                return (await self.store.head(key)).size
            except ObjectNotFound:
                return None

    def iter_cached(self, refs: list[SegmentRef], check: bool = True) -> Iterator[Entry]:
        """Entries of a prefetched manifest, from the cache, one segment in memory at a time.

        The segment's size, entry count, path bounds and file bytes are compared with its
        line in the list (`Corrupt` after its last entry if they differ); with `check`,
        every tree rule is enforced too (`EntryChecker`). Blocking: run it in a thread.
        """
        checker = EntryChecker()
        for ref in refs:
            data = self.read_cached(ref.digest)
            if data is None:
                raise Corrupt(f"manifest segment {ref.digest.hex()} vanished from the cache")
            what = f"manifest segment {manifest_key(ref.digest)}"
            if len(data) != ref.stored_size:
                raise Corrupt(
                    f"{what} is {len(data)} bytes, its line in the manifest list says "
                    f"{ref.stored_size}"
                )
            count = size = 0
            first = last = None
            for entry in decode_segment(data, what):
                if check:
                    checker.check(entry)
                count += 1
                if entry.kind == Kind.FILE:
                    size += entry.size
                if first is None:
                    first = entry.path
                last = entry.path
                yield entry
            if (
                count != ref.entries
                or first != ref.first_path
                or last != ref.last_path
                or size != ref.bytes
            ):
                raise Corrupt(f"{what} does not match its line in the manifest list")


_LEGACY_TMP = re.compile(r"\A\.[0-9a-f]{64}\.[0-9a-f]{8}\.tmp\Z")
_LEGACY_SWEPT = ".legacy-tmp-swept"


def _sweep_legacy_tmp(manifests: Path) -> None:
    """Remove the stale temporary files that builds before `manifests/tmp/` left beside the
    cached objects (`manifests/xx/.<digest>.<8 hex>.tmp`, more than an hour old, as
    `_sweep_tmp`); once a pass leaves none of them, mark the cache swept
    (`tmp/.legacy-tmp-swept`) so that no later process lists its 256 directories again. A
    pass that leaves one (too recent: an older build may still be writing; not removable)
    or cannot list a directory is done again by the next process."""
    marker = manifests / "tmp" / _LEGACY_SWEPT
    if marker.exists():
        return
    now = time.time()
    left = 0
    try:
        with os.scandir(manifests) as subs:
            for sub in subs:
                if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as entries:
                    for entry in entries:
                        if _LEGACY_TMP.match(entry.name):
                            left += not _removed_if_stale(entry, now)
        if not left:
            marker.touch()
    except OSError:
        return


def _removed_if_stale(entry: os.DirEntry[str], now: float) -> bool:
    """Remove `entry` if it is more than `_STALE_TMP_SECONDS` old; whether it is gone."""
    try:
        if now - entry.stat().st_mtime <= _STALE_TMP_SECONDS:
            return False
        os.unlink(entry.path)
    except FileNotFoundError:
        pass  # another process removed it first
    except OSError:
        return False
    return True


#: A temporary file of the manifest cache older than this is a killed writer's (a write
#: takes well under a second): `_sweep_tmp` removes it.
_STALE_TMP_SECONDS = 3600


def _sweep_tmp(tmp_dir: Path) -> None:
    """Remove the stale temporary files in `tmp_dir` (a writer killed between writing and
    renaming left them; nothing else would); a file another process removes first, or one
    that cannot be removed, is skipped."""
    now = time.time()
    try:
        entries = list(os.scandir(tmp_dir))
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.name.endswith(".tmp") and now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                os.unlink(entry.path)
