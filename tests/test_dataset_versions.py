"""`GET /v1/datasets/{path}/versions` reads the dataset's own versions only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from datamover.datasets import iter_datasets
from datamover.site import Site, make_store
from datamover.transfer.push import push
from tests.fixtures_daemon import StartSite
from tests.fixtures_sites import MakeSite


class _Counting:
    """A store that records the prefixes listed and the keys read."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.listed: list[str] = []
        self.read: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.read.append(key)
        return await self.inner.get(key, offset, length)

    async def list(self, prefix: str, start_after: str = "") -> AsyncIterator[Any]:
        self.listed.append(prefix)
        async for info in self.inner.list(prefix, start_after):
            yield info


@pytest.mark.parametrize("new_catalog", ["sqlite"], indirect=True)  # no catalog question
async def test_one_datasets_versions_leave_its_nested_datasets_unread(
    make_site: MakeSite,
) -> None:
    # Before: every dataset below the path was listed and each of its version documents
    # read (and cached), to keep only the path's own: a top-level dataset with thousands
    # of nested ones cost thousands of reads per request.
    a = await make_site("site-a")
    (a.data / "p" / "sub").mkdir(parents=True)
    (a.data / "p" / "sub" / "f").write_text("1\n")
    site = await a.open()
    try:
        sub = [(await push(site, "/proj/p/sub")).version]
        (a.data / "p" / "sub" / "f").write_text("2\n")
        sub.append((await push(site, "/proj/p/sub")).version)
        own = (await push(site, "/proj/p")).version
    finally:
        await site.close()
    b = await make_site("site-b")  # a catalog of its own: no document cached
    counting = _Counting(make_store(b.config))
    fresh = await Site.open(b.config, store=counting)
    try:
        found = [i async for i in iter_datasets(fresh, "/proj/p", only=True)]
        assert [(i.path, [v.version for v in i.versions]) for i in found] == [("/proj/p", [own])]
        assert [key for key in counting.read if any(v in key for v in sub)] == []
        assert any(own in key for key in counting.read)
        everything = [i.path async for i in iter_datasets(fresh, "/proj/p")]
        assert sorted(everything) == ["/proj/p", "/proj/p/sub"]  # the listing still has both
    finally:
        await fresh.close()


async def test_the_versions_endpoint_answers_the_dataset_alone(
    make_site: MakeSite, served_site: StartSite
) -> None:
    a = await make_site("site-a")
    (a.data / "p" / "sub").mkdir(parents=True)
    (a.data / "p" / "sub" / "f").write_text("1\n")
    a.cli_json("push", "/proj/p/sub")
    own = a.cli_json("push", "/proj/p")["version"]
    d = await served_site("site-b")
    token = d.token("t1", "/proj", "read")
    status, body = d.request("GET", "/v1/datasets/proj/p/versions", token)
    assert status == 200, body
    assert [v["version"] for v in body["versions"]] == [own]
