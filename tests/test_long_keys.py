"""Dataset paths whose percent-encoding passes 255 bytes: cut into key parts every store
takes (docs/format.md, "Keys"), uncut keys written before still read, too long refused."""

from __future__ import annotations

import random
import string
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datamover import datasets
from datamover.datasets import _group, list_datasets
from datamover.domain.ids import new_version_id
from datamover.domain.paths import check_logical_path, is_under
from datamover.embedded import EmbeddedSeaweed
from datamover.errors import InvalidInput, NotFound
from datamover.repo.layout import (
    DATASETS,
    VersionDoc,
    check_key_length,
    dataset_prefix,
    dataset_prefixes,
    encode_dataset,
    legacy_versions_prefix,
    parse_version_key,
    tree_prefixes,
    version_key,
)
from datamover.repo.repository import Repository
from datamover.site import Site
from datamover.storage.base import check_key
from datamover.storage.memory import MemoryStore
from datamover.storage.posix import PosixStore
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from tests.fixtures_daemon import StartSite
from tests.fixtures_sites import MakeSite, SiteEnv
from tests.test_bad_input import fails, store_keys
from tests.test_listing import _CountingListing
from tests.treegen import snapshot

ID = "20261129T181500.123456Z-hpc-a-3f9a1c0b"
LONGEST_ID = "20261129T181500.123456Z-" + "s" * 63 + "-3f9a1c0b"  # 96 characters
CJK = (  # 62 characters
    "蛋白质结构预测二〇二六年第一批对接实验受体与小分子配体的结果张三项目数据集合分析"
    "分子动力学模拟轨迹与自由能计算的原始输出文件"
)


def _old_key(path: str, version: str) -> str:
    """The key every datamover wrote before long encodings were cut."""
    return f"datasets/{quote(path, safe='')}/versions/{version}"


def _reference(path: str) -> str:
    """docs/format.md's rule for `<enc>`, character by character."""
    whole = quote(path, safe="")
    if len(whole) <= 255:
        return whole
    parts, part = [], ""
    for char in path:
        escaped = quote(char, safe="")
        if len(part) + len(escaped) > 255:
            parts.append(part)
            part = ""
        part += "%2E" if not part and escaped == "." else escaped
    return "/".join([*parts, part])


def _parts_fit(key: str) -> bool:
    return all(0 < len(p.encode()) <= 255 and p not in (".", "..") for p in key.split("/"))


# -- the encoding ---------------------------------------------------------------------------

# Characters of one to four UTF-8 bytes, `.` often (a part never starts with a literal one)
# and `%` (itself escaped).
_NAME = st.text(alphabet=st.sampled_from("ab.-_~ %é张\U0001f600."), min_size=1, max_size=40)
_PATH = st.lists(_NAME.filter(lambda n: n not in (".", "..")), min_size=1, max_size=10).map(
    lambda names: "/" + "/".join(names)
)


@settings(max_examples=400, deadline=None)
@given(_PATH, st.sampled_from([ID, LONGEST_ID]))
def test_version_keys_parse_back_and_every_part_fits_a_file_name(path: str, version: str) -> None:
    key = version_key(path, version)
    assert encode_dataset(path) == _reference(path)
    assert parse_version_key(key) == (path, version)
    assert _parts_fit(key)
    assert unquote(encode_dataset(path).replace("/", "")) == path
    if len(quote(path, safe="")) <= 255:
        assert key == _old_key(path, version)  # today's keys, byte for byte
    else:
        assert parse_version_key(_old_key(path, version)) == (path, version)  # uncut: read
    site = version[24:-9]
    if len(key.encode()) <= 1024:  # exactly the paths the site may push
        check_key(key)
        assert check_key_length(path, site) == path
    else:
        with pytest.raises(InvalidInput, match="too long for the store"):
            check_key_length(path, site)


@settings(max_examples=400, deadline=None)
@given(_PATH, _PATH, st.data())
def test_the_keys_of_a_path_prefix_are_a_prefix_of_the_longer_paths_keys(
    path: str, below: str, data: st.DataObject
) -> None:
    longer = path + below  # a dataset below `path`
    assert encode_dataset(longer).startswith(encode_dataset(path))
    assert version_key(longer, ID).startswith(dataset_prefix(path))
    # A string prefix too: `ls /proj/ab` lists `/proj/abc` (and keeps component matches).
    cut = data.draw(st.integers(1, len(longer)))
    assert version_key(longer, ID).startswith(dataset_prefix(longer[:cut]))


