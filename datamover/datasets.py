"""Listing datasets and their versions: the store is the truth, the catalog caches documents.

Version documents are immutable, so each is fetched from the store once and then served
from the catalog; listing a prefix costs one LIST plus GETs only for versions new to us.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from datamover.errors import NotFound
from datamover.repo.layout import VersionDoc
from datamover.site import Site

#: Version documents read at once.
_FETCHERS = 16


@dataclass
class DatasetInfo:
    """A dataset and its versions, oldest first."""

    path: str
    versions: list[VersionDoc]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": self.path, "versions": [asdict(v) for v in self.versions]}


async def list_datasets(site: Site, prefix: str = "/") -> list[DatasetInfo]:
    """Every dataset under logical `prefix` with all its versions.

    A document is known by its dataset and id together: the catalog's cache is keyed by id,
    and a bucket may hold one id under two datasets (a document copied or crafted there), so
    a cached document of another dataset is not this one's. A version removed between the
    listing and the read of its document is left out, as if listed a moment later.
    """
    pairs = [pair async for pair in site.repo.datasets(prefix)]
    cached = await site.catalog.cached_versions(sorted({v for _, v in pairs}))
    docs: dict[tuple[str, str], VersionDoc] = {}
    missing: list[tuple[str, str]] = []
    for dataset, version in pairs:
        doc = cached.get(version)
        if doc is not None and doc.dataset == dataset:
            docs[dataset, version] = doc
        else:
            missing.append((dataset, version))
    fetched: list[VersionDoc] = []
    todo = iter(missing)

    async def fetch() -> None:
        # A few readers pulling from one list: a task per version would hold a million
        # tasks for a bucket with a million versions new to this site.
        for dataset, version in todo:
            try:
                fetched.append(await site.repo.read_version(dataset, version))
            except NotFound:
                continue  # removed since it was listed

    tasks = [asyncio.ensure_future(fetch()) for _ in range(min(_FETCHERS, len(missing)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:  # a corrupt document: the other readers stop too
            task.cancel()
        raise
    await site.catalog.record_versions(fetched)
    docs.update({(doc.dataset, doc.version): doc for doc in fetched})
    grouped: dict[str, list[VersionDoc]] = {}
    for key in pairs:
        doc = docs.get(key)
        if doc is not None:
            grouped.setdefault(key[0], []).append(doc)
    return [
        DatasetInfo(path, sorted(versions, key=lambda d: d.version))
        for path, versions in sorted(grouped.items())
    ]
