"""Listing datasets and their versions: the store is the truth, the catalog caches documents.

Version documents are immutable, so each is fetched from the store once and then served
from the catalog; listing a prefix costs one LIST plus GETs only for versions new to us.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

from datamover.repo.layout import VersionDoc
from datamover.site import Site


@dataclass
class DatasetInfo:
    """A dataset and its versions, oldest first."""

    path: str
    versions: list[VersionDoc]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": self.path, "versions": [asdict(v) for v in self.versions]}


async def list_datasets(site: Site, prefix: str = "/") -> list[DatasetInfo]:
    """Every dataset under logical `prefix` with all its versions."""
    pairs = [pair async for pair in site.repo.datasets(prefix)]
    cached = await site.catalog.cached_versions([v for _, v in pairs])
    missing = [(d, v) for d, v in pairs if v not in cached]
    limit = asyncio.Semaphore(16)

    async def fetch(dataset: str, version: str) -> VersionDoc:
        async with limit:
            return await site.repo.read_version(dataset, version)

    fetched = await asyncio.gather(*(fetch(d, v) for d, v in missing))
    await site.catalog.record_versions(fetched)
    docs = {**cached, **{doc.version: doc for doc in fetched}}
    grouped: dict[str, list[VersionDoc]] = {}
    for dataset, version in pairs:
        grouped.setdefault(dataset, []).append(docs[version])
    return [
        DatasetInfo(path, sorted(versions, key=lambda d: d.version))
        for path, versions in sorted(grouped.items())
    ]