@pytest.mark.parametrize(
    "path",
    [
        "/proj/docking",
        "/" + "张" * 28,  # 3 + 28 * 9 = 255 bytes: the longest uncut encoding
        "/" + "x" * 252,
        "/proj/" + "/".join(["x" * 80, "x" * 80, "x" * 79]),  # 255 bytes: `/` is `%2F`
    ],
)
def test_keys_of_encodings_up_to_255_bytes_are_unchanged(path: str) -> None:
    assert len(quote(path, safe="")) <= 255
    assert version_key(path, ID) == _old_key(path, ID)
    assert legacy_versions_prefix(path) is None


def test_a_longer_encoding_is_cut_between_characters() -> None:
    path = "/" + "张" * 29  # 264 bytes
    assert encode_dataset(path) == quote("/" + "张" * 28, safe="") + "/" + quote("张")
    # The example of docs/format.md.
    path = "/public/home/张三/蛋白质结构预测/二〇二六年第一批对接实验/受体蛋白质与小分子配体的"
    path += "分子对接结果"
    first, second = encode_dataset(path).split("/")
    assert (len(first), len(second)) == (253, 126)
    assert unquote(first).endswith("/受体蛋白")
    assert unquote(second) == "质与小分子配体的分子对接结果"


@pytest.mark.parametrize("tail", [".", "..", ".hidden", "..x"])
def test_a_part_never_starts_with_a_dot(tail: str) -> None:
    path = "/" + "a" * 200 + "/" + "b" * 49 + tail  # all but the tail fill the first part
    first, second = encode_dataset(path).split("/")
    assert first == quote(path[: -len(tail)], safe="") and second == "%2E" + tail[1:]
    key = version_key(path, ID)
    assert _parts_fit(key) and parse_version_key(key) == (path, ID)
    # The same key with a literal `.` (or a `%2E` inside a part) is not a version.
    assert parse_version_key(key.replace("/%2E", "/.")) is None
    uncut = "/" + "a" * 100 + tail  # encoded uncut: no `%2E` in it
    escaped = quote(uncut, safe="").replace(".", "%2E")
    assert parse_version_key(f"datasets/{escaped}/versions/{ID}") is None


def test_a_cut_part_may_be_versions() -> None:
    path = "/" + "a" * 200 + "/" + "b" * 49 + "versions"
    key = version_key(path, ID)
    assert "/versions/versions/" in key and parse_version_key(key) == (path, ID)


def test_only_the_cut_and_the_uncut_spelling_name_a_version() -> None:
    path = "/proj/" + "/".join(["张三" * 10] * 3)
    key = version_key(path, ID)
    first, rest = key[len("datasets/") :].split("/", 1)
    strays = [
        f"datasets/{first[:-9]}/{first[-9:]}{rest}",  # cut one character earlier
        f"datasets/{first[:-3]}/{first[-3:]}{rest}",  # cut inside a character
        f"datasets/{first}{rest[:9]}/{rest[9:]}",  # a part longer than 255 bytes
        f"datasets/{first}/{rest[:9]}/{rest[9:]}",  # cut once too often
        key.replace("%E5", "%e5"),
    ]
    for stray in strays:
        assert stray != key and parse_version_key(stray) is None, stray
    assert parse_version_key(_old_key(path, ID)) == (path, ID)


def _path_of_encoded_size(size: int) -> str:
    """A logical path whose cut encoding takes exactly `size` bytes."""
    path = "/proj"
    while len(encode_dataset(path + "/" + "x" * 200)) <= size:
        path += "/" + "x" * 200
    path += "/x"
    while len(encode_dataset(path)) < size:
        path += "x"
    assert len(encode_dataset(path)) == size
    return check_logical_path(path)


@pytest.mark.parametrize(("site", "most"), [("hpc-a", 967), ("s" * 63, 909)])
def test_a_path_is_pushable_while_its_version_keys_fit_1024_bytes(site: str, most: int) -> None:
    fits, over = _path_of_encoded_size(most), _path_of_encoded_size(most + 1)
    assert check_key_length(fits, site) == fits
    version = f"20261129T181500.123456Z-{site}-3f9a1c0b"
    assert len(check_key(version_key(fits, version)).encode()) == 1024
    with pytest.raises(InvalidInput, match="too long for the store") as caught:
        check_key_length(over, site)
    assert over in str(caught.value) and "1024-byte key limit" in str(caught.value)
    assert "\n" not in str(caught.value)


