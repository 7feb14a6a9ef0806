"""`datamover ls` and GET /v1/datasets: the listing is read in bounded batches and handed on
one dataset at a time, a corrupt version document is reported without hiding the rest, and
only the keys of the prefix's datasets are listed (not those of `/proj/run10` for `/proj/run1`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest

from datamover import datasets
from datamover.api.routes import _readable_prefix
from datamover.catalog.access import Identity
from datamover.domain.ids import new_version_id
from datamover.errors import InvalidInput
from datamover.repo.layout import VersionDoc, version_key
from datamover.site import Site, make_store
from datamover.storage.base import ObjectInfo, Store
from datamover.transfer.push import push
from tests.fixtures_daemon import StartSite
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.treegen import make_tree


class _CountingListing:
    """The real store, counting the keys its listings have handed out."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.listed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        async for info in self.inner.list(prefix, start_after):
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


# The CLI in a process of its own, on a store that fails after listing `limit` keys.
_FAILING_LS = """
import sys
from datamover import datasets, site
from datamover.errors import StoreUnavailable

LIMIT = int(sys.argv[2])

class Failing:
    def __init__(self, inner):
        self.inner = inner
    def __getattr__(self, name):
        return getattr(self.inner, name)
    async def list(self, prefix="", start_after=""):
        n = 0
        async for info in self.inner.list(prefix, start_after):
            n += 1
            if n > LIMIT:
                raise StoreUnavailable("the store went away")
            yield info

real = site.make_store
site.make_store = lambda config, on_retry=None: Failing(real(config, on_retry))
datasets._BATCH = 2
sys.argv = ["datamover", "ls", "/proj", "--json", "--config", sys.argv[1]]
from datamover.cli import main
main()
"""


