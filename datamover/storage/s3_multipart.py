"""Multipart uploads for `S3Store`: create an upload, send its parts, complete it, or abort it.

`MultipartUploader.put` is what `S3Store.put` does for an object at or above its multipart
threshold. Every request goes through the store's one-request function (`Call`), which turns
each failure into the error the caller acts on; this module adds what an upload of many
requests needs on top of that:

- Retries. A part that fails transiently is sent again on its own by `retry_part` (the
  stack's `RetryStep`), into the same upload under the same number, which overwrites, with
  the same bytes and CRC32C; so is a failed completion, with the same part list. A fault
  costs that step again, not every part of the object. With `retry_part` None either fails
  the put. A part or completion that fails every try raises `StoreRetriesExhausted`; an
  upload that vanished raises `UploadLost` (a new put starts afresh).
- Aborts. On a failure of the put, and on cancellation, the upload is aborted, so no parts
  are left behind to be billed; the first part that fails cancels the others, so none keeps
  uploading into an upload being aborted.
- Uploads left to the bucket's lifecycle rule. No abort while a completion of the upload may
  still be running on the server (sent, with no answer from the server itself: a timeout, a
  dropped connection, a cancelled put, a gateway's 502 or 504): an abort racing it could
  free the parts' data under the object it is making on SeaweedFS. Such an upload is left,
  with a warning naming it, to the lifecycle rule (AbortIncompleteMultipartUpload), which is
  also the backstop for an abort that fails. An abort after a completion that is over is
  harmless (S3: NoSuchUpload; SeaweedFS: 204, the object kept).
- A lost answer is proven, not assumed. A completion that fails (out of tries, refused, or
  NoSuchUpload) may be the answer to a retry of one that did complete and whose answer was
  lost; it is no failure of the put if a HEAD shows the key holds the object the upload
  made: S3's multipart ETag of the parts' ETags, and the object's size. Anything less is no
  proof, and the failure is raised. A put that succeeds makes no extra request. The same
  proof holds for a key holding that object from before (the same bytes put again), with
  this upload never completed: where the server itself refused every completion (none may
  still run) and the upload is not known gone (NoSuchUpload), it is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import botocore.exceptions as bce

from datamover.errors import DatamoverError, UploadLost
from datamover.storage.base import RetryStep
from datamover.storage.body import Body, checksum

# The driver's logger, as before this module was split from s3.py: log filters, and the
# daemon's JSON lines (which name the logger), see the same records.
log = logging.getLogger("datamover.storage.s3")

T = TypeVar("T")

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's smallest part (all but the last); SeaweedFS enforces it too
MAX_PARTS = 10_000  # S3's most parts per upload
#: Answers a gateway gives when it stopped waiting for the server, which may still be at work.
_GATEWAY = {502, 504}


class Call(Protocol):
    """One request (`S3Store._call`): the S3 operation `op` (`UploadPart`, named in messages)
    on `key`, with botocore's keyword arguments but the bucket's. A failure is raised as the
    `DatamoverError` it means, with botocore's error, if there was one, as its `__cause__`."""

    async def __call__(self, op: str, key: str | None, **kwargs: Any) -> dict[str, Any]:
        """The response, as botocore returns it."""
        ...