# -- the keys a listing of a dataset and those below it reads -----------------------------------


def _read_in_turn(keys: list[str], key_prefixes: list[str]) -> list[str]:
    """What listing each of `key_prefixes` in turn hands out of `keys` (in byte order)."""
    return [k for p in key_prefixes for k in sorted(keys) if k.startswith(p)]


def _check_tree_prefixes(path: str, others: list[str]) -> None:
    """Listing `tree_prefixes(path)` reads the keys (cut and uncut) of `path` and the
    datasets below it in the order the listing of `dataset_prefixes(path)` hands them out
    (which reads the keys of `others` beside them too), and no other but those of a path
    that goes on with `versions` where `path`'s encoding is cut."""
    keys = list({k for d in [path, *others] for k in (version_key(d, ID), _old_key(d, ID))})
    read = _read_in_turn(keys, tree_prefixes(path))
    wanted = [k for k in _read_in_turn(keys, dataset_prefixes(path)) if _under(k, path)]
    assert [k for k in read if _under(k, path)] == wanted
    assert sorted(wanted) == sorted(k for k in keys if _under(k, path))
    cut = DATASETS + encode_dataset(path) + "/versions"
    assert all(
        k.startswith(cut) and _dataset(k).startswith(path + "versions")
        for k in read
        if not _under(k, path)
    )


def _dataset(key: str) -> str:
    parsed = parse_version_key(key)
    assert parsed is not None, key
    return parsed[0]


def _under(key: str, path: str) -> bool:
    return is_under(_dataset(key), path)


def _valid(path: str) -> bool:
    try:
        return check_logical_path(path) == path
    except InvalidInput:
        return False


@settings(max_examples=300, deadline=None)
@given(_PATH, st.lists(st.tuples(st.booleans(), _NAME, st.lists(_NAME, max_size=3))))
def test_a_dataset_s_listing_reads_its_keys_and_those_below_it_only(
    path: str, others: list[tuple[bool, str, list[str]]]
) -> None:
    # Before: `ls /proj/run1` listed `datasets/%2Fproj%2Frun1`, every version key of
    # `/proj/run10` ... `/proj/run1-old` too, to drop them afterwards.
    paths = [
        path + ("/" if below else "") + "/".join([name, *rest]) for below, name, rest in others
    ]
    _check_tree_prefixes(path, [p for p in paths if _valid(p)])


@pytest.mark.parametrize("size", range(247, 264))
@pytest.mark.parametrize("last", ["a", "张", "."])
def test_a_listing_below_a_path_whose_encoding_is_cut_near_its_end(size: int, last: str) -> None:
    """Paths whose encoding ends a few bytes either side of 255: the `%2F` after them, or a
    name after that, starts the next key part, or the path itself is cut."""
    path = "/proj/"
    while len(quote(path + "x" + last, safe="")) <= size:
        path += "x"
    path += last
    assert size - 8 < len(quote(path, safe="")) <= size
    names = ["x", ".x", "versions", "张" * 30, "-old", " x", "%", "x" * 250]
    below = [path + "/" + n for n in names] + [path + "/" + n + "/" + n for n in names]
    beside = [path + n for n in names] + [path + n + "/x" for n in names]
    _check_tree_prefixes(path, [p for p in below + beside if _valid(p)])


# -- keys written before the cut ------------------------------------------------------------

LONG = "/proj/张三/" + CJK[:26] + "/" + CJK[26:40]  # "/proj/张三/" + CJK[:26]: 265 bytes
PARENT = "20261129T181500.123456Z-site-a-00000001"
CHILD = "20261129T181501.123456Z-site-a-00000002"


def _doc(dataset: str, version: str, parent: str | None = None) -> VersionDoc:
    created = "2026-11-29T18:15:00.123456Z"
    counts = {"segments": 0, "files": 0, "dirs": 0, "symlinks": 0, "bytes": 0}
    return VersionDoc(dataset, version, parent, "site-a", created, "ab" * 32, 1, **counts)


