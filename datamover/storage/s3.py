"""`S3Store`: the Store on an S3-compatible server (AWS, SeaweedFS, MinIO, Ceph) via aiobotocore.

The driver stays plain: one request per call (no retries here; `RetryingStore` wraps it), and
every failure goes through one function, `_map_error`, that turns it into the error the caller
acts on (`ObjectNotFound`, `BucketNotFound`, `StoreAccessDenied`, `StoreUnavailable`). The one
exception: a multipart upload (s3_multipart.py) retries a failed part, and its completion, on
its own, with the `RetryStep` it was given (`retry_part`), so a fault costs that step again,
not every part of the object.

Two things it does that a naive driver would not:

- Listing walks the key space one `/`-level at a time (`Delimiter="/"`) and merges each
  level's objects and sub-prefixes into UTF-8 byte order itself. SeaweedFS lists in directory
  order (`a`, `a/b`, `a-b`, `a.b`), not S3's byte order (`a`, `a-b`, `a.b`, `a/b`); the walk
  gives byte order on both kinds of server, streaming, at the cost of one request per prefix.
- Uploads carry a CRC32C checksum header (`x-amz-checksum-crc32c`, computed here off the
  event loop, the body sent without copies: body.py), which the server checks, so
  a body damaged in transit is refused instead of stored. The payload itself is not signed
  (`UNSIGNED-PAYLOAD`): SeaweedFS does not verify the signed SHA-256, and hashing every byte
  with SHA-256 (or MD5 for Content-MD5, ~300 MB/s here) would cost more CPU than the upload;
  CRC32C runs at about 12 GB/s with the CPU's CRC instruction. Every chunk is verified end
  to end against its BLAKE3 digest on stage.
- Large ranged GETs (`direct_min` bytes and up) do not go through aiohttp: they run as plain
  HTTP requests of presigned URLs on threads (direct.py), because one event loop cannot
  receive faster than about 500 MB/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import aiohttp
import botocore.exceptions as bce
import botocore.handlers
import botocore.loaders
import botocore.parsers
from aiobotocore.session import AioSession
from botocore.config import Config as BotoConfig

from datamover.aio import drain
from datamover.errors import (
    BucketNotFound,
    DatamoverError,
    InvalidInput,
    ObjectNotFound,
    PermanentError,
    StoreAccessDenied,
    StoreUnavailable,
    UploadLost,
)
from datamover.storage.base import (
    HOLD,
    ByteSink,
    ObjectInfo,
    RetryStep,
    SinkFailed,
    check_key,
    check_prefix,
    check_range,
    passed,
    read_into,
    start_key,
)
from datamover.storage.body import Body, checksum
from datamover.storage.direct import (
    DirectGetter,
    UnknownEnd,
    Unstreamable,
    UrlExpired,
    cut_short,
    proxied,
    range_mismatch,
    range_overrun,
)
from datamover.storage.s3_loader import loader_for
from datamover.storage.s3_multipart import MIN_PART, MultipartUploader, http_status
from datamover.storage.s3_settings import check_endpoint, check_key_setting

log = logging.getLogger(__name__)

MiB = 1 << 20
_URL_EXPIRY = 900  # seconds a presigned URL for a direct GET is valid
_URL_REUSE = 600  # seconds one is reused: a GET waiting for a thread still has time to start
_URL_MARGIN = 60  # seconds before its expiry a URL is no longer sent (`_direct_get`)
_URL_CACHE = 256

_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "403",
}
_TRANSIENT = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    # The body arrived damaged (checked against the signed payload hash): send it again.
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}
#: What botocore accepts as a bucket name (servers are stricter, each in its own way: Ceph
#: RGW with relaxed names takes `_archive`), but not one of dots only: `.` and `..` pass
#: botocore, and then name the bucket's parent in a path-style URL.
_BUCKET = re.compile(r"(?!\.+\Z)[a-zA-Z0-9.\-_]{1,255}")
_CONNECTION = (
    bce.ConnectionError,  # refused, DNS, connect timeout, proxy
    bce.HTTPClientError,  # read timeout, connection closed, broken stream
    bce.IncompleteReadError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
    ConnectionError,
)


def _shared_loader(session: AioSession) -> botocore.loaders.Loader:
    """One botocore data loader per search path for the whole process (`s3_loader`)."""
    return loader_for(session.get_config_variable("data_path"))


class S3Store:
    """A Store on one bucket of an S3-compatible server.

    `endpoint` is the server's URL (`http://127.0.0.1:8333`), or None for AWS itself. With
    `access_key`/`secret_key` None, botocore's usual sources apply (`AWS_*` variables, config
    files, instance roles). Objects of `multipart_threshold` bytes or more are uploaded in parts
    of `multipart_chunk` bytes (at least 5 MiB), `multipart_concurrency` parts at a time.
    A part that fails is sent again on its own by `retry_part` (the stack's retry policy),
    into the same upload under the same number, which overwrites, and so is a failed
    completion; with None either fails the put. A failed put aborts its upload, unless a
    completion of it may still be running (see s3_multipart.py).
    Ranged GETs of `direct_min` bytes or more run on `direct_threads` threads with plain
    HTTP (direct.py), not on the event loop; `direct_threads=0` keeps every GET on aiohttp.
    The client is created on first use inside the running event loop; `close` releases it.
    """

    def __init__(
        self,
        endpoint: str | None,
        bucket: str,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        session_token: str | None = None,
        max_connections: int = 64,
        multipart_threshold: int = 16 * MiB,
        multipart_chunk: int = 8 * MiB,
        multipart_concurrency: int = 4,
        retry_part: RetryStep | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        direct_min: int = 4 * MiB,
        direct_threads: int = 8,
    ) -> None:
        if not bucket:
            raise InvalidInput("S3 store needs a bucket name")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidInput(
                f"S3 bucket name {bucket!r} is not valid: use 1-255 letters, digits, '.', '-', "
                "'_', not dots alone"
            )
        if endpoint is not None:
            check_endpoint(endpoint, "S3 endpoint")
        check_key_setting(access_key or "", "S3 access key")
        check_key_setting(secret_key or "", "S3 secret key")
        check_key_setting(session_token or "", "S3 session token")
        if multipart_chunk < MIN_PART:
            raise InvalidInput(
                f"multipart_chunk {multipart_chunk} is below S3's minimum {MIN_PART}"
            )
        if multipart_threshold < 1 or max_connections < 1 or multipart_concurrency < 1:
            raise InvalidInput("multipart_threshold, max_connections and concurrency must be >= 1")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.where = endpoint or f"AWS {region}"
        self.description = f"s3://{bucket} at {self.where}"
        self._access_key = access_key
        self._secret_key = secret_key
        self._session_token = session_token
        self._threshold = multipart_threshold
        self._chunk = multipart_chunk
        self._part_concurrency = multipart_concurrency
        self._retry_part = retry_part
        self._config = BotoConfig(
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            signature_version="s3v4",  # presigned URLs too (botocore would sign those with V2)
            # One attempt per request: retrying is RetryingStore's job (and `retry_part`'s),
            # and botocore's own retries would multiply with it. (`max_attempts` counts
            # retries, not attempts.)
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_required",
        )
        self._direct_min = direct_min
        self._direct_threads = direct_threads
        self._direct: DirectGetter | None = None  # made with the client, unless proxied
        self._urls: dict[str, tuple[str, float]] = {}  # key: (URL, when signed: time.time())
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    # -- the Store interface -------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """PutObject below the multipart threshold, else a multipart upload: a part or the
        completion that fails transiently is sent again by `retry_part`; the upload is
        aborted on a failure of the put (and on cancellation), so no parts are left behind to
        be billed, unless a completion of it may still be running. A part or completion that
        fails every try raises `StoreRetriesExhausted`; an upload that vanished raises
        `UploadLost`. A completion that fails is no failure of the put if the key proves to
        hold the object the upload made (a completion whose answer was lost)."""
        check_key(key)
        view = memoryview(data).cast("B")
        if len(view) < self._threshold:
            await self._call(
                "PutObject", key, Key=key, Body=Body(view), ChecksumCRC32C=await checksum(view)
            )
        else:
            # Made per put, not kept: it holds `_call`, and so the store (no reference cycle).
            uploader = MultipartUploader(
                self._call, self._retry_part, self._chunk, self._part_concurrency, self.description
            )
            await uploader.put(key, view)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """GetObject, with a `Range` header for a range. `length=0` returns b"" without a
        request (so even for a missing key); a range starting at or after the end returns b""
        (S3 answers 416 InvalidRange there). A range answered short anywhere but at the
        object's end (as its Content-Range shows, or for a whole object whose body only the
        connection's close ends, a HEAD: `_at_end`) is `StoreUnavailable`, never short data.
        A GET of `length` bytes holds at most those of the body, whatever the server sends
        (`_read_range`); one without a length holds what the object (or its rest) holds."""
        check_key(key)
        check_range(offset, length)
        if length == 0:
            return b""
        if length is not None and length >= self._direct_min:
            async with self._errors("GetObject", key):
                await self._get_client()
                if self._direct is not None:
                    try:
                        return await self._direct_get(self._direct, key, offset, length)
                    except UnknownEnd as ended:
                        return await self._at_end(key, offset, length, ended.data, ended.received)
        extra: dict[str, str] = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            extra["Range"] = f"bytes={offset}-{end}"
        async with self._errors("GetObject", key):
            client = await self._get_client()
            try:
                resp = await client.get_object(Bucket=self.bucket, Key=key, **extra)
            except bce.ClientError as exc:
                if _code(exc) == "InvalidRange" or http_status(exc) == 416:
                    return b""
                raise
            # Leaving the block closes the body: one not read to its end closes its
            # connection (aiohttp returns only connections read to the end to the pool).
            async with resp["Body"] as body:
                if not extra:
                    data: bytes = await body.read()
                    return data
                return await self._read_range(resp, key, offset, length)
        raise AssertionError("unreachable")  # _errors always raises or returns above

    async def _read_range(
        self, resp: dict[str, Any], key: str, offset: int, length: int | None
    ) -> bytes:
        """The range asked for from the body of ranged GetObject answer `resp`.

        Of a 200 without Content-Range (a server or proxy that ignored Range sends the whole
        object) the bytes before `offset` are dropped as they arrive and the range is kept,
        cut at the object's end; the rest is left unread. One whose body has neither a
        Content-Length nor chunked encoding (it ends where the connection closes) and ends
        before the range does is returned only where the object ends there (`_at_end`). A 206
        whose Content-Length exceeds `length` is refused unread, one without (chunked) once
        it runs past `length` bytes: `StoreUnavailable`, like any answer that is not the
        range (`range_mismatch`).
        """
        body = resp["Body"]
        if "ContentRange" not in resp:
            received = await _skip(body, offset)
            data = await _read_at_most(body, length)
            received += len(data)
            if length is not None and len(data) < length and _close_delimited(resp):
                return await self._at_end(key, offset, length, data, received)
            return data
        declared = resp.get("ContentLength")
        if length is not None and declared is not None and declared > length:
            self._refuse_range(range_overrun(offset, length, declared), key)
        data = await _read_at_most(body, None if length is None else length + 1)
        if length is not None and len(data) > length:
            self._refuse_range(range_overrun(offset, length), key)
        problem = range_mismatch(resp["ContentRange"], offset, length, len(data))
        if problem is not None:
            self._refuse_range(problem, key)
        return data

    async def _at_end(
        self, key: str, offset: int, length: int, data: bytes, received: int
    ) -> bytes:
        """`data`, the part in the `length`-byte range at `offset` of a 200 answer (the whole
        object) whose body only the connection's close ended, after `received` bytes, before
        the range did, if that was the object's end: the object (HEAD) holds `received`
        bytes. Else the connection was cut short: `StoreUnavailable`, retried.

        A close-delimited body cannot tell a cut connection from the object's end by
        itself, and a `Repository` reads every version document and manifest object one
        byte past its end, so through a server or proxy that ignores Range and sends such
        bodies every one of those reads ends inside its range. A HEAD that fails raises its
        error (`ObjectNotFound` for an object deleted meanwhile)."""
        size = (await self.head(key)).size
        if size != received:
            self._refuse_range(cut_short(offset, length, received, size), key)
        return data

    def _refuse_range(self, problem: str, key: str) -> NoReturn:
        """Raise `StoreUnavailable` for a GetObject of `key` answered with something other
        than the range (transient: a proxy or server at fault may answer right next time)."""
        raise StoreUnavailable(f"S3 endpoint {self.where} {problem} during GetObject of {key!r}")

    async def head(self, key: str) -> ObjectInfo:
        """HeadObject. A HEAD has no body, so a missing bucket also reads as `ObjectNotFound`
        here; `check` tells the two apart."""
        check_key(key)
        resp = await self._call("HeadObject", key, Key=key)
        return ObjectInfo(key, int(resp["ContentLength"]))

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield objects under `prefix` after `start_after` in UTF-8 byte order of their keys,
        page by page.

        Holds at most one page (1000 entries) per level of `/` depth, plus the few
        sub-prefixes of a level still waiting for their place in the order. Each level that
        `start_after` lies under is listed from its part of it on (`StartAfter`); levels
        wholly before it are not listed at all.
        """
        after = start_key(start_after)
        if not check_prefix(prefix):
            return  # SeaweedFS would list `q/...` for `/q` or `./q`
        if after and passed(prefix.encode(), after, subtree=True):
            return
        last = b""
        async with contextlib.aclosing(self._walk(prefix, after)) as walk:
            async for info in walk:
                # The walk's ordering relies on the server sorting each level; refuse to hand
                # out a wrong order (callers merge listings with sorted sequences).
                this = info.key.encode()
                if this <= last:
                    raise PermanentError(
                        f"{self.description} listed {info.key!r} out of order; cannot list it"
                    )
                last = this
                yield info

    async def delete(self, key: str) -> None:
        """DeleteObject; S3 answers a missing key with success."""
        check_key(key)
        await self._call("DeleteObject", key, Key=key)

    async def check(self) -> None:
        """HeadBucket: proves the endpoint answers, the credentials work and the bucket exists."""
        await self._call("HeadBucket", None)

    async def close(self) -> None:
        """Close the client and its connections. Idempotent; a later call reopens lazily."""
        stack, self._stack, self._client = self._stack, None, None
        direct, self._direct = self._direct, None
        if direct is not None:
            await asyncio.to_thread(direct.close)
        if stack is not None:
            await stack.aclose()

    # -- requests ------------------------------------------------------------------------

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    stack = contextlib.AsyncExitStack()
                    session = AioSession()
                    try:
                        # botocore reads the AWS config file and the profile lazily, here first.
                        session.register_component("data_loader", _shared_loader(session))
                        self._client = await stack.enter_async_context(
                            session.create_client(
                                "s3",
                                endpoint_url=self.endpoint,
                                region_name=self.region,
                                aws_access_key_id=self._access_key,
                                aws_secret_access_key=self._secret_key,
                                aws_session_token=self._session_token,
                                config=self._config,
                                verify=_verify(self.endpoint),
                            )
                        )
                    except (bce.BotoCoreError, ValueError) as exc:
                        # A region botocore refuses, an AWS profile that does not exist, a
                        # malformed AWS config file: settings, not faults of the store.
                        raise InvalidInput(
                            f"cannot set up an S3 client for {self.description} "
                            f"(region {self.region!r}): {_first_line(exc)}"
                        ) from exc
                    self._stack = stack
                    _customise(self._client)
                    # Large ranges go to threads (direct.py), except where the environment
                    # routes the endpoint through a proxy: botocore's stack honours that.
                    if self._direct_threads and not proxied(self._client.meta.endpoint_url):
                        self._direct = DirectGetter(
                            self._direct_threads,
                            ca_bundle=session.get_config_variable("ca_bundle"),
                            connect_timeout=self._config.connect_timeout,
                            read_timeout=self._config.read_timeout,
                        )
        return self._client

    async def get_into(
        self, key: str, offset: int, length: int, sink: ByteSink, hold: int = HOLD
    ) -> int:
        """Stream the range into `sink` (`base.get_into`): a range of `direct_min` bytes or
        more on the getter's threads as it arrives (`DirectGetter.stream`), anything else,
        and any answer that getter does not stream, with `get`s of at most `hold` bytes
        (`read_into`). `SinkFailed` from the stream is raised as the sink's own exception."""
        check_key(key)
        check_range(offset, length)
        if length == 0:
            return 0
        if length >= self._direct_min:
            try:
                async with self._errors("GetObject", key):
                    await self._get_client()
                    if self._direct is not None:
                        try:
                            got: int = await self._direct_get(
                                self._direct, key, offset, length, sink
                            )
                            return got
                        except Unstreamable:
                            pass
            except SinkFailed as failed:
                raise failed.error from None
        return await read_into(self.get, key, offset, length, sink, hold)

    async def _direct_get(
        self, direct: DirectGetter, key: str, offset: int, length: int, sink: ByteSink | None = None
    ) -> Any:
        """A ranged GET of `key` on `direct`'s threads with a presigned URL (`_presigned`).

        A URL is not sent within `_URL_MARGIN` seconds of its expiry, by the wall clock
        (the server's): a GET that waited that long for a thread, or one handed a kept URL
        after the machine slept (the monotonic clock stands still in a suspend), gets a new
        URL and is sent once more. So is one whose kept URL the server refused (403: its
        clock may run ahead of ours); a new URL refused is the refusal. A new URL that
        expires before it is sent too raises `UrlExpired` (`StoreUnavailable`). With `sink`
        the range is streamed into it (`DirectGetter.stream`): both reasons to send again
        come before the body, so no byte reaches the sink twice."""

        def send(url: str, deadline: float) -> Awaitable[Any]:
            if sink is None:
                return direct.get(url, offset, length, deadline)
            return direct.stream(url, offset, length, sink, deadline)

        url, deadline, kept = await self._presigned(key)
        try:
            return await send(url, deadline)
        except UrlExpired:
            self._forget_url(key, url)
        except bce.ClientError as exc:
            if not kept or http_status(exc) != 403:
                raise
            self._forget_url(key, url)
            log.info("a kept presigned URL of %r was refused (%s): signing a new one", key, exc)
        url, deadline, _ = await self._presigned(key)
        try:
            return await send(url, deadline)
        except UrlExpired:
            self._forget_url(key, url)
            raise

    async def _presigned(self, key: str) -> tuple[str, float, bool]:
        """A presigned GetObject URL for `key`, the wall-clock time (`time.time()`) after
        which it is not to be sent (`_URL_MARGIN` before its expiry), and whether it was
        kept from before. Ranges are not part of the signature, so one URL serves every
        range of an object: URLs are kept for `_URL_REUSE` seconds (of `_URL_EXPIRY`) by the
        wall clock, the most recent `_URL_CACHE` keys."""
        now = time.time()
        hit = self._urls.get(key)
        if hit is not None and hit[1] <= now < hit[1] + _URL_REUSE:
            return hit[0], hit[1] + _URL_EXPIRY - _URL_MARGIN, True
        # Signed at this second or later: its X-Amz-Date, whole seconds, is no earlier.
        minted = float(math.floor(now))
        url: str = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=_URL_EXPIRY
        )
        self._urls.pop(key, None)
        if len(self._urls) >= _URL_CACHE:
            self._urls.pop(next(iter(self._urls)))
        self._urls[key] = (url, minted)
        return url, minted + _URL_EXPIRY - _URL_MARGIN, False

    def _forget_url(self, key: str, url: str) -> None:
        """Drop `key`'s kept URL if it is `url` (not one signed since)."""
        hit = self._urls.get(key)
        if hit is not None and hit[0] == url:
            del self._urls[key]

    async def _call(self, op: str, key: str | None, **kwargs: Any) -> dict[str, Any]:
        """One request: `op` is the S3 operation name (`PutObject`), used in messages. One
        that sends a `Body` is watched while it does (`_watched`)."""
        async with self._errors(op, key):
            client = await self._get_client()
            method: Callable[..., Awaitable[dict[str, Any]]] = getattr(client, _snake(op))
            body = kwargs.get("Body")
            if isinstance(body, Body):
                return await self._watched(method(Bucket=self.bucket, **kwargs), body, op, key)
            answer = await method(Bucket=self.bucket, **kwargs)
            if op == "ListObjectsV2" and "IsTruncated" not in answer:
                # Every S3 listing says whether it goes on. A web page answered 200 (a
                # console or login portal at the endpoint's port) parses as XML too, and
                # was an empty bucket: `ls` listed nothing, a stage found no version.
                raise PermanentError(
                    f"S3 endpoint {self.where} answered {op} with something that is not an "
                    "S3 listing: is [store] endpoint the server's S3 port?"
                )
            return answer
        raise AssertionError("unreachable")  # _errors always raises or returns above

    async def _watched(
        self, request: Awaitable[dict[str, Any]], body: Body, op: str, key: str | None
    ) -> dict[str, Any]:
        """`await request`, a request sending `body`, but `StoreUnavailable` (transient:
        the retry policy sends it again) once the socket has taken none of the body for
        `read_timeout` seconds after its sending began. aiohttp times no part of sending a
        body: a server that stops reading (stopped, hung, a full disk behind a proxy) would
        hold the upload for ever. Before the sending begins the request waits for a
        connection of the pool (behind other transfers' requests: not a stall) or for one
        to connect (`connect_timeout`); once the body is out, for the answer (aiohttp's
        read timeout). Botocore's `Expect: 100-continue` is not sent (`_customise`): its
        wait, too, was timed by nothing."""
        idle = float(self._config.read_timeout)
        look = max(idle / 8, 0.05)  # how often what the connection holds is looked at
        clock = asyncio.get_running_loop().time
        task = asyncio.ensure_future(request)
        unsent: int | None = None
        try:
            while True:
                done, _ = await asyncio.wait((task,), timeout=look)
                if done:
                    return task.result()
                moved = body.moved
                if moved is None or body.sent:
                    unsent = None
                    continue
                now_unsent = body.unsent()
                if now_unsent is not None and now_unsent != unsent:
                    # The socket took some of what a slice left queued: not stalled.
                    if unsent is not None:
                        body.moved = moved = clock()
                    unsent = now_unsent
                if clock() - moved >= idle:
                    task.cancel()
                    task.add_done_callback(_retrieved)
                    await asyncio.wait((task,))
                    raise StoreUnavailable(
                        f"S3 endpoint {self.where} stalled during {op} of {key!r}: it took "
                        f"none of the body for {idle:g} s ([store] read_timeout)"
                    )
        finally:
            if not task.done():  # this call was cancelled: the request goes with it
                task.cancel()
                task.add_done_callback(_retrieved)

    @contextlib.asynccontextmanager
    async def _errors(self, op: str, key: str | None) -> AsyncIterator[None]:
        try:
            yield
        except DatamoverError:
            raise
        except Exception as exc:
            self._map_error(exc, op, key)

    def _map_error(self, exc: Exception, op: str, key: str | None) -> NoReturn:
        """The one place that decides what a failed request means for the caller."""
        where = f"at {self.where}"
        if isinstance(exc, bce.ClientError):
            code, status = _code(exc), http_status(exc)
            if code == "NoSuchUpload":
                # The multipart upload vanished (aborted elsewhere): a new put starts afresh.
                raise UploadLost(
                    f"S3 endpoint {self.where} lost the upload of {key!r} during {op}"
                ) from exc
            if code == "NoSuchBucket" or (status == 404 and key is None):
                raise BucketNotFound(f"bucket {self.bucket!r} does not exist {where}") from exc
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectNotFound(f"object {key!r} not found in {self.description}") from exc
            if code == "KeyTooLongError":
                # Past S3's 1024 bytes (check_key refuses those) or a server's own limit:
                # SeaweedFS refuses a last part of more than 255 bytes.
                raise InvalidInput(
                    f"bad store key {(key or '')[:60]!r}...: too long for {self.description}"
                ) from exc
            if code in ("", str(status)) and (
                status == 401 or (status == 403 and not op.startswith("Head"))
            ):
                # No S3 error document (a HEAD's answer has none; every other S3 error
                # does), or a bare 401, which S3 servers do not send (they refuse with 403):
                # another server answered, such as a web app asking for its login.
                raise PermanentError(
                    f"S3 endpoint {self.where} answered {op} with HTTP {status} but no S3 "
                    "error: is [store] endpoint the server's S3 port?"
                ) from exc
            if code in _DENIED or status in (401, 403):
                raise StoreAccessDenied(
                    f"access to bucket {self.bucket!r} {where} refused: the credentials were "
                    f"refused or lack permission for {op} ({code})"
                ) from exc
            if code in _TRANSIENT or status in (408, 429) or (status or 0) >= 500:
                raise StoreUnavailable(
                    f"S3 endpoint {self.where} failed {op} on {key or self.bucket!r}: "
                    f"{code} (HTTP {status})"
                ) from exc
            message = exc.response.get("Error", {}).get("Message", "")
            raise PermanentError(
                f"S3 endpoint {self.where} rejected {op} on {key or self.bucket!r}: "
                f"{code} (HTTP {status}) {message}".rstrip()
            ) from exc
        if isinstance(exc, bce.ParamValidationError | bce.EndpointProviderError):
            # botocore refused to build the request from our settings (bucket, endpoint).
            raise InvalidInput(
                f"cannot send {op} to {self.description}: {_first_line(exc)}"
            ) from exc
        if isinstance(exc, botocore.parsers.ResponseParserError):
            # HTML or JSON where S3 answers XML: a filer, a web server, a proxy's page.
            raise PermanentError(
                f"S3 endpoint {self.where} answered {op} with something that is not S3 "
                "(unparsable XML): is [store] endpoint the server's S3 port?"
            ) from exc
        if isinstance(exc, bce.SSLError):
            # A certificate problem does not heal by itself.
            raise PermanentError(f"TLS with S3 endpoint {self.where} failed: {exc}") from exc
        if isinstance(exc, _CONNECTION):
            raise StoreUnavailable(
                f"S3 endpoint {self.where} unavailable during {op}: {exc or type(exc).__name__}"
            ) from exc
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            raise StoreAccessDenied(
                f"no usable credentials for bucket {self.bucket!r} {where}: set access_key and "
                f"secret_key or the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY variables"
            ) from exc
        raise exc

    # -- listing ------------------------------------------------------------------------

    async def _walk(self, prefix: str, after: bytes) -> AsyncIterator[ObjectInfo]:
        """Objects under `prefix` after `after` at this `/` level and, recursively, below it,
        in key order.

        Within a level the server returns objects and sub-prefixes sorted either by key (S3)
        or by name without the trailing `/` (SeaweedFS). In both, a sub-prefix `d/` can be
        entered once an entry sorting after it has arrived, or the level has ended; until
        then it waits in a heap, because siblings like `d-x` and `d.x` come before `d/`.
        Entries at or before `after` are dropped here too: the server's `StartAfter` only
        saves the reading. The sub-prefixes SeaweedFS would leave out of a listing from
        `after` (`_resumed`) that hold anything wait in the heap from the start.
        """
        resumed = await self._holding(_resumed(prefix, after))
        waiting = sorted(resumed)
        async for entries in self._level_pages(prefix, after):
            for sort_key, name, size in entries:
                while waiting and waiting[0].encode() < sort_key:
                    sub_prefix = heapq.heappop(waiting)
                    async with contextlib.aclosing(self._walk(sub_prefix, after)) as sub:
                        async for info in sub:
                            yield info
                if after and passed(sort_key, after, subtree=size is None):
                    continue
                if size is None:
                    if name not in resumed:
                        heapq.heappush(waiting, name)
                else:
                    yield ObjectInfo(name, size)
        while waiting:
            sub_prefix = heapq.heappop(waiting)
            async with contextlib.aclosing(self._walk(sub_prefix, after)) as sub:
                async for info in sub:
                    yield info

    async def _holding(self, prefixes: list[str]) -> list[str]:
        """Those of `prefixes` under which the bucket holds anything: one request of one key
        each, `_PROBES` at a time (a start key can have one per byte below `/`)."""
        found: list[str] = []

        async def probe(sub: str) -> None:
            page = await self._call("ListObjectsV2", None, Prefix=sub, Delimiter="/", MaxKeys=1)
            if page.get("Contents") or page.get("CommonPrefixes"):
                found.append(sub)

        if prefixes:
            await drain((probe(sub) for sub in prefixes), min(_PROBES, len(prefixes)))
        return found

    async def _level_pages(
        self, prefix: str, after: bytes
    ) -> AsyncIterator[list[tuple[bytes, str, int | None]]]:
        """ListObjectsV2 pages of one level as sorted `(sort key, key, size or None)` lists;
        size None marks a sub-prefix (which ends with `/`). When `after` lies under
        `prefix`, the level is listed from its part of `after` on (its entry at this
        level, without the `/` that would lead below: that sub-prefix's keys follow it)."""
        token: str | None = None
        start: str | None = None
        if after.startswith(prefix.encode()):
            head = after[len(prefix.encode()) :].partition(b"/")[0]
            if head:
                start = prefix + head.decode()
        while True:
            if token:
                extra = {"ContinuationToken": token}
            else:
                extra = {"StartAfter": start} if start else {}
            page = await self._call("ListObjectsV2", None, Prefix=prefix, Delimiter="/", **extra)
            entries: list[tuple[bytes, str, int | None]] = []
            for obj in page.get("Contents", ()):
                k: str = obj["Key"]
                if not k.endswith("/"):  # folder markers made by other tools are not objects
                    entries.append((k.encode(), k, int(obj["Size"])))
            for cp in page.get("CommonPrefixes", ()):
                p: str = cp["Prefix"]
                if p == prefix:
                    raise PermanentError(f"{self.description} returned prefix {p!r} for itself")
                entries.append((p.encode(), p, None))
            entries.sort()
            yield entries
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise PermanentError(f"{self.description} truncated a listing without a token")