@dataclass(frozen=True)
class MultipartUploader:
    """The multipart uploads of one store: each request is made by `call`, a failed part or
    completion is tried again by `retry_part` (None: once only); parts are `chunk` bytes (more
    where `MAX_PARTS` would not hold the object), `concurrency` of them sent at a time.
    `description` names the store in log lines."""

    call: Call
    retry_part: RetryStep | None
    chunk: int
    concurrency: int
    description: str

    async def put(self, key: str, view: memoryview) -> None:
        """Create an upload, send its parts (`concurrency` at a time), complete it.

        On any failure or cancellation the upload is aborted, except while a completion of
        it may still be running on the server (sent, with no answer from the server itself):
        an abort racing it could free the parts' data under the object it is making on
        SeaweedFS. Such an upload is left to the bucket's lifecycle rule; an abort after a
        completion that is over is harmless (S3: NoSuchUpload; SeaweedFS: 204, the object
        kept)."""
        size = len(view)
        part_size = max(self.chunk, -(-size // MAX_PARTS))
        created = await self.call("CreateMultipartUpload", key, Key=key)
        upload_id: str = created["UploadId"]
        completion = _Completion()
        try:
            slots = asyncio.Semaphore(self.concurrency)

            async def upload(number: int, start: int) -> dict[str, Any]:
                async with slots:  # held while a failed part waits to be sent again
                    part = view[start : start + part_size]
                    crc = await checksum(part)  # the same bytes on every try

                    async def send() -> dict[str, Any]:
                        return await self.call(
                            "UploadPart",
                            key,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=Body(part),  # a fresh one: a try may have read the last
                            ChecksumCRC32C=crc,
                        )

                    resp = await self._step(send, f"part {number} of {key!r}", "part")
                    return {"PartNumber": number, "ETag": resp["ETag"]}

            parts = await _gather_or_cancel(
                upload(n, start) for n, start in enumerate(range(0, size, part_size), start=1)
            )
            await self._complete(key, upload_id, parts, size, completion)
        except BaseException:
            if completion.may_run:
                log.warning(
                    "left multipart upload %s of %r in %s: a CompleteMultipartUpload of it "
                    "may still be running, which an abort could race; the bucket's lifecycle "
                    "rule (AbortIncompleteMultipartUpload) removes it if it did not complete",
                    upload_id,
                    key,
                    self.description,
                )
                raise
            await self._abort(key, upload_id)
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload, shielded so a cancelled put still cleans up; a failure is
        ignored (a bucket lifecycle rule, AbortIncompleteMultipartUpload, is the backstop)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(
                self.call("AbortMultipartUpload", key, Key=key, UploadId=upload_id)
            )

    async def _complete(
        self,
        key: str,
        upload_id: str,
        parts: list[dict[str, Any]],
        size: int,
        completion: _Completion,
    ) -> None:
        """CompleteMultipartUpload, tried as a step. A completion that fails (out of tries,
        refused, or NoSuchUpload: `UploadLost`) may be the answer to a retry of one that did
        complete and whose answer was lost; the put is then done if the key holds the object
        these parts make (`_holds`), else the failure is raised.

        Done so after completions the server itself refused, every one of them (none may
        still run), and not because the upload is gone (`UploadLost`), the key may hold that
        object from before (a put of the same bytes, as a rerun's pack) while this upload
        was never completed: it is aborted, which is harmless if it was (S3: NoSuchUpload;
        SeaweedFS: 204, the object kept)."""

        async def send() -> dict[str, Any]:
            try:
                return await self.call(
                    "CompleteMultipartUpload",
                    key,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException as exc:
                if not _over(exc):
                    completion.may_run = True
                raise

        try:
            await self._step(send, f"completion of {key!r}", "completion")
        except DatamoverError as exc:
            if not await self._holds(key, parts, size):
                raise
            if completion.may_run or isinstance(exc, UploadLost):
                log.info(
                    "%s had completed the upload of %r; the answer saying so was lost",
                    self.description,
                    key,
                )
                return
            log.info(
                "%s refused to complete upload %s of %r, whose object the key holds already; "
                "the upload is aborted",
                self.description,
                upload_id,
                key,
            )
            await self._abort(key, upload_id)

    async def _holds(self, key: str, parts: list[dict[str, Any]], size: int) -> bool:
        """Whether `key` holds the object a completion of `parts` (`size` bytes) makes: its
        ETag is S3's multipart ETag of the parts' ETags and its size is `size`. False when
        that cannot be shown (a part's ETag is not an MD5, the HEAD fails)."""
        expected = _multipart_etag([part["ETag"] for part in parts])
        if expected is None:
            return False

        async def head() -> dict[str, Any]:
            return await self.call("HeadObject", key, Key=key)

        try:
            info = await self._step(head, f"check of {key!r}", "check")
        except DatamoverError:
            return False
        etag = str(info.get("ETag", "")).strip('"').lower()
        return etag == expected and int(info.get("ContentLength", -1)) == size

    async def _step(self, step: Callable[[], Awaitable[T]], what: str, op: str) -> T:
        """`step()`, retried by `retry_part` if the store has one (`RetryStep`)."""
        if self.retry_part is None:
            return await step()
        return await self.retry_part(step, what, op)


@dataclass
class _Completion:
    """What the completions of one multipart upload left open."""

    #: A completion was sent and may still be running on the server: no answer came from
    #: the server itself (a timeout, a dropped connection, a cancelled put, a gateway's
    #: 502 or 504), so it may yet complete the upload.
    may_run: bool = False


def _over(exc: BaseException) -> bool:
    """Whether a request that raised `exc` is over on the server: the server itself answered
    it (any status but a gateway's 502 or 504)."""
    cause = exc.__cause__
    return (
        isinstance(exc, DatamoverError)
        and isinstance(cause, bce.ClientError)
        and http_status(cause) not in _GATEWAY
    )


def http_status(exc: bce.ClientError) -> int | None:
    """The HTTP status of the answer botocore raised `exc` for (None if it names none)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _multipart_etag(part_etags: list[str]) -> str | None:
    """S3's ETag of an object completed from parts with these ETags: the hex MD5 of the
    parts' binary MD5s, then `-` and the number of parts (SeaweedFS does the same: tested).
    None if a part's ETag is not 32 hex digits. (Where part ETags are not the parts' MD5s,
    as with SSE-KMS on AWS, the object's ETag need not match this: the check fails safe.)"""
    digests = bytearray()
    for etag in part_etags:
        hexed = etag.strip('"').lower()
        if not re.fullmatch(r"[0-9a-f]{32}", hexed):
            return None
        digests += bytes.fromhex(hexed)
    return f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(part_etags)}"


async def _gather_or_cancel(coros: Iterator[Awaitable[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run all, return results in order; on the first failure cancel the rest and raise it
    (plain `gather` would let the other parts keep uploading into an upload being aborted)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
