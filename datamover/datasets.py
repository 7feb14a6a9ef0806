"""Listing datasets and their versions: the store is the truth, the catalog caches documents.

Version documents are immutable, so each is fetched from the store once and then served
from the catalog; listing a prefix costs one LIST plus GETs only for versions new to us.
The listing is read in batches and handed on one dataset at a time, so memory follows the
largest dataset's versions, not the whole tree's.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import asdict, dataclass, field
from typing import Any

from datamover.aio import drain
from datamover.domain.paths import check_logical_path
from datamover.errors import Corrupt, InvalidInput, NotFound
from datamover.repo.layout import VersionDoc, resume_key
from datamover.site import Site
from datamover.storage.base import MAX_KEY_BYTES

#: Version documents read at once.
_FETCHERS = 16
#: Listed versions looked up in the catalog (and read from the store) together.
_BATCH = 1024


@dataclass
class BadVersion:
    """A version whose document could not be used: listed, but not as a version."""

    path: str
    version: str
    error: Corrupt

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": self.path,
            "version": self.version,
            "code": self.error.code,
            "message": self.error.message,
        }


#: How a cursor names a dataset listed under its uncut key (`DatasetInfo.cursor`).
_LEGACY = "legacy:"


@dataclass
class DatasetInfo:
    """A dataset and its readable versions, oldest first, and those it could not read.

    `legacy` tells whether its last listed version lay under the dataset's uncut key
    (docs/format.md, "Keys"): a long path may be listed once under each spelling.
    """

    path: str
    versions: list[VersionDoc]
    bad: list[BadVersion] = field(default_factory=list)
    legacy: bool = False

    @property
    def cursor(self) -> str:
        """Where a listing resumes to go on after this dataset (`iter_datasets`'s `after`):
        its path, or `legacy:` and its path when listed under its uncut key."""
        return _LEGACY + self.path if self.legacy else self.path

    def add(self, doc: VersionDoc) -> None:
        """Add a version in id order: a long path's versions under its cut and its legacy
        uncut key (docs/format.md, "Keys") are listed one spelling after the other."""
        bisect.insort(self.versions, doc, key=lambda d: d.version)

    def merge(self, other: DatasetInfo) -> None:
        """Take in the versions and the unreadable ones of another listing of this path."""
        for doc in other.versions:
            self.add(doc)
        self.bad.extend(other.bad)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (readable versions only: `bad` is reported on its own)."""
        return {"path": self.path, "versions": [asdict(v) for v in self.versions]}


async def iter_datasets(
    site: Site, prefix: str = "/", after: str | None = None, only: bool = False
) -> AsyncIterator[DatasetInfo]:
    """Every dataset under logical `prefix` with all its versions, one dataset at a time,
    in the store's key order (the percent-encoded path: `/proj/a/b` before `/proj/a`; see
    `Repository.datasets` for a long prefix). With `after` (a `DatasetInfo.cursor` of an
    earlier listing of `prefix`), only the datasets listed after that one, the listing
    before it not read again; an `after` that is no such cursor is `InvalidInput`.

    A document is known by its dataset and id together: the catalog's cache is keyed by id,
    and a bucket may hold one id under two datasets (a document copied or crafted there), so
    a cached document of another dataset is not this one's. A version removed between the
    listing and the read of its document is left out, as if listed a moment later. A
    version whose document is corrupt is reported in its dataset's `bad` and not cached;
    a dataset with no readable version is yielded with no versions. Any other error (the
    store or catalog unavailable or refusing) ends the listing. With `only`, dataset
    `prefix` alone: the keys of datasets below it are not listed, nor their documents read.
    """
    start = "" if after is None else _resume_key(after)
    current: DatasetInfo | None = None
    listed = site.repo.listed_versions(prefix, start, only)
    async with aclosing(_batches(listed)) as batches:
        async for batch in batches:
            for info in _group(await _read(site, batch), current):
                if current is not None and info is not current and _listed(current):
                    yield current
                current = info
    if current is not None and _listed(current):
        yield current


def _resume_key(cursor: str) -> str:
    """The store key a listing resumes after for `cursor` (`DatasetInfo.cursor`)."""
    legacy = cursor.startswith(_LEGACY)
    try:
        path = check_logical_path(cursor.removeprefix(_LEGACY))
    except InvalidInput:
        path = None
    key = None if path is None else resume_key(path, legacy)
    if key is None or len(key.encode()) > MAX_KEY_BYTES:  # no version key is longer
        raise InvalidInput(f"{cursor!r} is not a dataset listing's cursor (its 'next')")
    return key


def _listed(info: DatasetInfo) -> bool:
    """Whether anything is left of `info` (all its versions may have been removed)."""
    return bool(info.versions or info.bad)


async def _batches(
    pairs: AsyncGenerator[tuple[str, str, bool], None],
) -> AsyncIterator[list[tuple[str, str, bool]]]:
    """`pairs` in lists of at most `_BATCH`."""
    async with aclosing(pairs):
        batch: list[tuple[str, str, bool]] = []
        async for pair in pairs:
            batch.append(pair)
            if len(batch) == _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch


async def list_datasets(site: Site, prefix: str = "/") -> list[DatasetInfo]:
    """`iter_datasets` as one list (for callers that want everything at once)."""
    return [info async for info in iter_datasets(site, prefix)]


def _group(
    read: list[tuple[str, str, bool, VersionDoc | Corrupt | None]], current: DatasetInfo | None
) -> list[DatasetInfo]:
    """Add `read` to `current` (the dataset the previous batch ended with) and to the
    datasets that follow it; return them in order, `current` first if it was added to."""
    out: list[DatasetInfo] = []
    for dataset, version, legacy, doc in read:
        if current is None or current.path != dataset:
            current = DatasetInfo(dataset, [])
        if not out or out[-1] is not current:
            out.append(current)
        current.legacy = legacy
        if isinstance(doc, Corrupt):
            current.bad.append(BadVersion(dataset, version, doc))
        elif doc is not None:
            current.add(doc)
    return out


async def _read(
    site: Site, listed: list[tuple[str, str, bool]]
) -> list[tuple[str, str, bool, VersionDoc | Corrupt | None]]:
    """Each listed version's document (None if removed since it was listed, the error if
    corrupt), from the catalog's cache or the store; newly read ones are cached."""
    if not listed:
        return []
    cached = await site.catalog.cached_versions(sorted({v for _, v, _ in listed}))
    docs: dict[tuple[str, str], VersionDoc | Corrupt] = {}
    missing: list[tuple[str, str]] = []
    for dataset, version, _ in listed:
        doc = cached.get(version)
        if doc is not None and doc.dataset == dataset:
            docs[dataset, version] = doc
        else:
            missing.append((dataset, version))
    fetched: list[VersionDoc] = []

    async def fetch(dataset: str, version: str) -> None:
        try:
            doc = await site.repo.read_version(dataset, version)
        except NotFound:
            return  # removed since it was listed
        except Corrupt as e:
            docs[dataset, version] = e
            return
        fetched.append(doc)
        docs[dataset, version] = doc

    # A few readers (not a task per version new to this site); the store or catalog
    # failing stops the others too.
    await drain((fetch(d, v) for d, v in missing), min(_FETCHERS, len(missing)))
    await site.catalog.record_versions(fetched)
    return [
        (dataset, version, legacy, docs.get((dataset, version)))
        for dataset, version, legacy in listed
    ]