#: Sub-prefixes of a listing's start probed at once (`S3Store._holding`).
_PROBES = 16
#: Bytes read at a time of a body that is dropped (the part of a 200 before the range).
_SKIP_PIECE = 1 << 20


async def _skip(body: Any, count: int) -> int:
    """Read and drop the next `count` bytes of response `body` (fewer if it ends first);
    how many there were. aiohttp hands out at most what it has buffered, and stops reading
    the socket while its buffer is full, so this holds little more than one piece however
    large the body is."""
    left = count
    while left > 0:
        piece: bytes = await body.read(min(left, _SKIP_PIECE))
        if not piece:
            break
        left -= len(piece)
    return count - left


async def _read_at_most(body: Any, limit: int | None) -> bytes:
    """The next `limit` bytes of response `body` (None: all the rest), fewer only where it
    ends; the rest is left unread. A body cut before its Content-Length raises (aiohttp's
    `ClientPayloadError`, or botocore's `IncompleteReadError`)."""
    if limit is None:
        data: bytes = await body.read()
        return data
    pieces: list[bytes] = []
    while limit > 0:
        piece: bytes = await body.read(limit)
        if not piece:
            break
        pieces.append(piece)
        limit -= len(piece)
    return b"".join(pieces)


def _close_delimited(resp: dict[str, Any]) -> bool:
    """Whether the body of GetObject answer `resp` ends only where the connection closes:
    neither a Content-Length nor chunked encoding."""
    headers = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    encoding = str(headers.get("transfer-encoding", "")).lower()
    return "content-length" not in headers and "chunked" not in encoding