async def test_uncut_keys_are_read_listed_and_kept_for_their_dataset(tmp_path: Path) -> None:
    repo = Repository(MemoryStore(), tmp_path / "cache")
    old = _doc(LONG, PARENT)
    await repo.store.put(_old_key(LONG, PARENT), old.to_bytes())
    assert await repo.version_ids(LONG) == [PARENT]
    assert await repo.read_version(LONG, PARENT) == old
    long_prefix = LONG.rsplit("/", 1)[0]
    for prefix in ("/proj", long_prefix, LONG):
        assert [p async for p in repo.datasets(prefix)] == [(LONG, PARENT)], prefix
    # The next version goes where its parent is: the dataset's versions stay together.
    await repo.publish(_doc(LONG, CHILD, parent=PARENT))
    # A new dataset gets cut keys, and so do its later versions.
    other = LONG + "x"
    await repo.publish(_doc(other, PARENT))
    await repo.publish(_doc(other, CHILD, parent=PARENT))
    keys = [i.key async for i in repo.store.list()]
    assert sorted(keys) == sorted(
        [
            _old_key(LONG, PARENT),
            _old_key(LONG, CHILD),
            version_key(other, PARENT),
            version_key(other, CHILD),
        ]
    )
    assert await repo.version_ids(LONG) == [PARENT, CHILD]
    assert [p async for p in repo.datasets(long_prefix)] == [
        (other, PARENT),
        (other, CHILD),
        (LONG, PARENT),
        (LONG, CHILD),
    ]
    # A listing resumes after either spelling of a dataset: a cursor says which one.
    listed = [v async for v in repo.listed_versions(long_prefix)]
    assert [legacy for _, _, legacy in listed] == [False, False, True, True]
    for cursor, rest in [
        (other, listed[2:]),
        ("legacy:" + LONG, []),
        (LONG, listed),  # its cut keys would sort before `other`'s
    ]:
        start = datasets._resume_key(cursor)
        assert [v async for v in repo.listed_versions(long_prefix, start)] == rest, cursor
    with pytest.raises(InvalidInput, match="outside the datasets under"):
        [v async for v in repo.listed_versions(long_prefix, datasets._resume_key("/proj/a"))]


async def test_a_long_path_s_listing_reads_its_keys_and_those_below_it_in_both_spellings(
    tmp_path: Path,
) -> None:
    # Before: listing `top` read the keys of `top` + `x`, `top` + `-old` (and of any
    # path that starts with it) under both spellings too, and dropped them afterwards.
    store = _CountingListing(MemoryStore())
    repo = Repository(store, tmp_path / "cache")  # type: ignore[arg-type]
    top = LONG.rsplit("/", 1)[0]  # 265 bytes encoded: cut
    sub = top + "/sub"
    put = [
        (_old_key, top, PARENT),  # `top` under both spellings
        (version_key, top, CHILD),
        (_old_key, sub, PARENT),
        (_old_key, sub, CHILD),
        (version_key, LONG, PARENT),
    ]
    for n, sibling in enumerate([top + "x", top + "-old", top + "x/sub", top + "0"]):
        for key in (version_key, _old_key):
            for m in range(5):
                put.append((key, sibling, f"2026010{n}T00000{m}.000000Z-site-a-0000000{m}"))
    for key, path, version in put:
        await repo.store.put(key(path, version), _doc(path, version).to_bytes())
    want = [(LONG, PARENT, False), (top, CHILD, False), (sub, PARENT, True), (sub, CHILD, True)]
    want.append((top, PARENT, True))
    assert [v async for v in repo.listed_versions(top)] == want
    assert store.listed == len(want)
    for n, (path, _, legacy) in enumerate(want):
        store.listed = 0
        start = datasets._resume_key(("legacy:" if legacy else "") + path)
        rest = [v async for v in repo.listed_versions(top, start)]
        assert rest == [w for w in want[n + 1 :] if w[:1] != (path,) or w[2] != legacy]
        assert store.listed == len(rest)
    for sibling in [top + "x", "legacy:" + top + "x", "legacy:" + top + "x/sub"]:
        with pytest.raises(InvalidInput, match="outside the datasets under"):
            [v async for v in repo.listed_versions(top, datasets._resume_key(sibling))]
    # The path itself alone, and a path below `top`: as before.
    assert [v async for v in repo.listed_versions(top, only=True)] == [want[1], want[4]]
    assert [v async for v in repo.listed_versions(sub)] == want[2:4]


