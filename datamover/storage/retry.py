"""Retries and concurrency limits, the same way for every driver.

`RetryPolicy` says how a transient fault is retried (tenacity, full-jitter exponential
backoff). `RetryingStore` retries whole calls with it and `LimitedStore` bounds concurrent
calls: wrappers that are themselves Stores. A driver whose call has steps worth retrying on
their own (S3's multipart parts and their completion) is handed the same policy as a
`RetryStep` by whoever builds the stack (`site.make_store`); drivers never retry or
throttle of their own accord.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from datamover.errors import InvalidInput, StoreRetriesExhausted, TransientError, UploadLost
from datamover.storage.base import HOLD, ByteSink, Counted, ObjectInfo, Store, get_into

log = logging.getLogger(__name__)

T = TypeVar("T")


def _call_retryable(exc: BaseException) -> bool:
    """Whether `RetryingStore` retries a call that raised `exc`: a transient fault, unless the
    call already retried a step of itself as often as the policy allows."""
    return isinstance(exc, TransientError) and not isinstance(exc, StoreRetriesExhausted)


def _step_retryable(exc: BaseException) -> bool:
    """Whether a step inside a call is retried: as a call, unless the step cannot succeed
    again whatever happens (its multipart upload is gone)."""
    return _call_retryable(exc) and not isinstance(exc, UploadLost)


@dataclass(frozen=True)
class RetryPolicy:
    """Up to `attempts` tries in all, sleeping a random time up to `initial * 2**n` (at most
    `maximum`) seconds between tries ("full jitter", so many clients hitting one overloaded
    server spread out); transient errors only, anything else is raised at once.

    Called as a `RetryStep` (storage/base.py) it retries one step inside a store call: a
    step that fails `attempts` times raises `StoreRetriesExhausted`, which `RetryingStore`
    does not retry, so tries do not multiply across the two levels.
    """

    attempts: int = 5
    initial: float = 0.2
    maximum: float = 5.0
    #: Told of each retry, with what was retried: a Store call's name (`put`, `get`,
    #: `list`, ...) or a step's `op` (`part`, `completion`, `check`). The daemon counts
    #: them (`datamover_store_retries_total`).
    on_retry: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial < 0 or self.maximum < 0:
            raise InvalidInput(
                f"bad retry settings attempts={self.attempts} initial={self.initial}"
            )

    async def __call__(self, step: Callable[[], Awaitable[T]], what: str, op: str) -> T:
        """`step()`, retried as the `RetryStep` contract says."""
        try:
            return await self.retrying(_step_retryable, what, op)(step)
        except TransientError as exc:
            if not _step_retryable(exc):
                raise
            tries = "1 try" if self.attempts == 1 else f"{self.attempts} tries"
            raise StoreRetriesExhausted(f"gave up on {what} after {tries}: {exc}") from exc

    def retrying(self, retry: Callable[[BaseException], bool], what: str, op: str) -> AsyncRetrying:
        """A tenacity controller of this policy that retries what `retry` accepts and logs
        each failure it retries, naming `what` ("put on s3://..."), and tells `on_retry` of
        it as `op`."""

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s failed (attempt %d of %d): %s", what, state.attempt_number, self.attempts, exc
            )
            self.retried(op)

        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_random_exponential(multiplier=self.initial, max=self.maximum),
            retry=retry_if_exception(retry),
            reraise=True,
            before_sleep=log_retry,
        )

    def retried(self, op: str) -> None:
        """Tell `on_retry` that `op` is tried again; an observer's failure is logged, never
        the retry's."""
        if self.on_retry is not None:
            try:
                self.on_retry(op)
            except Exception:
                log.exception("counting a retry of %s failed", op)

    def wait(self, failures: int) -> float:
        """The same full-jitter schedule as tenacity's `wait_random_exponential`."""
        return random.uniform(0, min(self.maximum, self.initial * 2 ** (failures - 1)))