def _resumed(prefix: str, after: bytes) -> list[str]:
    """The sub-prefixes of level `prefix` that may hold keys after `after` although a
    server listing the level from `after` leaves them out.

    For `after` = `prefix + head[/...]`, a listing from `prefix + head` omits, on SeaweedFS
    (which orders a sub-prefix by its name without the `/`), the sub-prefix `head/` and
    every `h/` for a start `h` of `head` followed by a byte below `/` (`d/` for `d-7`),
    though `d/...` sorts after `d-7` by bytes. One per byte below `/` in the level's part of
    `after`, plus that part: each costs a request of one key (`S3Store._holding`), those
    that hold anything a listing.
    """
    p = prefix.encode()
    if not after.startswith(p):
        return []
    head = after[len(p) :].partition(b"/")[0]
    cuts = [j for j in range(len(head)) if head[j] < 0x2F]  # ASCII: a character boundary
    subs = (prefix + head[:j].decode() + "/" for j in [*cuts, len(head)])
    return [sub for sub in subs if check_prefix(sub)]


def _verify(endpoint: str | None) -> bool | None:
    """botocore's `verify` for `endpoint`: False for plain http not routed through a proxy
    (no TLS is spoken, and the CA bundle botocore would otherwise load for the connection
    pool costs ~40 ms of every command's start-up), else None (the configured default)."""
    if endpoint is not None and endpoint.lower().startswith("http://") and not proxied(endpoint):
        return False
    return None


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Take a left task's outcome, so that an error it ends with while it is cancelled is
    not logged as never retrieved (the caller has its own error: the cancellation)."""
    if not task.cancelled():
        task.exception()


def _customise(client: Any) -> None:
    """Stop botocore from wrapping PutObject and UploadPart bodies in `BytesIO` (a copy that
    aiohttp would then send in 64 KiB reads): `Body` goes to aiohttp as it is (body.py).
    And from asking for `Expect: 100-continue` on them: aiohttp waits for the server's
    `100 Continue` with no timeout at all (a stopped server held a push for ever), and the
    wait costs a round trip before every body; a server that refuses a PUT says so in
    its answer all the same (docs/design.md, "No Expect: 100-continue")."""
    for op in ("PutObject", "UploadPart"):
        client.meta.events.unregister(
            f"before-parameter-build.s3.{op}", botocore.handlers.convert_body_to_file_like_object
        )
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (botocore's can run over several)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _snake(op: str) -> str:
    """`PutObject` -> `put_object` (botocore's method names)."""
    return "".join("_" + c.lower() if c.isupper() else c for c in op).lstrip("_")