# -- push, stage and ls of long paths ------------------------------------------------------

# 60 CJK characters over four components (567 bytes encoded), and 369 ASCII characters.
LONG_CJK = "/proj/张三/" + "/".join([CJK[:16], CJK[16:36], CJK[36:58]]) + "/run.1"
LONG_ASCII = "/proj/" + "/".join(["docking_run_" + "x" * 78] * 4)


def _tree(root: Path, seed: str) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.pdbqt").write_text(f"ATOM {seed}\n" * 500)
    (root / "b.txt").write_text(seed)
    (root / "link").symlink_to("b.txt")


async def _ls(site: Site, env: SiteEnv | None, prefix: str) -> list[str]:
    """The paths `datamover ls PREFIX` lists (the real CLI when `env` is given)."""
    if env is None:
        return [info.path for info in await list_datasets(site, prefix)]
    listed = env.cli_json("ls", prefix)
    return [d["path"] for d in listed["datasets"]]


@pytest.mark.parametrize("kind", ["seaweedfs", "posix"])
async def test_long_paths_push_stage_and_list(
    make_site: MakeSite, tmp_path: Path, kind: str
) -> None:
    # Before: every key held the whole encoding as one part. SeaweedFS takes a long part
    # below a key's last (its limit is on the file name), so there the test failed on the
    # parts; the POSIX store (as MinIO) refused the version document after the push had
    # uploaded everything else: "a part is longer than a file name may be".
    a, b = await make_site("site-a"), await make_site("site-b")
    shared = tmp_path / "posix-store"
    shared.mkdir()

    async def open_site(env: SiteEnv) -> Site:
        return await Site.open(env.config, PosixStore(shared) if kind == "posix" else None)

    site_a, site_b = await open_site(a), await open_site(b)
    try:
        for n, path in enumerate([LONG_CJK, LONG_ASCII]):
            assert len(quote(path, safe="")) > 255
            _tree(a.data / path.removeprefix("/proj/"), f"seed {n}")
            pushed = await push(site_a, path)
            staged = await stage(site_b, path)
            assert staged.version == pushed.version and staged.fetched_files == 2
            local = path.removeprefix("/proj/")
            assert snapshot(b.data / local) == snapshot(a.data / local)
        keys = [i.key async for i in site_a.store.list()]
        assert keys and all(_parts_fit(k) for k in keys), [k for k in keys if not _parts_fit(k)]
        cli = b if kind == "seaweedfs" else None
        assert await _ls(site_b, cli, "/proj") == sorted(
            [LONG_CJK, LONG_ASCII], key=lambda p: version_key(p, ID)
        )
        for path in (LONG_CJK, LONG_ASCII):
            parent = path.rsplit("/", 1)[0]  # a prefix whose encoding is cut too
            assert len(encode_dataset(parent).split("/")) > 1
            assert await _ls(site_b, cli, parent) == [path]
            assert await _ls(site_b, cli, path) == [path]
        assert await _ls(site_b, cli, "/proj/张三") == [LONG_CJK]
    finally:
        await site_a.close()
        await site_b.close()


async def test_a_dataset_under_an_uncut_key_is_staged_listed_and_pushed_on(
    make_site: MakeSite,
) -> None:
    """A long path pushed by an older datamover to SeaweedFS (which took the long part):
    still found, staged and listed once, and its next version goes under the same key."""
    a, b = await make_site("site-a"), await make_site("site-b")
    _tree(a.data / LONG_CJK.removeprefix("/proj/"), "one")
    site_a, site_b = await a.open(), await b.open()
    try:
        first = await push(site_a, LONG_CJK)
        cut, uncut = version_key(LONG_CJK, first.version), _old_key(LONG_CJK, first.version)
        await site_a.store.put(uncut, await site_a.store.get(cut))  # as it was written then
        await site_a.store.delete(cut)
        assert (await stage(site_b, LONG_CJK)).version == first.version
        (a.data / LONG_CJK.removeprefix("/proj/") / "b.txt").write_text("two")
        second = await push(site_a, LONG_CJK)
        assert second.parent == first.version
        keys = [i.key async for i in site_a.store.list("datasets/")]
        assert keys == [uncut, _old_key(LONG_CJK, second.version)]
        assert (await stage(site_b, LONG_CJK)).version == second.version
        for prefix in ("/proj/张三", LONG_CJK.rsplit("/", 1)[0]):  # one listing, and two
            listed = b.cli_json("ls", prefix)["datasets"]
            assert [(d["path"], len(d["versions"])) for d in listed] == [(LONG_CJK, 2)]
    finally:
        await site_a.close()
        await site_b.close()


