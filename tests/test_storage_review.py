"""Defects found in review of the storage layer, each shown against a real SeaweedFS.

Faults a healthy SeaweedFS never shows (a throttling answer, a body cut off mid-way, a range
answered short) come from `FaultProxy` (tests/fixtures_store.py), in front of SeaweedFS.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from datamover.embedded import EmbeddedSeaweed
from datamover.errors import (
    InvalidInput,
    ObjectNotFound,
    PermanentError,
    StoreAccessDenied,
    StoreUnavailable,
)
from datamover.repo.repository import Repository
from datamover.storage.bandwidth import ThrottledStore
from datamover.storage.base import Store
from datamover.storage.memory import MemoryStore
from datamover.storage.posix import PosixStore
from datamover.storage.s3 import S3Store
from tests.fixtures_store import FaultProxy, Rule, StoreFactory

MiB = 1 << 20

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


# -- S3 settings a user can get wrong ----------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:8333",
        "s3.example.org",
        "htp://127.0.0.1:8333",
        "http://127.0.0.1:port",
        "http://[::1",
        "http://127.0.0.1:8333/some/path",
        "http://127.0.0.1:8333?x=1",
    ],
)
def test_s3_malformed_endpoint_is_invalid_input(endpoint: str) -> None:
    # Before: accepted here, then a raw ValueError / EndpointResolutionError at the first
    # request, which the CLI reports as an "internal error" (exit 70).
    with pytest.raises(InvalidInput, match="S3 endpoint") as err:
        S3Store(endpoint, "bucket")
    assert repr(endpoint) in str(err.value)


@pytest.mark.parametrize("bucket", ["b/c", "two words", "bücket", ".", "..", "..."])
def test_s3_malformed_bucket_name_is_invalid_input(bucket: str) -> None:
    # `.` and `..` passed, and failed at the server: "InvalidRequest (HTTP 400)", exit 7.
    # Before: a raw ParamValidationError (several lines, botocore's regexes) at each request.
    with pytest.raises(InvalidInput, match="bucket name"):
        S3Store("http://127.0.0.1:8333", bucket)


@pytest.mark.parametrize("bucket", ["b", "my_bucket.2026", "A-b", "x" * 255, "_archive", "a."])
def test_bucket_names_some_server_takes_are_accepted(bucket: str) -> None:
    assert S3Store("http://127.0.0.1:8333", bucket).bucket == bucket


async def test_s3_malformed_region_is_invalid_input(store_factory: StoreFactory) -> None:
    # Before: a raw botocore InvalidRegionError (a ValueError) from check().
    store = store_factory(region="us east 1")
    for call in (store.check, lambda: store.get("k"), lambda: store.put("k", b"x")):
        with pytest.raises(InvalidInput, match="region 'us east 1'") as err:
            await call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["profile", "config file"])
async def test_a_refused_aws_profile_or_config_file_is_invalid_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # Before: botocore's ProfileNotFound / ConfigParseError, raised while the client's data
    # loader was looked up (before the guarded client creation): "internal error", exit 70.
    if fault == "profile":
        monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
        names = "no-such-profile"
    else:
        names = str(tmp_path / "aws-config")
        (tmp_path / "aws-config").write_text("[default\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", names)
    store = S3Store("http://127.0.0.1:9", "bucket", access_key="k", secret_key="s")
    try:
        with pytest.raises(InvalidInput, match="cannot set up an S3 client") as err:
            await store.check()
        assert names in str(err.value) and "\n" not in str(err.value)
    finally:
        await store.close()


def _ls(config: Path) -> subprocess.CompletedProcess[str]:
    """`datamover ls /proj --config CONFIG`, with no `DATAMOVER_*` of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMOVER_")}
    return subprocess.run(
        [sys.executable, "-m", "datamover", "ls", "/proj", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_cli_names_a_malformed_endpoint_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        "[site]\n"
        'name = "s1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[store]\n"
        'endpoint = "127.0.0.1:8333"\n'
        'bucket = "datamover"\n'
        'access_key = "a"\n'
        'secret_key = "b"\n'
        "[namespace]\n"
        f'"/proj" = "{tmp_path}"\n'
    )
    proc = _ls(config)
    assert proc.returncode == 2, proc.stderr  # was 70, "internal error (ValueError: ...)"
    assert proc.stderr.count("\n") == 1
    assert "'127.0.0.1:8333'" in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.parametrize(
    ("good", "bad", "says"),
    [
        ("http://127.0.0.1:9", "http://user:pw@127.0.0.1:9", "[store] endpoint must not hold"),
        ('"a"', '"AKIA\\n"', "[store] access_key contains a control character"),
    ],
    ids=["endpoint", "access_key"],
)
def test_cli_refuses_store_settings_no_request_can_carry(
    tmp_path: Path, good: str, bad: str, says: str
) -> None:
    # Before: four retries logged as WARNINGs, then exit 6 "unavailable ... Potential header
    # injection attack" (or "credentials encoded in URL"), the password on every line.
    config = tmp_path / "site.toml"
    text = (
        "[site]\n"
        'name = "s1"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        "[store]\n"
        'endpoint = "http://127.0.0.1:9"\n'
        'bucket = "datamover"\n'
        'access_key = "a"\n'
        'secret_key = "b"\n'
        "[namespace]\n"
        f'"/proj" = "{tmp_path}"\n'
    )
    config.write_text(text.replace(good, bad, 1))
    proc = _ls(config)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr
    assert "pw" not in proc.stderr and "AKIA" not in proc.stderr


def test_s3_store_refuses_a_key_with_a_control_character_without_showing_it() -> None:
    with pytest.raises(InvalidInput, match="S3 secret key contains a control") as err:
        S3Store("http://127.0.0.1:8333", "bucket", access_key="k", secret_key="pw\r")
    assert "pw" not in str(err.value)
    with pytest.raises(InvalidInput, match="must not hold a user name") as err:
        S3Store("http://u:pw@127.0.0.1:8333", "bucket")
    assert "pw" not in str(err.value)


# -- ranged GETs never come back short ----------------------------------------------------

DATA = bytes(range(256)) * 400  # 100 KiB

BOTH_PATHS = pytest.mark.parametrize("direct_min", [1, 1 << 40], ids=["direct", "aiohttp"])


def answer_ranges_short(cut: int) -> Rule:
    """A rule answering every ranged GET with at most `cut` bytes of `DATA`, in a 206 whose
    Content-Range and Content-Length agree with the short body (a proxy capping ranges)."""

    async def rule(request: web.Request, body: bytes) -> web.StreamResponse | None:
        match = _RANGE.fullmatch(request.headers.get("Range", ""))
        if request.method != "GET" or match is None:
            return None
        first = int(match.group(1))
        last = len(DATA) - 1 if not match.group(2) else int(match.group(2))
        last = min(last, first + cut - 1, len(DATA) - 1)
        return web.Response(
            status=206,
            body=DATA[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(DATA)}"},
        )

    return rule


@BOTH_PATHS
async def test_s3_range_answered_short_is_unavailable_not_short_data(
    proxy: FaultProxy, store_factory: StoreFactory, direct_min: int
) -> None:
    # Before: get() returned the 10 bytes the server sent, for a 100-byte range and for
    # "everything from offset 10", without a word.
    await store_factory().put("obj", DATA)
    store = store_factory(endpoint=proxy.endpoint, direct_min=direct_min)
    proxy.rule = answer_ranges_short(10)
    calls = [lambda: store.get("obj", 10, 100), lambda: store.get("obj", len(DATA) - 50, 40)]
    if direct_min > 1:
        calls.append(lambda: store.get("obj", 10))  # a suffix never goes the direct path
    for call in calls:
        with pytest.raises(StoreUnavailable, match=r"sent 10 bytes for .*Content-Range"):
            await call()
    # A range answered in full, or cut where the object really ends, is still fine.
    proxy.rule = answer_ranges_short(1000)
    assert await store.get("obj", 10, 100) == DATA[10:110]
    assert await store.get("obj", len(DATA) - 50, 100) == DATA[-50:]
    if direct_min > 1:
        assert await store.get("obj", len(DATA) - 50) == DATA[-50:]


# -- one contract for every store: keys and prefixes ----------------------------------------


@pytest.fixture(params=["memory", "posix", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store of each kind."""
    if request.param == "memory":
        return MemoryStore()
    if request.param == "posix":
        (tmp_path / "store").mkdir()
        return PosixStore(tmp_path / "store")
    factory: StoreFactory = request.getfixturevalue("store_factory")
    return factory()


async def test_keys_not_valid_unicode_or_over_1024_bytes_are_invalid_input(
    any_store: Store,
) -> None:
    # Before: memory and POSIX stored a key with a lone surrogate (memory's listing then
    # crashed on it, POSIX's skipped it), S3 raised a raw UnicodeEncodeError; a key of more
    # than S3's 1024 bytes was stored by memory only.
    await any_store.put("ok", b"x")
    for key in ["a\udc80b", "x" * 1025, "a/" + "é" * 600]:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda key=key: any_store.put(key, b"x"),
            lambda key=key: any_store.get(key),
            lambda key=key: any_store.head(key),
            lambda key=key: any_store.delete(key),
        ]
        for call in calls:
            with pytest.raises(InvalidInput, match="bad store key"):
                await call()
    with pytest.raises(InvalidInput, match="listing prefix"):
        [i async for i in any_store.list("a\udc80")]
    assert [i.key async for i in any_store.list()] == ["ok"]


async def test_a_part_too_long_for_the_medium_is_refused_as_invalid_input(
    any_store: Store,
) -> None:
    # A dataset path's uncut encoding, as keys held it before long ones were cut
    # (docs/format.md, "Keys"), can pass 255 bytes. Before: POSIX raised StoreUnavailable
    # (ENAMETOOLONG, retried as if it could pass), S3 a PermanentError (KeyTooLongError);
    # memory stores it, and so does SeaweedFS, whose limit is on a key's last part only.
    key = "datasets/" + "%E6%95%B0" * 40 + "/versions/v1"
    try:
        await any_store.put(key, b"doc")
    except InvalidInput as exc:
        assert "too long" in str(exc) or "longer than" in str(exc)
        with pytest.raises(ObjectNotFound):
            await any_store.get(key)
        with pytest.raises(ObjectNotFound):
            await any_store.head(key)
        await any_store.delete(key)
        assert [i.key async for i in any_store.list(key[:300])] == []
    else:
        assert await any_store.get(key) == b"doc"


async def test_a_prefix_no_key_can_start_with_lists_nothing(any_store: Store) -> None:
    # Before: the POSIX store dropped a leading "/", so list("/q") listed "q/one" and
    # list("/") listed everything; SeaweedFS does the same, and reads "./q" as "q". Memory
    # (and S3 proper) list nothing: no key starts with "/" or has a "." part.
    await any_store.put("q/one", b"1")
    await any_store.put("x", b"2")
    for prefix in ["/", "/q", "/x", "q//", "//q", "./q", "./", "q/./", "q/../q/", "q/\x01"]:
        assert [i.key async for i in any_store.list(prefix)] == [], prefix
    assert [i.key async for i in any_store.list("q/")] == ["q/one"]


# -- the bandwidth budget -----------------------------------------------------------------


async def test_throttled_gets_cancelled_while_waiting_give_their_turn_back() -> None:
    # Before: five cancelled 1 MiB GETs kept their 5 s on the timeline, and the next GET
    # (of any transfer sharing the store) waited them out.
    inner = MemoryStore()
    await inner.put("k", bytes(2 * MiB))
    store = ThrottledStore(inner, download=MiB)
    await store.get("k", 0, MiB // 10)  # the first goes at once and books 0.1 s
    waiting = [asyncio.ensure_future(store.get("k", 0, MiB)) for _ in range(5)]
    await asyncio.sleep(0.01)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    started = time.monotonic()
    await store.get("k", 0, 1000)
    assert time.monotonic() - started < 0.5


async def test_throttled_get_pays_only_for_the_bytes_that_came() -> None:
    # Before: a range running past the object's end (1 GiB asked, 1000 bytes there) booked
    # 1024 s of a 1 MiB/s budget, and every later GET waited for it. So did a missing key.
    inner = MemoryStore()
    await inner.put("k", bytes(1000))
    store = ThrottledStore(inner, download=MiB)
    assert len(await store.get("k", 0, 1 << 30)) == 1000
    with pytest.raises(ObjectNotFound):
        await asyncio.wait_for(store.get("missing", 0, 1 << 30), 1)
    assert await asyncio.wait_for(store.get("k", 0, 10), 1) == bytes(10)


# -- POSIX: what head and list call an object is what get reads ------------------------------


async def test_posix_get_reads_no_symlink_and_waits_for_no_fifo(tmp_path: Path) -> None:
    # Before: head() and list() skipped a symlink in the store directory, but get() followed
    # it and returned the target's bytes (a file outside the store); get() of a FIFO hung.
    (tmp_path / "outside").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    store = PosixStore(root)
    await store.put("real", b"1")
    (root / "link").symlink_to(tmp_path / "outside")
    os.mkfifo(root / "fifo")
    assert [i.key async for i in store.list()] == ["real"]
    for key in ("link", "fifo"):
        with pytest.raises(ObjectNotFound):
            await store.head(key)
        with pytest.raises(ObjectNotFound):
            await asyncio.wait_for(store.get(key), 2)
        with pytest.raises(ObjectNotFound):
            await asyncio.wait_for(store.get(key, 1, 3), 2)
    assert await store.get("real") == b"1"


async def test_posix_put_makes_new_directories_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: put("packs/ab/cd") fsynced the file and packs/ab, but not the store root and
    # packs/ in which it had just made packs/ and packs/ab: after a power cut the object
    # could be gone although put had returned (and a manifest written after it survive).
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store = PosixStore(tmp_path)
    await store.put("packs/ab/cd", b"pack")
    for directory in (tmp_path, tmp_path / "packs", tmp_path / "packs" / "ab"):
        assert str(directory) in synced, directory
    synced.clear()
    await store.put("packs/ab/ef", b"pack")  # nothing new to make: only its own directory
    assert synced[-1] == str(tmp_path / "packs" / "ab")
    assert str(tmp_path) not in synced


def test_embedded_seaweed_keeps_its_log_files_with_its_data(seaweed: EmbeddedSeaweed) -> None:
    """glog's files (`weed.<host>.<user>.log.<level>.<time>.<pid>`) go to the server's data
    directory, which `stop` removes, not into $TMPDIR, where every run left more."""
    import tempfile

    assert seaweed._proc is not None
    mine = f".{seaweed._proc.pid}"
    assert any(p.name.endswith(mine) for p in Path(seaweed.data_dir).iterdir())
    temp = Path(tempfile.gettempdir()).iterdir()
    assert not any(p.name.startswith("weed.") and p.name.endswith(mine) for p in temp)


class _Answering(http.server.BaseHTTPRequestHandler):
    """Answers every request with the class's `status`, `kind` and `body` (a HEAD without
    the body): a server that is not S3 at the store's endpoint."""

    status, kind, body = 200, "text/plain", b""

    def _answer(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Type", self.kind)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.body)

    do_GET = do_PUT = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@contextlib.asynccontextmanager
async def _store_at_a_server(status: int, kind: str, body: bytes) -> AsyncIterator[S3Store]:
    """An `S3Store` whose endpoint is an HTTP server answering `status`, `kind`, `body`."""
    handler = type("Answering", (_Answering,), {"status": status, "kind": kind, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = S3Store(
        f"http://127.0.0.1:{server.server_port}", "bucket", access_key="k", secret_key="s"
    )
    try:
        yield store
    finally:
        await store.close()
        server.shutdown()
        server.server_close()


async def test_an_endpoint_that_is_not_s3_is_named_not_an_internal_error() -> None:
    # The filer's port for the S3 port (8888 for 8333): its HTML or JSON answers failed
    # botocore's XML parser, which reached the user as "internal error (ResponseParserError".
    filer = b'{"name": "config", "size": 2}'  # a SeaweedFS filer's answer to a write
    async with _store_at_a_server(201, "application/json", filer) as store:
        with pytest.raises(PermanentError, match=r"not S3 .*S3 port"):
            await store.put("config", b"{}")


@pytest.mark.parametrize(
    ("status", "kind", "body"),
    [
        (401, "application/json", b'{"error": {"code": "unauthorized"}}'),  # an API's login
        (403, "text/html", b"<html><body>Forbidden</body></html>"),  # a web server's page
        (401, "text/plain", b""),
    ],
)
async def test_a_refusal_that_is_not_s3s_names_the_endpoint_not_the_credentials(
    status: int, kind: str, body: bytes
) -> None:
    # Before: "the credentials were refused or lack permission for ListObjectsV2 (401)",
    # for [store] endpoint set to another service's port (the site daemon's).
    async with _store_at_a_server(status, kind, body) as store:
        with pytest.raises(PermanentError, match=rf"HTTP {status} but no S3 error: .*S3 port"):
            [o async for o in store.list("datasets/")]  # as `ls` asks
        if status == 401:  # S3 refuses with 403, a HEAD too: a 401 is another server's
            with pytest.raises(PermanentError, match=r"HTTP 401 but no S3 error"):
                await store.check()  # HeadBucket: the daemon's readiness and warm-up


async def test_a_web_page_answered_200_is_no_empty_bucket(tmp_path: Path) -> None:
    """A console or login portal at the endpoint's port answers 200 with HTML, which parses
    as XML: the listing had no objects, so `ls` listed nothing and exited 0, a stage said
    the dataset had no version, and a push called the repository config corrupt."""
    page = b"<html><body>login portal</body></html>"
    async with _store_at_a_server(200, "text/html", page) as store:
        with pytest.raises(PermanentError, match=r"not an S3 listing: .*S3 port"):
            [o async for o in store.list("datasets/")]
        repo = Repository(store, tmp_path / "cache")
        with pytest.raises(PermanentError, match=r"not an S3 listing"):
            await repo.chunker_params(create=True)


async def test_a_real_s3_refusal_still_names_the_credentials(seaweed: EmbeddedSeaweed) -> None:
    store = S3Store(seaweed.endpoint, "bucket", access_key="wrong", secret_key="wrong")
    try:
        with pytest.raises(StoreAccessDenied, match="credentials were refused"):
            [o async for o in store.list("datasets/")]
    finally:
        await store.close()
