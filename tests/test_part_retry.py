"""A multipart part, or the completion, that fails transiently is sent again on its own, not
the whole object; a completion whose answer was lost counts when the object proves to be there.

Faults are injected at the HTTP level by `FaultProxy` in front of the real SeaweedFS. The
store is mostly the one a site builds (`site.make_store`: `RetryingStore` over `S3Store`, one
retry policy for both), so the tests show the composition that runs, with its 64 MiB
multipart threshold and 8 MiB parts.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from datamover.config import parse_config
from datamover.embedded import EmbeddedSeaweed
from datamover.errors import (
    ObjectNotFound,
    StoreAccessDenied,
    StoreRetriesExhausted,
    StoreUnavailable,
)
from datamover.site import make_store
from datamover.storage.base import Store
from datamover.storage.body import crc32c
from datamover.storage.retry import RetryPolicy
from tests.fixtures_store import FaultProxy, StoreFactory, s3_error

MiB = 1 << 20
PART = 8 * MiB  # S3Store's default part size, which make_store keeps
SIZE = 64 * MiB  # make_store's multipart threshold: eight parts
FAILING = 3  # the part number the tests fail

#: What to do with an UploadPart request, given the request, its body, its part number and
#: which request of that part it is (1 for the first): an answer to send instead of
#: forwarding it, or None to forward it.
Fault = Callable[[web.Request, bytes, int, int], Awaitable[web.StreamResponse | None]]


#: What to do with a CompleteMultipartUpload request, given the request, its body and which
#: completion request of the test it is (1 for the first): as for `Fault`.
CompletionFault = Callable[[web.Request, bytes, int], Awaitable[web.StreamResponse | None]]


async def no_fault(request: web.Request, body: bytes, number: int, nth: int) -> None:
    return None


async def no_completion_fault(request: web.Request, body: bytes, nth: int) -> None:
    return None


@dataclass
class Uploads:
    """Counts the multipart requests `proxy` sees and lets `fault` answer UploadParts and
    `completion` answer CompleteMultipartUploads."""

    proxy: FaultProxy
    fault: Fault = no_fault
    completion: CompletionFault = no_completion_fault
    creates: int = 0
    completes: int = 0
    aborts: int = 0
    sent: Counter[int] = field(default_factory=Counter)  # UploadPart requests by part number
    sent_bytes: int = 0  # UploadPart bodies
    bad_checksums: list[int] = field(default_factory=list)  # parts whose CRC32C header lied

    def __post_init__(self) -> None:
        self.proxy.rule = self.rule

    async def rule(self, request: web.Request, body: bytes) -> web.StreamResponse | None:
        if request.method == "POST" and "uploads" in request.query:
            self.creates += 1
        if request.method == "DELETE" and "uploadId" in request.query:
            self.aborts += 1
        if request.method == "POST" and "uploadId" in request.query:
            self.completes += 1
            return await self.completion(request, body, self.completes)
        if request.method != "PUT" or "partNumber" not in request.query:
            return None
        number = int(request.query["partNumber"])
        self.sent[number] += 1
        self.sent_bytes += len(body)
        if request.headers.get("x-amz-checksum-crc32c") != crc32c(body):
            self.bad_checksums.append(number)
        return await self.fault(request, body, number, self.sent[number])


def answer(status: int, code: str, tries: int | None = None) -> Fault:
    """Answer the first `tries` requests of part `FAILING` (every one if None) with an S3
    error, forward the rest."""

    async def fault(
        request: web.Request, body: bytes, number: int, nth: int
    ) -> web.Response | None:
        if number == FAILING and (tries is None or nth <= tries):
            return s3_error(status, code)
        return None

    return fault


def store_then_fail(proxy: FaultProxy) -> Fault:
    """Store the first request of part `FAILING`, then answer it with a gateway timeout: the
    part is on the server, the client sees a failure and sends it again, which overwrites it.
    (A connection dropped instead would not do: aiohttp itself sends a PUT again once when a
    kept-alive connection closes under it.)"""

    async def fault(
        request: web.Request, body: bytes, number: int, nth: int
    ) -> web.Response | None:
        if (number, nth) != (FAILING, 1):
            return None
        await proxy.forward(request, body)
        return s3_error(504, "GatewayTimeout")

    return fault


def refuse_completion(status: int, code: str, tries: int | None = None) -> CompletionFault:
    """Answer the first `tries` completions (every one if None) with an S3 error without
    forwarding them: the upload stays incomplete."""

    async def fault(request: web.Request, body: bytes, nth: int) -> web.Response | None:
        if tries is None or nth <= tries:
            return s3_error(status, code)
        return None

    return fault


def lose_completion_answer(
    proxy: FaultProxy, status: int, code: str, later: str
) -> CompletionFault:
    """Forward the first completion (the server completes the upload) and answer it with an
    S3 error instead of the server's answer. Later completions: `replayed` are forwarded
    (SeaweedFS answers 200 to a completion of an upload whose object it holds), `forgotten`
    are answered NoSuchUpload (a server that forgets a completed upload), `lost` are
    forwarded and their answers replaced too."""

    async def fault(request: web.Request, body: bytes, nth: int) -> web.Response | None:
        if nth == 1 or later == "lost":
            await proxy.forward(request, body)
            return s3_error(status, code)
        if later == "forgotten":
            return s3_error(404, "NoSuchUpload")
        return None

    return fault


def site_store(tmp_path: Path, seaweed: EmbeddedSeaweed, endpoint: str, bucket: str) -> Store:
    """The store `datamover` builds for a site on `bucket` at `endpoint`, 3 tries a call."""
    config = parse_config(
        {
            "site": {"name": "a", "state_dir": str(tmp_path / "state")},
            "store": {
                "endpoint": endpoint,
                "bucket": bucket,
                "access_key": seaweed.access_key,
                "secret_key": seaweed.secret_key,
                "retry_attempts": 3,
            },
        },
        "test.toml",
        env={},
    )
    return make_store(config)


@pytest.fixture
async def store(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, tmp_path: Path
) -> AsyncIterator[Store]:
    """`site_store` in front of `proxy`, closed after the test."""
    made = site_store(tmp_path, seaweed, proxy.endpoint, bucket)
    yield made
    await made.close()


def no_uploads_left(seaweed: EmbeddedSeaweed, bucket: str) -> bool:
    return not seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def stored(seaweed: EmbeddedSeaweed, bucket: str, key: str) -> bytes:
    data: bytes = seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


@pytest.mark.parametrize("where", ["refused", "stored-then-failed"])
async def test_a_part_failing_once_is_sent_again_alone(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store, where: str
) -> None:
    # Before: the upload was aborted and RetryingStore ran the whole put again, sending all
    # eight parts (64 MiB) a second time for one failed 8 MiB part.
    fault = answer(503, "SlowDown", 1) if where == "refused" else store_then_fail(proxy)
    uploads = Uploads(proxy, fault)
    data = os.urandom(SIZE)
    await store.put("big", data)
    assert uploads.creates == 1, "one multipart upload, not a second put"
    assert uploads.sent == {n: 2 if n == FAILING else 1 for n in range(1, 9)}
    assert uploads.sent_bytes == SIZE + PART
    assert uploads.bad_checksums == []
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)


async def test_a_part_failing_every_time_ends_the_put_after_the_documented_tries(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    # Before: the failing part was sent 3 times (once per run of the whole put) and every
    # other part up to 3 times with it.
    uploads = Uploads(proxy, answer(500, "InternalError"))
    with pytest.raises(StoreRetriesExhausted) as err:
        await store.put("big", os.urandom(SIZE))
    assert str(err.value) == (
        f"gave up on part 3 of 'big' after 3 tries: S3 endpoint {proxy.endpoint} failed "
        "UploadPart on 'big': InternalError (HTTP 500)"
    )
    assert isinstance(err.value, StoreUnavailable)  # a later transfer attempt may succeed
    with pytest.raises(ObjectNotFound):
        await store.head("big")
    assert uploads.sent[FAILING] == 3, "[store] retry_attempts tries of the part"
    assert uploads.creates == 1, "RetryingStore did not run the whole put again"
    assert max(n for part, n in uploads.sent.items() if part != FAILING) <= 1
    assert no_uploads_left(seaweed, bucket)


async def test_a_part_refused_for_good_ends_the_put_at_once(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    uploads = Uploads(proxy, answer(403, "AccessDenied"))
    with pytest.raises(StoreAccessDenied):
        await store.put("big", os.urandom(SIZE))
    assert uploads.sent[FAILING] == 1
    assert uploads.creates == 1
    assert no_uploads_left(seaweed, bucket)


async def test_a_vanished_upload_is_not_retried_part_by_part_but_put_afresh(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    # NoSuchUpload: no part of that upload can be sent again, but a new upload can succeed.
    uploads = Uploads(proxy, answer(404, "NoSuchUpload", 1))
    data = os.urandom(SIZE)
    await store.put("big", data)
    assert uploads.creates == 2, "the part was not sent again into the lost upload"
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)


async def test_a_put_cancelled_while_a_part_waits_to_be_retried_aborts_the_upload(
    proxy: FaultProxy, store_factory: StoreFactory, seaweed: EmbeddedSeaweed, bucket: str
) -> None:
    failed = asyncio.Event()
    refuse = answer(503, "SlowDown")

    async def fault(
        request: web.Request, body: bytes, number: int, nth: int
    ) -> web.Response | None:
        if number == FAILING:
            failed.set()
        return await refuse(request, body, number, nth)

    uploads = Uploads(proxy, fault)
    store = store_factory(
        endpoint=proxy.endpoint,
        multipart_threshold=6 * MiB,
        multipart_chunk=5 * MiB,
        retry_part=RetryPolicy(attempts=5, initial=60, maximum=60),
    )
    put = asyncio.create_task(store.put("big", os.urandom(25 * MiB)))
    await asyncio.wait_for(failed.wait(), 30)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    assert uploads.sent[FAILING] == 1, "cancelled during the pause before the next try"
    assert no_uploads_left(seaweed, bucket)


@pytest.mark.parametrize("ends", ["refused", "out-of-tries"])
async def test_no_part_is_sent_after_the_upload_is_aborted(
    proxy: FaultProxy,
    store_factory: StoreFactory,
    seaweed: EmbeddedSeaweed,
    bucket: str,
    ends: str,
) -> None:
    """One part fails for good while another waits to be tried again: the waiting one is
    cancelled before the abort, and sends nothing into the aborted upload (requests in
    the order their headers arrived: a part's 5 MiB body may be read after the abort)."""

    async def rule(request: web.Request, body: bytes) -> web.StreamResponse | None:
        query = request.query
        if request.method == "PUT" and "partNumber" in query:
            number = int(query["partNumber"])
            if number == 2:  # always slow down: waits between its tries
                return s3_error(503, "SlowDown")
            if number == 3:  # fails for good a little later
                await asyncio.sleep(0.4)
                return (
                    s3_error(403, "AccessDenied")
                    if ends == "refused"
                    else s3_error(500, "InternalError")
                )
        return None

    proxy.rule = rule
    store = store_factory(
        endpoint=proxy.endpoint,
        multipart_threshold=6 * MiB,
        multipart_chunk=5 * MiB,
        # Refused: part 2 must still be trying when part 3 is refused (0.4 s), so it gets
        # tries enough; else whichever part runs out of its four tries first ends the put.
        retry_part=RetryPolicy(attempts=40 if ends == "refused" else 4, initial=0.25, maximum=0.25),
    )
    expected = StoreAccessDenied if ends == "refused" else StoreRetriesExhausted
    with pytest.raises(expected):
        await store.put("big", os.urandom(25 * MiB))
    await asyncio.sleep(1.0)  # longer than a retry's pause: a stray try would arrive now
    kinds = [
        "abort" if method == "DELETE" else "part" if "partNumber" in path else "other"
        for method, path in proxy.arrived
    ]
    assert kinds.count("abort") == 1
    assert "part" not in kinds[kinds.index("abort") :], kinds
    assert no_uploads_left(seaweed, bucket)


async def test_a_completion_failing_once_is_sent_again_alone(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    # Before: the upload was aborted and RetryingStore ran the whole put again, sending all
    # eight parts a second time because the last request of the put failed.
    uploads = Uploads(proxy, completion=refuse_completion(503, "SlowDown", 1))
    data = os.urandom(SIZE)
    await store.put("big", data)
    assert uploads.creates == 1, "one multipart upload, not a second put"
    assert uploads.sent == {n: 1 for n in range(1, 9)}, "no part sent again"
    assert (uploads.completes, uploads.aborts) == (2, 0)
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)


@pytest.mark.parametrize("later", ["replayed", "forgotten", "lost"])
@pytest.mark.parametrize(("status", "code"), [(504, "GatewayTimeout"), (503, "SlowDown")])
async def test_a_completion_whose_answer_was_lost_is_done_when_the_object_is_there(
    proxy: FaultProxy,
    seaweed: EmbeddedSeaweed,
    bucket: str,
    store: Store,
    status: int,
    code: str,
    later: str,
) -> None:
    """The server completed the upload; its answer was lost. A completion sent again is
    answered 200 (SeaweedFS), NoSuchUpload (a server that forgot the upload: the object at
    the key has this upload's multipart ETag and size), or not at all (every try lost: the
    same proof after the last). Either way no part is sent again, and nothing is aborted
    but where the server itself refused every try (503, lost): the key could hold the
    object from an earlier put of the same bytes with this upload never completed, so it
    is aborted, which leaves the completed object as it is (checked below)."""
    # Before: the upload was aborted (harmless: the object was complete) and RetryingStore
    # put the whole object again.
    uploads = Uploads(proxy, completion=lose_completion_answer(proxy, status, code, later))
    data = os.urandom(SIZE)
    await store.put("big", data)
    assert uploads.creates == 1, "one multipart upload, not a second put"
    assert uploads.sent == {n: 1 for n in range(1, 9)}, "no part sent again"
    assert uploads.completes == (3 if later == "lost" else 2)
    assert uploads.aborts == (1 if (status, later) == (503, "lost") else 0)
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)