# -- too long ---------------------------------------------------------------------------------


def _too_long(env: SiteEnv) -> str:
    """A path of 108 CJK characters (988 bytes encoded, uncut), and its local tree."""
    path = "/proj/" + "/".join([CJK[:36], CJK[5:41], CJK[2:38]])
    assert len(quote(path, safe="")) == 988
    _tree(env.data / path.removeprefix("/proj/"), "x")
    return path


async def test_a_path_too_long_for_a_key_is_refused_before_anything_is_written(
    make_site: MakeSite,
) -> None:
    # Before: the push read and uploaded the tree (config, packs, manifests) and then the
    # version document failed: "bad store key 'datasets/%2Fproj%2F%E8...'...: 1046 bytes in
    # UTF-8, more than 1024", naming neither the path nor what to do.
    a = await make_site("site-a")
    path = _too_long(a)
    error = fails(a, "push", path, "--local", code=2, says="is too long for the store")
    assert path in error["message"] and "1024-byte key limit" in error["message"]
    assert await store_keys(a) == []  # not even `config`


async def test_the_daemon_refuses_a_push_of_a_path_too_long_for_a_key(
    served_site: StartSite,
) -> None:
    d = await served_site("site-a")
    token = d.token("t1", "/proj", "write")
    path = _too_long(d.env)
    status, answer = d.request("POST", "/v1/transfers", token, {"kind": "push", "path": path})
    assert status == 400 and answer["error"]["code"] == "invalid_input", answer
    assert "too long for the store" in answer["error"]["message"]
    assert d.request("GET", "/v1/transfers", token)[1]["transfers"] == []  # nothing queued
    # A stage is not refused: it looks, and finds nothing.
    status, answer = d.request("POST", "/v1/transfers", token, {"kind": "stage", "path": path})
    assert status == 201, answer


async def test_the_daemon_refuses_any_request_for_a_path_longer_than_1024_bytes(
    served_site: StartSite,
) -> None:
    # A stage or pin of a 3,000-byte path used to reach the catalog, where PostgreSQL's
    # index refused the row ("index row size exceeds btree version 4 maximum 2704"): a 500
    # and a traceback. No such path can be pushed, so none can be staged either.
    d = await served_site("site-a")
    token = d.token("t1", "/proj", "write")
    letters = random.Random(1).choices(string.ascii_letters, k=3000)  # poorly compressible
    path = "/proj/" + "/".join("".join(letters[i : i + 250]) for i in range(0, 3000, 250))
    for route, body in [
        ("/v1/transfers", {"kind": "stage", "path": path}),
        ("/v1/pins", {"pin": "job-1", "path": path}),
    ]:
        status, answer = d.request("POST", route, token, body)
        assert status == 400 and answer["error"]["code"] == "invalid_input", answer
        assert "bytes long, more than 1024" in answer["error"]["message"]
    assert d.request("GET", "/v1/transfers", token)[1]["transfers"] == []
    assert "Traceback" not in d.log()


async def test_an_uncut_key_at_the_limit_is_read_though_its_cut_key_could_not_be(
    tmp_path: Path,
) -> None:
    """A path pushed before keys were cut whose uncut version key is exactly 1,024 bytes:
    its cut key would be longer, so it is not asked for (a store refuses such a key)."""
    path = "/proj"
    while len(_old_key(path + "/" + "x" * 200, PARENT)) <= 1024:
        path += "/" + "x" * 200
    path += "/x"
    while len(_old_key(path, PARENT)) < 1024:
        path += "x"
    assert len(_old_key(path, PARENT)) == 1024 < len(version_key(path, PARENT))
    repo = Repository(MemoryStore(), tmp_path / "cache")
    doc = _doc(path, PARENT)
    await repo.store.put(_old_key(path, PARENT), doc.to_bytes())
    assert await repo.read_version(path, PARENT) == doc
    assert await repo.latest(path) == PARENT
    assert [p async for p in repo.datasets("/proj")] == [(path, PARENT)]
    with pytest.raises(NotFound, match="has no version"):
        await repo.read_version(path, CHILD)


