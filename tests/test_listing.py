"""`datamover ls` and GET /v1/datasets: the listing is read in bounded batches and handed on
one dataset at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from datamover import datasets
from datamover.domain.ids import new_version_id
from datamover.site import Site, make_store
from datamover.storage.base import ObjectInfo, Store
from datamover.transfer.push import push
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.treegen import make_tree


class _CountingListing:
    """The real store, counting the keys its listings have handed out."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.listed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            self.listed += 1
            yield info


async def _versions(a: SiteEnv, paths: list[str], per_dataset: int) -> dict[str, list[str]]:
    """Publish `per_dataset` versions of each of `paths` (one pushed, the others copies of
    its document under newer ids); return their ids by path."""
    site = await a.open()
    ids: dict[str, list[str]] = {}
    try:
        for path in paths:
            make_tree(a.data / path.removeprefix("/proj/"), files=2)
            doc = await site.repo.read_version(path, (await push(site, path)).version)
            ids[path] = [doc.version]
            for _ in range(per_dataset - 1):
                doc = dataclasses.replace(
                    doc, parent=doc.version, version=new_version_id("a", after=doc.version)
                )
                await site.repo.publish(doc)
                ids[path].append(doc.version)
    finally:
        await site.close()
    return ids


async def test_ls_hands_on_each_dataset_before_the_whole_tree_is_listed(
    make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every version document under the prefix was read into one list, and the datasets
    # returned only after the last of them: memory grew with the whole tree.
    a = await make_site("a")
    ids = await _versions(a, ["/proj/x", "/proj/y", "/proj/z"], per_dataset=3)
    monkeypatch.setattr(datasets, "_BATCH", 2)
    b = await make_site("b")  # nothing cached: every document is read from the store
    store = _CountingListing(make_store(b.config))
    site = await Site.open(b.config, store=store)  # type: ignore[arg-type]
    try:
        seen: list[tuple[str, list[str], int]] = []
        async for info in datasets.iter_datasets(site, "/proj"):
            seen.append((info.path, [v.version for v in info.versions], store.listed))
        assert [(p, v) for p, v, _ in seen] == [(p, ids[p]) for p in sorted(ids)]
        assert seen[0][2] <= 4  # /proj/x's three versions and one more, of nine
        assert seen[1][2] <= 8
        listed = {
            i.path: [v.version for v in i.versions] for i in await datasets.list_datasets(site)
        }
        assert listed == ids  # and now from the catalog's cache
    finally:
        await site.close()