async def test_a_refused_completion_of_an_object_the_key_holds_already_leaves_no_upload(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    """The key holds these very bytes from an earlier put (a rerun's pack put again) and the
    server refuses every completion of the new upload: the HEAD proves the object, so the
    put is done, and the upload, never completed, is aborted."""
    data = os.urandom(SIZE)
    await store.put("big", data)
    uploads = Uploads(proxy, completion=refuse_completion(500, "InternalError"))
    await store.put("big", data)
    assert (uploads.creates, uploads.completes) == (1, 3)
    # Before: no abort; the parts stayed on the server for good (SeaweedFS's lifecycle
    # rule was not seen to remove them).
    assert uploads.aborts == 1
    assert no_uploads_left(seaweed, bucket)
    assert stored(seaweed, bucket, "big") == data


@pytest.mark.parametrize("case", ["never-completed", "overwritten"])
async def test_a_lost_upload_whose_object_is_not_there_is_put_afresh(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store, case: str
) -> None:
    """NoSuchUpload to a completion sent again counts as done only if the key holds this
    upload's object: not when the first completion never reached the server, nor when
    another writer replaced the object since (SeaweedFS itself then answers NoSuchUpload)."""

    async def fault(request: web.Request, body: bytes, nth: int) -> web.Response | None:
        if nth == 1 and case == "never-completed":
            return s3_error(503, "SlowDown")
        if nth == 2 and case == "never-completed":
            return s3_error(404, "NoSuchUpload")
        if nth == 1:  # overwritten: completed, then replaced before the answer
            await proxy.forward(request, body)
            client = seaweed.client()
            await asyncio.to_thread(client.put_object, Bucket=bucket, Key="big", Body=b"other")
            return s3_error(504, "GatewayTimeout")
        return None

    uploads = Uploads(proxy, completion=fault)
    data = os.urandom(SIZE)
    await store.put("big", data)
    assert uploads.creates == 2, "UploadLost: RetryingStore put the object afresh"
    assert uploads.completes == 3
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)


