"""Review of listing, the daemon loop, metrics, logs, the demo and push's walk and readers:
each test shows one defect that was fixed (it failed before the fix). Catalog tests run on
SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from datamover.datasets import list_datasets
from datamover.repo.layout import version_key
from datamover.site import Site, make_store
from datamover.storage.base import ObjectInfo, Store
from datamover.transfer.push import push
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree

# -- `datamover ls` ----------------------------------------------------------------------


async def test_two_datasets_with_one_version_id_each_list_their_own_document(
    make_site: MakeSite,
) -> None:
    # The document cache was keyed by version id alone: a dataset holding a version id that
    # another dataset has too (a document copied or crafted in the shared bucket) was listed
    # with the other dataset's document: its manifest, totals and dataset path.
    a = await make_site("a")
    make_tree(a.data / "x", files=5)
    make_tree(a.data / "y", files=9)
    site = await a.open()
    try:
        x = await push(site, "/proj/x")
        doc = await site.repo.read_version("/proj/x", x.version)
        y = await push(site, "/proj/y")
        other = await site.repo.read_version("/proj/y", y.version)
        twin = dataclasses.replace(
            other, version=doc.version, parent=None, created=doc.created, site=doc.site
        )
        await site.repo.publish(twin)  # /proj/y now also holds x's version id
        for _ in range(2):  # first with x's document cached by push, then with both cached
            listed = {i.path: i.versions for i in await list_datasets(site)}
            assert [v.dataset for v in listed["/proj/x"]] == ["/proj/x"]
            assert listed["/proj/x"][0] == doc
            assert [v.dataset for v in listed["/proj/y"]] == ["/proj/y"] * 2
            assert twin in listed["/proj/y"]
    finally:
        await site.close()


class _RemovedAfterListing:
    """The real store, where the version documents `keys` are removed right after they are
    listed: what an operator's `aws s3 rm` (or a future GC) does while `ls` runs."""

    def __init__(self, inner: Store, keys: set[str]) -> None:
        self.inner = inner
        self.keys = keys

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix):
            yield info
            if info.key in self.keys:
                await self.inner.delete(info.key)


async def test_ls_survives_a_version_removed_while_it_lists(make_site: MakeSite) -> None:
    # A version listed and then removed before its document was read made the whole `ls`
    # fail with "dataset '/proj/x' has no version ...", for every dataset under the prefix.
    a = await make_site("a")
    make_tree(a.data / "x", files=3)
    make_tree(a.data / "y", files=3)
    site = await a.open()
    try:
        x = await push(site, "/proj/x")
        y = await push(site, "/proj/y")
    finally:
        await site.close()
    b = await make_site("b")  # a site that has cached no document yet
    store = _RemovedAfterListing(make_store(b.config), {version_key("/proj/x", x.version)})
    site = await Site.open(b.config, store=store)  # type: ignore[arg-type]
    try:
        listed = await list_datasets(site)
        assert [(i.path, [v.version for v in i.versions]) for i in listed] == [
            ("/proj/y", [y.version])
        ]
    finally:
        await site.close()
