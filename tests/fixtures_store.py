"""Store fixtures: one real SeaweedFS per test session, a fresh bucket per test.

`seaweed` starts `weed server` once (about 4 s); `bucket` takes a uniquely named, empty
bucket that a background thread made ahead (SeaweedFS takes about 0.2 s, mostly waiting, to
grow a new bucket's first volume) and drops it with its contents afterwards (each bucket holds
SeaweedFS volumes, so they are not left to pile up); `store_factory` makes `S3Store`s on that
bucket, closed after the test. `proxy` is a `FaultProxy` in front of that SeaweedFS, for faults
a healthy server never shows.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from datamover.embedded import EmbeddedSeaweed
from datamover.storage.s3 import S3Store

StoreFactory = Callable[..., S3Store]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedSeaweed]:
    """A running SeaweedFS with an S3 gateway, shared by the whole session."""
    with EmbeddedSeaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


class _Buckets:
    """New, warmed buckets, made `ahead` at a time by one thread while tests run."""

    def __init__(self, seaweed: EmbeddedSeaweed, ahead: int = 2) -> None:
        self._seaweed = seaweed
        self._ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=ahead)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="test-buckets", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stopping.is_set():
            name = f"test-{secrets.token_hex(6)}"
            item: str | BaseException = name
            try:
                self._seaweed.create_bucket(name)
            except BaseException as exc:  # handed to the test that takes it
                item = exc
            while not self._stopping.is_set():
                try:
                    self._ready.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            else:
                if isinstance(item, str):
                    self._seaweed.delete_bucket(item)

    def take(self) -> str:
        """A new bucket; raises what making it raised."""
        item = self._ready.get(timeout=120)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and delete the buckets no test took."""
        self._stopping.set()
        self._thread.join()
        while not self._ready.empty():
            item = self._ready.get_nowait()
            if isinstance(item, str):
                self._seaweed.delete_bucket(item)


@pytest.fixture(scope="session")
def bucket_pool(seaweed: EmbeddedSeaweed) -> Iterator[_Buckets]:
    buckets = _Buckets(seaweed)
    yield buckets
    buckets.close()


@pytest.fixture
def bucket(seaweed: EmbeddedSeaweed, bucket_pool: _Buckets) -> Iterator[str]:
    """A new, empty bucket, deleted after the test."""
    name = bucket_pool.take()
    yield name
    seaweed.delete_bucket(name)


@pytest.fixture
async def store_factory(seaweed: EmbeddedSeaweed, bucket: str) -> AsyncIterator[StoreFactory]:
    """`make(**overrides)` -> an `S3Store` on `bucket` with the server's keys; any constructor
    argument can be overridden (`secret_key="wrong"`, `bucket="missing"`)."""
    made: list[S3Store] = []

    def make(**overrides: Any) -> S3Store:
        kwargs: dict[str, Any] = {
            "endpoint": seaweed.endpoint,
            "bucket": bucket,
            "access_key": seaweed.access_key,
            "secret_key": seaweed.secret_key,
        }
        kwargs.update(overrides)
        store = S3Store(**kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
def s3_store(store_factory: StoreFactory) -> S3Store:
    """An `S3Store` on a fresh bucket."""
    return store_factory()


#: A rule sees each request (and its body) and returns an answer to send instead of
#: forwarding it, or None to forward it.
Rule = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]


@dataclass
class FaultProxy:
    """A small aiohttp server that forwards every request to `upstream` unchanged (the Host
    header too, which the signature covers) unless `rule` answers it instead. `seen` lists
    `(method, path_qs)` of every request once its body is read; `arrived` as its headers
    arrive (a long body sent before a short request may be read after it)."""

    upstream: str
    rule: Rule | None = None
    seen: list[tuple[str, str]] = field(default_factory=list)
    arrived: list[tuple[str, str]] = field(default_factory=list)
    endpoint: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.arrived.append((request.method, request.path_qs))
        body = await request.read()
        self.seen.append((request.method, request.path_qs))
        if self.rule is not None:
            answer = await self.rule(request, body)
            if answer is not None:
                return answer
        status, headers, data = await self.forward(request, body)
        resp = web.Response(status=status, body=data)
        for name, value in headers:
            # A HEAD answer's Content-Length is the object's size, not its (empty) body's.
            keep = request.method == "HEAD" or name.lower() != "content-length"
            if keep and name.lower() not in ("transfer-encoding", "connection"):
                resp.headers.add(name, value)
        return resp

    async def forward(
        self, request: web.Request, body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """The upstream's answer to `request`: status, headers and the whole body."""
        headers = {k: v for k, v in request.headers.items() if k.lower() != "connection"}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method,
                self.upstream + request.path_qs,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
            ) as up,
        ):
            data = await up.read()
            return up.status, list(up.headers.items()), data


@pytest.fixture
async def proxy(seaweed: EmbeddedSeaweed) -> AsyncIterator[FaultProxy]:
    """A `FaultProxy` in front of the session's SeaweedFS."""
    fault = FaultProxy(seaweed.endpoint)
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", fault.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fault.endpoint = f"http://127.0.0.1:{port}"
    yield fault
    await runner.cleanup()


def s3_error(status: int, code: str) -> web.Response:
    """An S3 error answer."""
    body = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>"
    return web.Response(status=status, body=body.encode(), content_type="application/xml")