class RetryingStore:
    """Retries every call that fails with a `TransientError` (but `StoreRetriesExhausted`)
    by `policy` (default: `RetryPolicy()`); any other error is raised at once. Every Store
    call is idempotent, which is what makes this safe.

    `list` restarts the listing after a failure and skips keys it already yielded, so a long
    listing survives faults without duplicates; its try counter starts again whenever the
    listing made progress since the previous failure.
    """

    def __init__(self, inner: Store, policy: RetryPolicy | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()

    @property
    def description(self) -> str:
        """The wrapped store's description."""
        return self.inner.description

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """`inner.put`, retried."""
        await self._retry(self.inner.put, key, data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """`inner.get`, retried."""
        return await self._retry(self.inner.get, key, offset, length)

    async def get_into(
        self, key: str, offset: int, length: int, sink: ByteSink, hold: int = HOLD
    ) -> int:
        """`base.get_into` of `inner`, resumed after a transient failure from the first byte
        the sink has not taken (the bytes before it are not fetched again); its try counter
        starts again whenever the stream made progress since the previous failure, as
        `list`'s. How many bytes came in all."""
        counted = Counted(sink)
        failures = 0
        while True:
            before = counted.n
            try:
                got = await get_into(
                    self.inner, key, offset + before, length - before, counted, hold
                )
                return before + got
            except TransientError as exc:
                failures = 1 if counted.n > before else failures + 1
                if failures >= self.policy.attempts or not _call_retryable(exc):
                    raise
                delay = self.policy.wait(failures)
                log.warning(
                    "GET of %r from %s failed after %d of %d bytes (%s); resuming in %.2f s",
                    key,
                    self.description,
                    counted.n,
                    length,
                    exc,
                    delay,
                )
                self.policy.retried("get")
                await asyncio.sleep(delay)

    async def head(self, key: str) -> ObjectInfo:
        """`inner.head`, retried."""
        return await self._retry(self.inner.head, key)

    async def delete(self, key: str) -> None:
        """`inner.delete`, retried."""
        await self._retry(self.inner.delete, key)

    async def check(self) -> None:
        """`inner.check`, retried (a store still starting up answers after a moment)."""
        await self._retry(self.inner.check)

    async def close(self) -> None:
        """`inner.close`; never retried (closing twice is harmless, closing later pointless)."""
        await self.inner.close()

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """`inner.list`, resumed after transient failures from the last key yielded (the
        listing before it is not read again)."""
        last: bytes | None = None  # UTF-8 of the last key yielded
        resume = start_after
        failures = 0
        while True:
            progressed = False
            try:
                async with _closing(self.inner.list(prefix, resume)) as it:
                    async for info in it:
                        this = info.key.encode()
                        if last is not None and this <= last:
                            continue  # yielded before the failure
                        last, progressed, resume = this, True, info.key
                        yield info
                return
            except TransientError as exc:
                failures = 1 if progressed else failures + 1
                if failures >= self.policy.attempts or not _call_retryable(exc):
                    raise
                delay = self.policy.wait(failures)
                log.warning(
                    "listing %r of %s failed (%s); resuming in %.2f s",
                    prefix,
                    self.description,
                    exc,
                    delay,
                )
                self.policy.retried("list")
                await asyncio.sleep(delay)

    async def _retry(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        op = getattr(fn, "__name__", "call")
        what = f"{op} on {self.description}"
        return await self.policy.retrying(_call_retryable, what, op)(fn, *args)


class LimitedStore:
    """Lets at most `max_concurrency` calls into `inner` at once; the others wait their turn.

    A listing holds a slot only while it fetches its next item, never while the caller works
    on the item, so a caller that lists and gets in a loop cannot deadlock itself.
    """

    def __init__(self, inner: Store, max_concurrency: int) -> None:
        if max_concurrency < 1:
            raise InvalidInput(f"max_concurrency must be >= 1, not {max_concurrency}")
        self.inner = inner
        self.max_concurrency = max_concurrency
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def description(self) -> str:
        """The wrapped store's description."""
        return self.inner.description

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """`inner.put` within a slot."""
        async with self._slots:
            await self.inner.put(key, data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """`inner.get` within a slot."""
        async with self._slots:
            return await self.inner.get(key, offset, length)

    async def get_into(
        self, key: str, offset: int, length: int, sink: ByteSink, hold: int = HOLD
    ) -> int:
        """`base.get_into` of `inner` within a slot."""
        async with self._slots:
            return await get_into(self.inner, key, offset, length, sink, hold)

    async def head(self, key: str) -> ObjectInfo:
        """`inner.head` within a slot."""
        async with self._slots:
            return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        """`inner.delete` within a slot."""
        async with self._slots:
            await self.inner.delete(key)

    async def check(self) -> None:
        """`inner.check` within a slot."""
        async with self._slots:
            await self.inner.check()

    async def close(self) -> None:
        """`inner.close`, without waiting for a slot."""
        await self.inner.close()

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """`inner.list`, each step within a slot."""
        async with _closing(self.inner.list(prefix, start_after)) as it:
            while True:
                async with self._slots:
                    try:
                        info = await anext(it)
                    except StopAsyncIteration:
                        return
                yield info


@contextlib.asynccontextmanager
async def _closing(it: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """Close an inner listing we stop early (async generators have `aclose`; the Store
    protocol only promises an async iterator, so it is optional)."""
    try:
        yield it
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