@pytest.mark.parametrize(("limit", "listed"), [(1, None), (4, ["/proj/x"])])
async def test_ls_json_stays_one_object_when_the_store_fails_midway(
    make_site: MakeSite, limit: int, listed: list[str] | None
) -> None:
    a = await make_site("a")
    await _versions(a, ["/proj/x", "/proj/y", "/proj/z"], per_dataset=2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    r = subprocess.run(
        [sys.executable, "-c", _FAILING_LS, str(a.config_path), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 6 and r.stderr == "datamover: error: the store went away\n"
    out = json.loads(r.stdout)  # one object, whether or not datasets were already written
    assert out["error"] == {"code": "store_unavailable", "message": "the store went away"}
    if listed is not None:
        assert [d["path"] for d in out["datasets"]] == listed


async def _corrupt(a: SiteEnv, path: str) -> tuple[str, str]:
    """Publish a version of `path` whose document is not JSON; return its id and key."""
    site = await a.open()
    try:
        vid = new_version_id("a")
        key = version_key(path, vid)
        await site.store.put(key, b"{not json")
    finally:
        await site.close()
    return vid, key


async def test_ls_lists_the_rest_and_names_a_corrupt_version_document(
    make_site: MakeSite,
) -> None:
    # One corrupt version document anywhere under the prefix made `ls` fail as a whole:
    # no dataset was listed, in the CLI or through GET /v1/datasets.
    a = await make_site("a")
    ids = await _versions(a, ["/proj/x", "/proj/y"], per_dataset=2)
    bad_x, key_x = await _corrupt(a, "/proj/x")
    bad_w, key_w = await _corrupt(a, "/proj/w")  # a dataset with no readable version
    b = await make_site("b")
    for _ in range(2):  # the good documents read from the store, then from the cache
        r = b.cli("ls", "/proj", "--json")
        assert r.returncode == 5, r.stderr
        out = json.loads(r.stdout)
        assert out["prefix"] == "/proj"
        assert {d["path"]: [v["version"] for v in d["versions"]] for d in out["datasets"]} == ids
        assert sorted((e["path"], e["version"], e["code"]) for e in out["errors"]) == [
            ("/proj/w", bad_w, "corrupt"),
            ("/proj/x", bad_x, "corrupt"),
        ]
        warnings = r.stderr.splitlines()
        assert len(warnings) == 2 and all(w.startswith("datamover: warning: ") for w in warnings)
        assert any(key_w in w for w in warnings) and any(key_x in w for w in warnings)
    r = b.cli("ls", "/proj")
    assert r.returncode == 5 and "/proj/x\n" in r.stdout and "/proj/y\n" in r.stdout
    assert "/proj/w" not in r.stdout and len(r.stderr.splitlines()) == 2
    r = b.cli("ls", "/proj/y", "--json")  # nothing corrupt there: as before
    assert r.returncode == 0 and json.loads(r.stdout)["errors"] == []
    r = b.cli("ls", "/proj/w")  # its one version is corrupt: the warning says it all
    assert r.returncode == 5 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "no datasets" not in r.stderr
    # A prefix with no dataset (a typo) listed nothing, silently.
    r = b.cli("ls", "/proj/yy")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "no datasets under /proj/yy\n")
    r = b.cli("ls", "/proj/yy", "--json")
    assert r.stderr == "" and json.loads(r.stdout)["datasets"] == []


async def test_the_api_lists_the_rest_and_names_a_corrupt_version_document(
    make_site: MakeSite, served_site: StartSite
) -> None:
    a = await make_site("a")
    ids = await _versions(a, ["/proj/x"], per_dataset=2)
    bad_x, _ = await _corrupt(a, "/proj/x")
    bad_w, _ = await _corrupt(a, "/proj/w")
    d = await served_site("b")
    token = d.token("t1", "/proj", "read")
    status, listed = d.request("GET", "/v1/datasets?prefix=/proj", token)
    assert status == 200, listed
    assert [(x["path"], x["versions"]) for x in listed["datasets"]] == [("/proj/x", 2)]
    assert listed["datasets"][0]["latest"]["version"] == ids["/proj/x"][-1]
    assert sorted((e["path"], e["version"]) for e in listed["errors"]) == [
        ("/proj/w", bad_w),
        ("/proj/x", bad_x),
    ]
    status, versions = d.request("GET", "/v1/datasets/proj/x/versions", token)
    assert status == 200, versions
    assert [v["version"] for v in versions["versions"]] == ids["/proj/x"]
    assert [e["version"] for e in versions["errors"]] == [bad_x]
    status, err = d.request("GET", "/v1/datasets/proj/w/versions", token)
    assert status == 502 and err["error"]["code"] == "corrupt", err


# Encoded, these sort `/proj/a/b` < `/proj/a-b` < `/proj/a` < `/proj/b` (`%` < `-` < `/`):
# resuming after `/proj/a/b` must still find `/proj/a`, a sub-prefix SeaweedFS leaves out
# of a listing that starts after `%2Fproj%2Fa%2Fb`.
_PAGED = ["/proj/a/b", "/proj/a-b", "/proj/a", "/proj/b"]


async def test_a_listing_resumes_after_a_cursor_without_reading_what_came_before(
    make_site: MakeSite,
) -> None:
    a = await make_site("a")
    ids = await _versions(a, _PAGED, per_dataset=2)
    store = _CountingListing(make_store(a.config))
    site = await Site.open(a.config, store=store)  # type: ignore[arg-type]
    try:
        whole = [i async for i in datasets.iter_datasets(site, "/proj")]
        assert [i.path for i in whole] == _PAGED
        for n, info in enumerate(whole):
            assert info.cursor == info.path
            store.listed = 0
            rest = [i async for i in datasets.iter_datasets(site, "/proj", info.cursor)]
            assert [(i.path, [v.version for v in i.versions]) for i in rest] == [
                (p, ids[p]) for p in _PAGED[n + 1 :]
            ]
            assert store.listed == 2 * len(rest)  # only the versions after the cursor
        for bad in ["proj/a", "/proj/../a", "legacy:/proj/a", "/other/a"]:
            with pytest.raises(InvalidInput):
                [i async for i in datasets.iter_datasets(site, "/proj", bad)]
    finally:
        await site.close()


async def test_the_api_lists_datasets_a_page_at_a_time(
    make_site: MakeSite, served_site: StartSite
) -> None:
    a = await make_site("a")
    await _versions(a, [*_PAGED, "/proj/c"], per_dataset=1)
    d = await served_site("b")
    token = d.token("t1", "/proj", "read")
    pages: list[list[str]] = []
    after = ""
    while True:
        status, page = d.request("GET", f"/v1/datasets?prefix=/proj&limit=2{after}", token)
        assert status == 200, page
        pages.append([x["path"] for x in page["datasets"]])
        if page["next"] is None:
            break
        assert page["next"] == pages[-1][-1]
        after = "&after=" + quote(page["next"], safe="")
    assert pages == [["/proj/a/b", "/proj/a-b"], ["/proj/a", "/proj/b"], ["/proj/c"]]
    status, whole = d.request("GET", "/v1/datasets?prefix=/proj", token)
    assert status == 200 and whole["next"] is None
    assert [x["path"] for x in whole["datasets"]] == [p for page in pages for p in page]
    # A cursor that is no dataset of this listing, or a page size out of range: a 400
    # naming it, not a 500 or an empty page.
    for query, named in [
        ("after=proj%2Fa", "'proj/a' is not a dataset listing's cursor"),
        ("after=%2Fother%2Fa", "outside the datasets under '/proj'"),
        ("after=legacy:%2Fproj%2Fa", "not a dataset listing's cursor"),
        ("limit=0", "'limit' must be between 1 and 10000"),
    ]:
        status, err = d.request("GET", f"/v1/datasets?prefix=/proj&{query}", token)
        assert status == 400 and named in err["error"]["message"], (query, err)
    # A narrower token listing everything sees its own datasets, and lists only those.
    for prefix, want in [("/proj/a", ["/proj/a/b", "/proj/a"]), ("/other", [])]:
        status, page = d.request("GET", "/v1/datasets", d.token("t2", prefix, "read"))
        assert status == 200 and page["next"] is None, page
        assert [x["path"] for x in page["datasets"]] == want


def test_a_token_lists_only_where_it_may_read() -> None:
    def who(*prefixes: str, scope: str = "read") -> Identity:
        return Identity("tok", "t1", prefixes, frozenset({scope}))

    assert _readable_prefix(who("/proj/a"), "/") == "/proj/a"
    assert _readable_prefix(who("/proj/a"), "/proj") == "/proj/a"
    assert _readable_prefix(who("/proj/a"), "/proj/a/b") == "/proj/a/b"
    assert _readable_prefix(who("/proj/a"), "/proj/ab") is None
    assert _readable_prefix(who("/proj/a"), "/other") is None
    # Several prefixes: the deepest directory holding them all, not the whole bucket.
    assert _readable_prefix(who("/proj/a", "/proj/b"), "/") == "/proj"
    assert _readable_prefix(who("/proj/x/a", "/proj/x/b", "/proj/y"), "/") == "/proj"
    assert _readable_prefix(who("/proj/a", "/lab/b"), "/") == "/"
    assert _readable_prefix(who("/proj/a", "/proj/ab"), "/proj") == "/proj"
    assert _readable_prefix(who("/proj/a", "/proj/b"), "/proj/b") == "/proj/b"
    assert _readable_prefix(who("/"), "/proj") == "/proj"
    assert _readable_prefix(who("/proj/a", scope="admin"), "/") == "/"


async def _publish(site: Site, base: VersionDoc, path: str, n: int) -> list[str]:
    """Publish `n` versions of `path`, copies of document `base`; return their ids."""
    ids: list[str] = []
    for _ in range(n):
        ids.append(new_version_id("a", after=ids[-1] if ids else None))
        parent = ids[-2] if len(ids) > 1 else None
        await site.repo.publish(
            dataclasses.replace(base, dataset=path, version=ids[-1], parent=parent)
        )
    return ids


# Siblings whose encoded paths start with `%2Fproj%2Frun1`: they sort before (`%20`),
# between (`-`, `.`) and after (`0`) the keys of `/proj/run1` and those below it.
_SIBLINGS = [
    "/proj/run1 x",
    "/proj/run1-old",
    "/proj/run1.x",
    *(f"/proj/run{i}" for i in range(10, 20)),
]


async def _run1(a: SiteEnv, below: list[str], per_sibling: int) -> dict[str, list[str]]:
    """`/proj/run1` with one version, each of `below` with two, and every sibling with
    `per_sibling`; return the ids by path."""
    make_tree(a.data / "seed", files=1)
    site = await a.open()
    try:
        base = await site.repo.read_version("/proj/seed", (await push(site, "/proj/seed")).version)
        ids = {"/proj/run1": await _publish(site, base, "/proj/run1", 1)}
        for path in below:
            ids[path] = await _publish(site, base, path, 2)
        for path in _SIBLINGS:
            await _publish(site, base, path, per_sibling)
    finally:
        await site.close()
    return ids


async def test_listing_a_dataset_does_not_list_the_keys_of_its_siblings(
    make_site: MakeSite,
) -> None:
    # Before: the listing of `/proj/run1` read `datasets/%2Fproj%2Frun1`, so every version
    # key of `/proj/run10` ... `/proj/run19`, `/proj/run1-old` too (here 261 keys to return
    # one dataset), and dropped them afterwards.
    a = await make_site("a")
    ids = await _run1(a, [], per_sibling=20)
    store = _CountingListing(make_store(a.config))
    site = await Site.open(a.config, store=store)  # type: ignore[arg-type]
    try:
        listed = [i async for i in datasets.iter_datasets(site, "/proj/run1")]
        assert [(i.path, [v.version for v in i.versions]) for i in listed] == list(ids.items())
        assert store.listed == 1
        store.listed = 0
        assert [i.path async for i in datasets.iter_datasets(site, "/proj/run10")] == [
            "/proj/run10"
        ]
        assert store.listed == 20
    finally:
        await site.close()


async def test_a_dataset_and_those_below_it_are_listed_a_page_at_a_time(
    make_site: MakeSite, served_site: StartSite
) -> None:
    # Before: the listing read 46 keys for these 7 versions, and a listing resumed after
    # a cursor the siblings' keys after it again; a sibling's cursor was taken (an empty
    # page), not refused.
    a = await make_site("a")
    below = ["/proj/run1/sub", "/proj/run1/sub/deep", "/proj/run1/sub-x"]
    ids = await _run1(a, below, per_sibling=3)
    # Encoded: `%2Fsub%2Fdeep` < `%2Fsub-x` < `%2Fsub/versions` < `/versions` (run1 itself).
    order = ["/proj/run1/sub/deep", "/proj/run1/sub-x", "/proj/run1/sub", "/proj/run1"]
    store = _CountingListing(make_store(a.config))
    site = await Site.open(a.config, store=store)  # type: ignore[arg-type]
    try:
        whole = [i async for i in datasets.iter_datasets(site, "/proj/run1")]
        assert [(i.path, [v.version for v in i.versions]) for i in whole] == [
            (p, ids[p]) for p in order
        ]
        assert store.listed == 7
        for n, info in enumerate(whole):
            store.listed = 0
            rest = [i.path async for i in datasets.iter_datasets(site, "/proj/run1", info.cursor)]
            assert rest == order[n + 1 :]
            assert store.listed == sum(len(ids[p]) for p in rest)
        for sibling in ["/proj/run10", "/proj/run1-old", "/proj/run1 x"]:
            with pytest.raises(InvalidInput, match="outside the datasets under '/proj/run1'"):
                [i async for i in datasets.iter_datasets(site, "/proj/run1", sibling)]
    finally:
        await site.close()
    d = await served_site("b")  # the API's pages, on a site with nothing cached
    for limit in (1, 2, 3):
        pages: list[list[str]] = []
        after = ""
        while True:
            query = f"prefix=/proj/run1&limit={limit}{after}"
            status, page = d.request("GET", f"/v1/datasets?{query}", d.token("t1", "/proj", "read"))
            assert status == 200, page
            pages.append([x["path"] for x in page["datasets"]])
            if page["next"] is None:
                break
            after = "&after=" + quote(page["next"], safe="")
        assert [p for page in pages for p in page] == order
        assert all(len(page) == limit for page in pages[:-1]), pages
    status, err = d.request(
        "GET", "/v1/datasets?prefix=/proj/run1&after=%2Fproj%2Frun10", d.token("t2", "/", "read")
    )
    assert status == 400 and "outside the datasets under '/proj/run1'" in err["error"]["message"]
    status, page = d.request("GET", "/v1/datasets", d.token("t3", "/proj/run1", "read"))
    assert status == 200 and [x["path"] for x in page["datasets"]] == order, page
