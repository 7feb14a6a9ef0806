"""The presigned URLs of large ranged GETs (direct.py) are sent only while valid, by the
wall clock the server checks them by: a GET that waited for a thread past its URL's expiry,
or one handed a kept URL after the machine slept, is sent with a new URL; a kept URL the
server refuses is signed again once.

Before: a URL was kept for `_URL_REUSE` seconds by `time.monotonic`, which stands still
while the machine is suspended, and nothing looked at it again once the GET had waited in
the thread pool's queue: the server answered AccessDenied "Request has expired", a
`StoreAccessDenied` that is never retried, and the stage failed.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from datamover.errors import StoreAccessDenied, StoreUnavailable
from datamover.storage import s3 as s3mod
from datamover.storage.direct import DirectGetter, UrlExpired
from tests.fixtures_store import FaultProxy, StoreFactory, s3_error

# Scaled down from 900 s of validity, 600 s of reuse and a 60 s margin. X-Amz-Date has
# whole seconds, so a URL may lose up to one of its seconds.
EXPIRY, REUSE, MARGIN = 4, 3, 1


@pytest.fixture
def short_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3mod, "_URL_EXPIRY", EXPIRY)
    monkeypatch.setattr(s3mod, "_URL_REUSE", REUSE)
    monkeypatch.setattr(s3mod, "_URL_MARGIN", MARGIN)


def _ranged_gets(proxy: FaultProxy) -> list[str]:
    return [path for method, path in proxy.seen if method == "GET" and "X-Amz-Signature" in path]


async def test_a_get_that_waited_for_a_thread_past_its_urls_expiry_gets_a_new_url(
    proxy: FaultProxy, store_factory: StoreFactory, short_urls: None
) -> None:
    # More concurrent ranged GETs than threads on a slow link: the second waits behind the
    # first longer than its URL stays valid.
    gets = 0

    async def slow_first_get(request: web.Request, body: bytes) -> web.StreamResponse | None:
        nonlocal gets
        if request.method == "GET" and "X-Amz-Signature" in request.query:
            gets += 1
            if gets == 1:  # answered in time, delivered slowly: holds the only thread
                status, headers, data = await proxy.forward(request, body)
                await asyncio.sleep(EXPIRY + 1)
                keep = ("Content-Range", "Content-Type", "ETag")
                return web.Response(
                    status=status, body=data, headers={k: v for k, v in headers if k in keep}
                )
        return None

    store = store_factory(endpoint=proxy.endpoint, direct_min=1, direct_threads=1)
    await store.put("packs/k", b"x" * 1000)
    proxy.rule = slow_first_get
    first, second = await asyncio.gather(store.get("packs/k", 0, 10), store.get("packs/k", 10, 10))
    assert first == second == b"x" * 10  # before: StoreAccessDenied (Request has expired)
    urls = _ranged_gets(proxy)
    assert len(urls) == 2 and urls[0] != urls[1]  # the second sent with a new URL only


async def test_a_kept_url_past_its_expiry_by_the_wall_clock_is_not_sent(
    proxy: FaultProxy, store_factory: StoreFactory, short_urls: None, monkeypatch
) -> None:
    # A suspend: the wall clock moved on, the monotonic one did not (so, here, the URL is
    # kept longer than it is valid, which is what a clock standing still amounts to).
    monkeypatch.setattr(s3mod, "_URL_REUSE", 600)
    store = store_factory(endpoint=proxy.endpoint, direct_min=1)
    await store.put("k", b"x" * 100)
    assert await store.get("k", 0, 10) == b"x" * 10
    await asyncio.sleep(EXPIRY - MARGIN + 0.5)
    assert await store.get("k", 10, 10) == b"x" * 10  # before: StoreAccessDenied
    urls = _ranged_gets(proxy)
    assert len(urls) == 2 and urls[0] != urls[1]  # the expired one was not sent


async def test_a_kept_url_the_server_refuses_is_signed_again_once(
    proxy: FaultProxy, store_factory: StoreFactory
) -> None:
    # The server's clock runs ahead of ours: it finds a kept URL expired that we do not.
    refusals = 0

    async def refuse(request: web.Request, body: bytes) -> web.StreamResponse | None:
        nonlocal refusals
        if request.method == "GET" and "X-Amz-Signature" in request.query and refusals:
            refusals -= 1
            return s3_error(403, "AccessDenied")
        return None

    store = store_factory(endpoint=proxy.endpoint, direct_min=1)
    await store.put("k", b"x" * 100)
    assert await store.get("k", 0, 10) == b"x" * 10  # its URL is kept
    await asyncio.sleep(1)  # a new URL differs (X-Amz-Date)
    proxy.rule, refusals = refuse, 1
    assert await store.get("k", 10, 10) == b"x" * 10  # before: StoreAccessDenied
    urls = _ranged_gets(proxy)
    assert len(urls) == 3 and urls[1] == urls[0] != urls[2]
    # A refusal of every URL is the refusal: one more request, not a loop; a new URL that
    # is refused is not signed again.
    refusals = 10
    with pytest.raises(StoreAccessDenied):
        await store.get("k", 20, 10)
    with pytest.raises(StoreAccessDenied):
        await store.get("other", 0, 10)
    assert len(_ranged_gets(proxy)) == 3 + 2 + 1


async def test_a_new_url_that_expires_before_it_is_sent_is_the_store_unavailable() -> None:
    getter = DirectGetter(1)
    try:
        with pytest.raises(UrlExpired) as info:
            await getter.get("http://127.0.0.1:9/b/k?X-Amz-Signature=x", 0, 10, deadline=1.0)
        assert isinstance(info.value, StoreUnavailable)  # retried, with a new URL
    finally:
        getter.close()