async def test_versions_under_both_spellings_are_listed_in_order(tmp_path: Path) -> None:
    """Old and new sites, each unaware of the other, wrote one long path's versions under
    its uncut and its cut key: every listing of it is in id order (listing the path itself
    reads the cut prefix, then the uncut one)."""
    repo = Repository(MemoryStore(), tmp_path / "cache")
    first, second, third = (f"2026{m:02d}01T000000.000000Z-site-a-0000000{m}" for m in (1, 2, 3))
    await repo.store.put(_old_key(LONG, first), _doc(LONG, first).to_bytes())
    await repo.store.put(_old_key(LONG, second), _doc(LONG, second, first).to_bytes())
    await repo.store.put(version_key(LONG, third), _doc(LONG, third, second).to_bytes())
    assert await repo.version_ids(LONG) == [first, second, third]
    grouped = _group(
        [(d, v, g, await repo.read_version(d, v)) async for d, v, g in repo.listed_versions(LONG)],
        None,
    )
    assert [(g.path, [d.version for d in g.versions]) for g in grouped] == [
        (LONG, [first, second, third])
    ]


async def test_the_daemon_answers_one_ordered_list_for_a_path_under_both_spellings(
    served_site: StartSite, seaweed: EmbeddedSeaweed, bucket: str
) -> None:
    """Another dataset sorts between the two spellings of a long path's keys, so the path
    is listed twice; the daemon's versions answer for it holds all its versions, in order."""
    d = await served_site("site-a")
    token = d.token("t1", "/proj", "read")
    between = LONG.rsplit("/", 1)[0] + "/" + CJK[26:39] + ".x"  # sorts between the two
    first, second, third = (f"2026{m:02d}01T000000.000000Z-site-a-0000000{m}" for m in (1, 2, 3))
    client = seaweed.client()
    for key, doc in [
        (_old_key(LONG, first), _doc(LONG, first)),
        (version_key(LONG, second), _doc(LONG, second, first)),
        (_old_key(LONG, third), _doc(LONG, third, second)),
        (version_key(between, first), _doc(between, first)),
    ]:
        client.put_object(Bucket=bucket, Key=key, Body=doc.to_bytes())
    status, answer = d.request(
        "GET", "/v1/datasets/" + quote(LONG.removeprefix("/")) + "/versions", token
    )
    assert status == 200, answer
    assert [v["version"] for v in answer["versions"]] == [first, second, third]


def _path_whose_uncut_key_fills_the_limit(site: str) -> str:
    """A path whose legacy (uncut) version keys for `site` are exactly `MAX_KEY_BYTES`."""
    base = "/" + "/".join(["x" * 200] * 4)
    for extra in range(1, 256):
        path = f"{base}/{'y' * extra}"
        if len(legacy_versions_prefix(path) or "") + len(new_version_id(site)) == 1024:
            return path
    raise AssertionError("no such path")


async def test_publish_after_a_parent_under_a_full_length_uncut_key(tmp_path: Path) -> None:
    """A parent published under its uncut key by a site with a long name: its cut key is a
    few bytes past the store's limit, and `publish` asked the store for it (`InvalidInput`
    after the whole push was uploaded)."""
    long_site, short_site = "s" * 63, "b"
    path = _path_whose_uncut_key_fills_the_limit(long_site)
    parent = new_version_id(long_site)
    assert len(version_key(path, parent)) > 1024  # the cut key is the longer one here
    store = MemoryStore()
    repo = Repository(store, tmp_path / "cache")
    created = "2026-01-01T00:00:00.000000Z"
    old = VersionDoc(path, parent, None, long_site, created, "0" * 64, 10, 0, 0, 0, 0, 0)
    await store.put(legacy_versions_prefix(path) + parent, old.to_bytes())
    assert check_key_length(path, short_site) == path
    child = VersionDoc(
        path,
        new_version_id(short_site, parent),
        parent,
        short_site,
        created,
        "0" * 64,
        10,
        0,
        0,
        0,
        0,
        0,
    )
    await repo.publish(child)
    assert (await repo.read_version(path, child.version)).version == child.version
    assert await store.head(legacy_versions_prefix(path) + child.version)  # beside its parent