async def test_a_completion_failing_every_time_ends_the_put_after_the_documented_tries(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    # Before: each failed completion aborted the upload and RetryingStore ran the whole put
    # again, 3 uploads of all eight parts.
    uploads = Uploads(proxy, completion=refuse_completion(500, "InternalError"))
    with pytest.raises(StoreRetriesExhausted) as err:
        await store.put("big", os.urandom(SIZE))
    assert str(err.value) == (
        f"gave up on completion of 'big' after 3 tries: S3 endpoint {proxy.endpoint} "
        "failed CompleteMultipartUpload on 'big': InternalError (HTTP 500)"
    )
    with pytest.raises(ObjectNotFound):
        await store.head("big")
    assert uploads.completes == 3, "[store] retry_attempts tries of the completion"
    assert uploads.creates == 1, "RetryingStore did not run the whole put again"
    assert uploads.sent == {n: 1 for n in range(1, 9)}
    assert uploads.aborts == 1
    assert no_uploads_left(seaweed, bucket)


async def test_an_upload_whose_completion_may_still_run_is_not_aborted(
    proxy: FaultProxy, seaweed: EmbeddedSeaweed, bucket: str, store: Store
) -> None:
    """A gateway's 504 says it stopped waiting, not that the server did: an abort could
    race a completion still running. The upload is left to the bucket's lifecycle rule."""
    uploads = Uploads(proxy, completion=refuse_completion(504, "GatewayTimeout"))
    with pytest.raises(StoreRetriesExhausted):
        await store.put("big", os.urandom(SIZE))
    assert (uploads.creates, uploads.completes, uploads.aborts) == (1, 3, 0)
    assert not no_uploads_left(seaweed, bucket)


async def test_a_put_cancelled_during_its_completion_does_not_abort_the_upload(
    proxy: FaultProxy, store_factory: StoreFactory, seaweed: EmbeddedSeaweed, bucket: str
) -> None:
    """The completion reaches the server after the put was cancelled (a daemon draining):
    an abort sent at the cancellation would have removed the upload under it."""
    arrived, forwarded = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request, body: bytes, nth: int) -> web.Response | None:
        arrived.set()
        await asyncio.sleep(0.5)  # an abort sent at the cancellation arrives meanwhile
        status, _headers, answer = await proxy.forward(request, body)
        forwarded.set()
        return web.Response(status=status, body=answer)

    uploads = Uploads(proxy, completion=slow)
    data = os.urandom(25 * MiB)
    store = store_factory(
        endpoint=proxy.endpoint,
        multipart_threshold=6 * MiB,
        multipart_chunk=5 * MiB,
        retry_part=RetryPolicy(attempts=3, initial=0.01, maximum=0.01),
    )
    put = asyncio.create_task(store.put("big", data))
    await asyncio.wait_for(arrived.wait(), 30)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    await asyncio.wait_for(forwarded.wait(), 30)
    assert uploads.aborts == 0
    assert stored(seaweed, bucket, "big") == data
    assert no_uploads_left(seaweed, bucket)
