"""One conformance suite for every Store: memory, POSIX and S3 (a real SeaweedFS, no mocks).

Each behaviour of the contract in `datamover/storage/base.py` is tested once, against all
drivers; behaviour only one driver has (S3's error mapping, POSIX's temp files) follows the
shared part. The retry and limit wrappers are unit-tested against small fake inner stores.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from datamover.embedded import EmbeddedSeaweed
from datamover.errors import (
    BucketNotFound,
    Conflict,
    InvalidInput,
    ObjectNotFound,
    StoreAccessDenied,
    StoreRetriesExhausted,
    StoreUnavailable,
    UploadLost,
)
from datamover.storage.base import ObjectInfo, Store
from datamover.storage.memory import MemoryStore
from datamover.storage.posix import PosixStore
from datamover.storage.retry import LimitedStore, RetryingStore, RetryPolicy
from datamover.storage.s3 import S3Store
from tests.fixtures_store import StoreFactory

MiB = 1 << 20
PART = 5 * MiB  # the S3 store below uploads parts of this size

BACKENDS = ["memory", "posix", "s3", "s3-direct"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which driver a test runs against."""
    return str(request.param)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store of each kind. The S3 one uploads anything from 6 MiB on in 5 MiB parts,
    so a modest object exercises multipart uploads."""
    if backend == "memory":
        return MemoryStore()
    if backend == "posix":
        (tmp_path / "store").mkdir()
        return PosixStore(tmp_path / "store")
    factory: StoreFactory = request.getfixturevalue("store_factory")
    if backend == "s3-direct":  # every ranged GET on the threaded HTTP path (direct.py)
        return factory(multipart_threshold=6 * MiB, multipart_chunk=PART, direct_min=1)
    return factory(multipart_threshold=6 * MiB, multipart_chunk=PART)


async def keys_of(store: Store, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


def byte_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=str.encode)


async def put_all(store: Store, items: dict[str, bytes], concurrency: int = 64) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(key: str, data: bytes) -> None:
        async with slots:
            await store.put(key, data)

    await asyncio.gather(*(one(k, v) for k, v in items.items()))


# -- put, get, head ---------------------------------------------------------------------


async def test_put_get_head_roundtrip(store: Store) -> None:
    items = {"x": b"one", "dir/sub/file.bin": os.urandom(3000), "unicode/é/ü-😀": "é".encode()}
    for key, data in items.items():
        await store.put(key, data)
    for key, data in items.items():
        assert await store.get(key) == data
        assert await store.head(key) == ObjectInfo(key, len(data))


async def test_put_takes_bytearray_and_memoryview_and_copies(store: Store) -> None:
    buf = bytearray(b"abcdef")
    await store.put("ba", buf)
    await store.put("mv", memoryview(b"0123456789")[2:5])
    buf[0:1] = b"Z"  # the store must have taken a copy
    assert await store.get("ba") == b"abcdef"
    assert await store.get("mv") == b"234"


async def test_overwrite_replaces_whole_object_and_repeat_is_harmless(store: Store) -> None:
    await store.put("k", b"a much longer first version")
    await store.put("k", b"short")
    assert await store.get("k") == b"short"
    assert (await store.head("k")).size == 5
    await store.put("k", b"short")
    assert await store.get("k") == b"short"
    assert await keys_of(store) == ["k"]


async def test_ranges(store: Store) -> None:
    data = bytes(range(256)) * 4
    await store.put("r", data)
    cases = [
        (0, 10),  # start
        (100, 50),  # middle
        (1000, 100),  # runs past the end: cut at the end
        (1023, None),  # last byte
        (10, None),  # suffix
        (0, None),  # everything
        (1024, None),  # offset at end
        (1024, 5),
        (5000, 5),  # offset past end
        (5, 0),  # zero length
        (10, 1 << 40),  # a length far beyond any object
    ]
    for offset, length in cases:
        want = data[offset:] if length is None else data[offset : offset + length]
        assert await store.get("r", offset, length) == want, (offset, length)


async def test_empty_object(store: Store) -> None:
    await store.put("empty", b"")
    assert await store.get("empty") == b""
    assert await store.get("empty", 0, 5) == b""
    assert await store.get("empty", 3) == b""
    assert await store.head("empty") == ObjectInfo("empty", 0)
    assert [i async for i in store.list()] == [ObjectInfo("empty", 0)]


async def test_missing_key_raises_object_not_found(store: Store) -> None:
    await store.put("present", b"x")
    with pytest.raises(ObjectNotFound, match="nope/missing"):
        await store.get("nope/missing")
    with pytest.raises(ObjectNotFound, match="missing"):
        await store.get("missing", 1, 2)
    with pytest.raises(ObjectNotFound, match="missing"):
        await store.head("missing")
    # A key that is only a prefix of another is not an object either.
    await store.put("dir/inner", b"x")
    with pytest.raises(ObjectNotFound):
        await store.get("dir")
    with pytest.raises(ObjectNotFound):
        await store.head("dir")


async def test_zero_length_get_answers_without_a_lookup(store: Store) -> None:
    # Documented shortcut of every driver (S3 makes no request for it).
    assert await store.get("never-written", 7, 0) == b""


async def test_delete_is_idempotent(store: Store) -> None:
    await store.put("d/a", b"1")
    await store.put("d/b", b"2")
    await store.delete("d/a")
    with pytest.raises(ObjectNotFound):
        await store.get("d/a")
    await store.delete("d/a")
    await store.delete("never/existed")
    assert await keys_of(store) == ["d/b"]
    await store.delete("d/b")
    assert await keys_of(store) == []
    await store.put("d", b"now a plain key")  # no leftover directory in the way
    assert await store.get("d") == b"now a plain key"


# -- listing ----------------------------------------------------------------------------

# Keys where UTF-8 byte order differs from path-component order ('-' < '.' < '/' < '0').
# A file system cannot hold `a/b` and `a/b/c` together; that case has its own test below.
TRICKY = [
    "a b",
    "a%20b",
    "a+b",
    "a-b",
    "a.b",
    "a/b/c",
    "a/b-c",
    "a/b.c",
    "a/b0",
    "a/é",
    "a0",
    "ab",
    "b.a",
    "b/a",
    "z",
    "~",
    "é",
    "ÿ",
    "😀",
]


async def test_list_orders_by_utf8_bytes(store: Store) -> None:
    assert byte_order(TRICKY) != sorted(TRICKY, key=lambda k: k.split("/")), "not tricky"
    items = {k: k.encode() * 2 for k in TRICKY}
    await put_all(store, items)
    listed = [i async for i in store.list()]
    assert [i.key for i in listed] == byte_order(TRICKY)
    assert all(i.size == len(items[i.key]) for i in listed)


async def test_list_with_prefix(store: Store) -> None:
    await put_all(store, {k: b"x" for k in TRICKY})
    for prefix in ["a", "a/", "a/b", "a/b/", "b", "é", "zz", "a/b/c", "q/"]:
        want = byte_order([k for k in TRICKY if k.startswith(prefix)])
        assert await keys_of(store, prefix) == want, prefix


async def test_key_may_also_be_a_prefix_of_other_keys(store: Store, backend: str) -> None:
    await store.put("a/b/c", b"deep")
    if backend == "posix":
        with pytest.raises(Conflict, match="a/b"):
            await store.put("a/b", b"file and directory at once")
        with pytest.raises(Conflict, match="a/b/c/d"):
            await store.put("a/b/c/d", b"below an object")
        assert await keys_of(store) == ["a/b/c"]
        return
    await store.put("a/b", b"both")
    await store.put("a", b"all three")
    await store.put("a.b", b"sibling")
    assert await keys_of(store) == ["a", "a.b", "a/b", "a/b/c"]
    assert await store.get("a/b") == b"both"


async def test_list_pages_through_more_than_a_thousand_keys(store: Store) -> None:
    # 1100 keys sorting before the sub-prefix `many/d/`: SeaweedFS lists `d/` first and the
    # files after it, over two pages, so the driver must carry `d/` across the page boundary.
    items = {f"many/d-{i:04d}": i.to_bytes(2, "big") for i in range(1100)}
    items.update({"many/d/x": b"in sub-prefix", "many/d0": b"after", "man": b"outside"})
    await put_all(store, items)
    listed = [i async for i in store.list("many/")]
    assert [i.key for i in listed] == byte_order([k for k in items if k.startswith("many/")])
    assert listed[-2:] == [ObjectInfo("many/d/x", 13), ObjectInfo("many/d0", 5)]
    # Stopping early is fine and yields the smallest keys.
    first = []
    async for info in store.list("many/"):
        first.append(info.key)
        if len(first) == 3:
            break
    assert first == ["many/d-0000", "many/d-0001", "many/d-0002"]


async def test_list_starts_after_a_key(store: Store) -> None:
    await put_all(store, {k: b"x" for k in TRICKY})
    starts = ["", "a", "a b", "a/", "a/b", "a/b/", "a/b/c", "a/b/d", "a/b0", "a/c", "a/é", "a0"]
    starts += ["b", "z", "zz", "😀", "😀x", "\U0010ffff", "-"]
    for prefix in ["", "a", "a/", "a/b", "b", "é"]:
        for start in starts:
            want = byte_order(
                [k for k in TRICKY if k.startswith(prefix) and k.encode() > start.encode()]
            )
            got = [i.key async for i in store.list(prefix, start)]
            assert got == want, (prefix, start)


async def test_list_starts_after_a_key_across_pages(store: Store) -> None:
    items = {f"many/d-{i:04d}": b"x" for i in range(1100)}
    items.update({"many/d/x": b"y", "many/d/y/z": b"y", "many/d0": b"z"})
    await put_all(store, items)
    for start in ["many/d-0999", "many/d-1099", "many/d", "many/d/", "many/d/x", "many/d/y"]:
        want = byte_order([k for k in items if k.encode() > start.encode()])
        assert [i.key async for i in store.list("many/", start)] == want, start


async def test_s3_list_from_a_start_skips_the_pages_before_it(s3_store: S3Store) -> None:
    await put_all(s3_store, {f"p/d-{i:04d}": b"x" for i in range(1100)} | {"p/d/x": b"y"})
    calls: list[dict[str, Any]] = []
    call = s3_store._call

    async def counting(op: str, key: str | None, **kw: Any) -> Any:
        if op == "ListObjectsV2":
            calls.append(kw)
        return await call(op, key, **kw)

    s3_store._call = counting  # type: ignore[method-assign]
    assert [i.key async for i in s3_store.list("p/", "p/d-1098")] == ["p/d-1099", "p/d/x"]
    # One probe of one key for each sub-prefix that sorts after the start but SeaweedFS
    # would leave out of a listing from it (`p/d/`, and `p/d-1098/` where a key
    # `p/d-1098/...` would be), then one page of the level from the start on and a listing
    # of the one sub-prefix that holds anything: not the two pages of the 1,099 keys
    # before the start.
    probes = [c for c in calls if c.get("MaxKeys") == 1]
    assert sorted(c["Prefix"] for c in probes) == ["p/d-1098/", "p/d/"]
    rest = [c for c in calls if c.get("MaxKeys") != 1]
    assert rest == [
        {"Prefix": "p/", "Delimiter": "/", "StartAfter": "p/d-1098"},
        {"Prefix": "p/d/", "Delimiter": "/"},
    ]


async def test_list_refuses_a_start_that_is_not_unicode(store: Store) -> None:
    with pytest.raises(InvalidInput, match="listing start"):
        [i async for i in store.list("", "a\udc80")]


# -- large objects ----------------------------------------------------------------------


async def test_large_object_and_range_across_part_boundary(
    store: Store, backend: str, request: pytest.FixtureRequest
) -> None:
    data = random.Random(7).randbytes(40 * MiB)
    await store.put("big/object", data)
    assert await store.head("big/object") == ObjectInfo("big/object", len(data))
    assert await store.get("big/object") == data
    assert await store.get("big/object", PART - 100, 200) == data[PART - 100 : PART + 100]
    assert (
        await store.get("big/object", 3 * PART + 1, 2 * PART) == data[3 * PART + 1 : 5 * PART + 1]
    )
    if backend.startswith("s3"):
        seaweed: EmbeddedSeaweed = request.getfixturevalue("seaweed")
        bucket: str = request.getfixturevalue("bucket")
        client = seaweed.client()
        # A multipart object's ETag ends in "-<parts>"; no upload is left open.
        assert client.head_object(Bucket=bucket, Key="big/object")["ETag"].endswith('-8"')
        assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


# -- bad input --------------------------------------------------------------------------

BAD_KEYS = ["", "/a", "a/", "a//b", "./a", "a/./b", "a/../b", "..", "a\x00b", "a\nb", "a\x7fb"]


async def test_bad_keys_are_rejected(store: Store) -> None:
    for key in BAD_KEYS:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda key=key: store.put(key, b"x"),
            lambda key=key: store.get(key),
            lambda key=key: store.head(key),
            lambda key=key: store.delete(key),
        ]
        for call in calls:
            with pytest.raises(InvalidInput, match="bad store key"):
                await call()
    assert await keys_of(store) == []


async def test_negative_range_is_rejected(store: Store) -> None:
    await store.put("k", b"abc")
    with pytest.raises(InvalidInput, match="bad range"):
        await store.get("k", -1)
    with pytest.raises(InvalidInput, match="bad range"):
        await store.get("k", 0, -1)


async def test_check_passes_on_a_usable_store(store: Store) -> None:
    await store.check()
    assert isinstance(store, Store)
    assert store.description
    for wrapped in (RetryingStore(store), LimitedStore(store, 2)):
        assert isinstance(wrapped, Store)
        assert wrapped.description == store.description
        await wrapped.check()


# -- a store whose bucket or directory does not exist -----------------------------------


@pytest.fixture(params=["posix", "s3"])
def missing_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Store, str]:
    """`(kind, store, where)`: a store whose directory or bucket does not exist, and the
    directory or endpoint its errors must name."""
    if request.param == "posix":
        return "posix", PosixStore(tmp_path / "not-there"), str(tmp_path / "not-there")
    factory: StoreFactory = request.getfixturevalue("store_factory")
    endpoint = request.getfixturevalue("seaweed").endpoint
    return "s3", factory(bucket="no-such-bucket-here"), endpoint


async def test_missing_bucket_raises_bucket_not_found(
    missing_store: tuple[str, Store, str], tmp_path: Path
) -> None:
    kind, store, where = missing_store
    calls: list[Callable[[], Awaitable[object]]] = [
        store.check,
        lambda: store.put("k", b"x"),
        lambda: keys_of(store),
    ]
    if kind == "s3":
        calls += [lambda: store.get("k"), lambda: store.delete("k")]
    for call in calls:
        with pytest.raises(BucketNotFound) as err:
            await call()
        assert where in str(err.value)
    if kind == "posix":
        assert not (tmp_path / "not-there").exists(), "a put must not create the store"


# -- S3 only: errors are sorted by what the caller should do ------------------------------


async def test_s3_description(s3_store: S3Store, seaweed: EmbeddedSeaweed, bucket: str) -> None:
    assert s3_store.description == f"s3://{bucket} at {seaweed.endpoint}"


async def test_s3_wrong_credentials_raise_access_denied(
    store_factory: StoreFactory, seaweed: EmbeddedSeaweed
) -> None:
    good = store_factory()
    await good.put("k", b"x")
    for overrides in ({"secret_key": "wrong-secret"}, {"access_key": "unknown-key"}):
        bad = store_factory(**overrides, direct_min=1)
        calls: list[Callable[[], Awaitable[object]]] = [
            bad.check,
            lambda bad=bad: bad.get("k"),
            lambda bad=bad: bad.get("k", 0, 1),  # the threaded path (direct.py)
            lambda bad=bad: bad.head("k"),
            lambda bad=bad: bad.put("k2", b"y"),
            lambda bad=bad: keys_of(bad),
        ]
        for call in calls:
            with pytest.raises(StoreAccessDenied, match="credentials") as err:
                await call()
            assert seaweed.endpoint in str(err.value)
    assert await keys_of(good) == ["k"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


async def test_s3_unreachable_endpoint_raises_unavailable(store_factory: StoreFactory) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = store_factory(endpoint=endpoint, connect_timeout=2, direct_min=1)
    calls: list[Callable[[], Awaitable[object]]] = [
        store.check,
        lambda: store.get("k"),
        lambda: store.get("k", 0, 1),  # the threaded path (direct.py)
        lambda: store.head("k"),
        lambda: store.put("k", b"x"),
        lambda: store.delete("k"),
        lambda: keys_of(store),
    ]
    for call in calls:
        with pytest.raises(StoreUnavailable) as err:
            await call()
        assert endpoint in str(err.value)


async def test_s3_failed_multipart_upload_is_aborted(
    store_factory: StoreFactory, seaweed: EmbeddedSeaweed, bucket: str
) -> None:
    store = store_factory(multipart_threshold=6 * MiB, multipart_chunk=PART)
    await store.check()  # creates the client, whose upload_part we sabotage below
    client: Any = store._client
    real_upload_part = client.upload_part
    uploaded: list[int] = []
    some_uploaded = asyncio.Event()

    async def failing_upload_part(**kwargs: Any) -> Any:
        if kwargs["PartNumber"] == 3:
            # Fail only once another part is stored, so the abort has parts to discard.
            await asyncio.wait_for(some_uploaded.wait(), 30)
            raise ConnectionResetError("injected fault")
        resp = await real_upload_part(**kwargs)
        uploaded.append(kwargs["PartNumber"])
        some_uploaded.set()
        return resp

    client.upload_part = failing_upload_part
    with pytest.raises(StoreUnavailable, match="injected fault"):
        await store.put("big", os.urandom(5 * PART))
    assert uploaded, "some parts went up before the fault"
    assert not seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    with pytest.raises(ObjectNotFound):
        await store.head("big")


@pytest.mark.parametrize("size", [100, 7 * MiB], ids=["single", "multipart"])
async def test_s3_body_damaged_in_transit_is_refused(
    store_factory: StoreFactory, size: int
) -> None:
    # Over HTTP the payload's SHA-256 is signed: a body changed after it was signed must not
    # be stored, and the failure is transient (sending it again is the cure).
    store = store_factory(multipart_threshold=6 * MiB, multipart_chunk=PART)
    await store.check()
    client: Any = store._client

    def damage(request: Any, **_: Any) -> None:
        data = request.body.read()
        request.body = io.BytesIO(bytes([data[0] ^ 1]) + data[1:])

    for op in ("PutObject", "UploadPart"):
        client.meta.events.register(f"before-send.s3.{op}", damage)
    with pytest.raises(StoreUnavailable, match=r"XAmzContentSHA256Mismatch|BadDigest"):
        await store.put("k", os.urandom(size))
    with pytest.raises(ObjectNotFound):
        await store.head("k")


async def test_s3_multipart_chunk_below_minimum_is_rejected(store_factory: StoreFactory) -> None:
    with pytest.raises(InvalidInput, match="minimum"):
        store_factory(multipart_chunk=MiB)


# -- POSIX only ---------------------------------------------------------------------------


def names_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_posix_leaves_no_temp_files_and_prunes_empty_directories(tmp_path: Path) -> None:
    store = PosixStore(tmp_path)
    await store.put("x/y/z", b"data")
    assert names_in(tmp_path / "x" / "y") == ["z"]
    (tmp_path / "x" / "y" / ".tmp-0123abcd").write_bytes(b"left by a crash")
    assert await keys_of(store) == ["x/y/z"]
    (tmp_path / "x" / "y" / ".tmp-0123abcd").unlink()
    await store.delete("x/y/z")
    assert names_in(tmp_path) == []
    with pytest.raises(InvalidInput, match="reserved"):
        await store.put("x/.tmp-mine", b"")


async def test_posix_list_skips_symlinks(tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    store = PosixStore(tmp_path / "root")
    (tmp_path / "root").mkdir()
    await store.put("real", b"1")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "root" / "dirlink").symlink_to(tmp_path)
    assert await keys_of(store) == ["real"]
    with pytest.raises(ObjectNotFound):
        await store.head("link")


# -- the wrappers -------------------------------------------------------------------------


class FlakyStore(MemoryStore):
    """Fails `head` with the queued errors, one per call, then answers normally; its `list`
    raises StoreUnavailable after yielding `list_fail_after[n]` items on the n-th listing."""

    def __init__(self, errors: list[Exception], list_fail_after: list[int] | None = None) -> None:
        super().__init__("flaky://")
        self.errors = errors
        self.head_calls = 0
        self.list_fail_after = list_fail_after or []
        self.list_calls = 0
        self.list_starts: list[str] = []

    async def head(self, key: str) -> ObjectInfo:
        self.head_calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await super().head(key)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        fail_after = (
            self.list_fail_after[self.list_calls]
            if self.list_calls < len(self.list_fail_after)
            else None
        )
        self.list_calls += 1
        self.list_starts.append(start_after)
        n = 0
        async for info in super().list(prefix, start_after):
            if n == fail_after:
                raise StoreUnavailable("injected listing fault")
            n += 1
            yield info
        if fail_after is not None and n <= fail_after:
            raise StoreUnavailable("injected fault at the end")


async def test_retrying_store_retries_transient_faults_then_succeeds() -> None:
    inner = FlakyStore([StoreUnavailable("blip"), UploadLost("a new put can succeed")])
    await inner.put("k", b"abc")
    store = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.001, maximum=0.01))
    assert await store.head("k") == ObjectInfo("k", 3)
    assert inner.head_calls == 3
    assert store.description == "flaky://"


async def test_retrying_store_gives_up_after_n_attempts() -> None:
    inner = FlakyStore([StoreUnavailable(f"blip {i}") for i in range(10)])
    store = RetryingStore(inner, RetryPolicy(attempts=4, initial=0.001, maximum=0.01))
    with pytest.raises(StoreUnavailable, match="blip 3"):
        await store.head("k")
    assert inner.head_calls == 4


@pytest.mark.parametrize(
    "error",
    [
        StoreAccessDenied("no"),
        BucketNotFound("gone"),
        ObjectNotFound("absent"),
        StoreRetriesExhausted("a part of it was tried as often as the policy allows"),
    ],
)
async def test_retrying_store_does_not_retry_permanent_errors(error: Exception) -> None:
    inner = FlakyStore([error, StoreUnavailable("would succeed next")])
    store = RetryingStore(inner, RetryPolicy(attempts=5, initial=0.001))
    with pytest.raises(type(error)):
        await store.head("k")
    assert inner.head_calls == 1


@pytest.mark.parametrize("fail_after", [[0], [4], [4, 0], [3, 7, 8], [10]])
async def test_retrying_store_list_resumes_without_duplicates(fail_after: list[int]) -> None:
    inner = FlakyStore([], list_fail_after=fail_after)
    keys = [f"k/{i:02d}" for i in range(10)]
    for k in keys:
        await inner.put(k, b"v")
    store = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.001, maximum=0.01))
    assert await keys_of(store) == keys
    assert inner.list_calls == len(fail_after) + 1
    # Each retry lists from the last key yielded, not from the start again.
    yielded = 0
    for n, start in zip(fail_after, inner.list_starts[1:], strict=True):
        yielded += min(n, len(keys) - yielded)
        assert start == ("" if yielded == 0 else keys[yielded - 1])


async def test_retrying_store_list_gives_up_without_progress() -> None:
    inner = FlakyStore([], list_fail_after=[2, 0, 0, 0])
    for i in range(5):
        await inner.put(f"k{i}", b"v")
    store = RetryingStore(inner, RetryPolicy(attempts=3, initial=0.001, maximum=0.01))
    seen: list[str] = []
    with pytest.raises(StoreUnavailable):
        async for info in store.list():
            seen.append(info.key)
    assert seen == ["k0", "k1"]
    assert inner.list_calls == 3  # the progress-making failure, then two fruitless tries


async def test_retrying_store_gives_up_on_an_unreachable_s3(store_factory: StoreFactory) -> None:
    store = RetryingStore(
        store_factory(endpoint=f"http://127.0.0.1:{closed_port()}"),
        RetryPolicy(attempts=2, initial=0.001),
    )
    with pytest.raises(StoreUnavailable):
        await store.get("k")


class SlowStore(MemoryStore):
    """Counts how many calls are inside it at once."""

    def __init__(self) -> None:
        super().__init__("slow://")
        self.inside = 0
        self.most_inside = 0

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            await asyncio.sleep(0.01)
            return await super().get(key, offset, length)
        finally:
            self.inside -= 1


async def test_limited_store_bounds_concurrent_calls() -> None:
    inner = SlowStore()
    store = LimitedStore(inner, max_concurrency=3)
    await store.put("k", b"v")
    results = await asyncio.gather(*(store.get("k") for _ in range(20)))
    assert results == [b"v"] * 20
    assert inner.most_inside == 3
    assert store.description == "slow://"
    # A listing holds no slot while the caller works on an item, so this cannot deadlock.
    single = LimitedStore(inner, max_concurrency=1)
    async for info in single.list():
        assert await asyncio.wait_for(single.get(info.key), 1) == b"v"
