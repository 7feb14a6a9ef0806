"""The Store interface: a flat key space of immutable-by-convention objects.

Every backend (S3, POSIX directory, memory) implements exactly this, and one conformance
suite (`tests/test_store_conformance.py`) runs against all of them. Cross-cutting behaviour
(retries, concurrency limits) wraps a Store and is itself a Store; drivers stay plain.

Contract, for every implementation:

- Keys are non-empty strings of `/`-separated parts, each part non-empty, none `.` or `..`,
  no NUL or other control character, valid Unicode (no lone surrogates) and at most
  `MAX_KEY_BYTES` bytes in UTF-8 (S3's limit). Drivers may rely on that (`check_key`
  enforces it with `InvalidInput`). A driver may refuse longer parts than its medium holds
  (a file name of at most 255 bytes, SeaweedFS's too): that `put` raises `InvalidInput`,
  and `get`/`head` of such a key raise `ObjectNotFound`, as for any key never stored.
- `put` replaces the whole object atomically: a reader sees the old object or the new one,
  never a mix. `put` of the same key and bytes twice is harmless (idempotent).
- `get` with `offset`/`length` returns exactly that range; a range that runs past the end is
  cut at the end, one that starts at or after it is empty. A missing key raises
  `ObjectNotFound`, never returns empty bytes, except for `length=0`, which returns `b""`
  without a request.
- A key is never also a "directory" of other keys (`a/b` and `a/b/c`): the POSIX store
  cannot hold both, and the repository layout never needs it.
- `list(prefix)` yields every object whose key starts with `prefix`, in ascending order of the
  key's UTF-8 bytes (S3's order), streaming: it never holds the whole listing. A prefix no
  key can start with (`/x`, `a//`) yields nothing; one that is not valid Unicode raises
  `InvalidInput`. `list(prefix, start_after)` yields only the keys after `start_after` (any
  string, in that byte order), without reading what comes before it (S3's `StartAfter`,
  or skipped subtrees): a listing resumes where an earlier one stopped.
- `delete` of a missing key is not an error (idempotent).
- Transient faults raise `StoreUnavailable` (safe to retry every call above, all of which are
  idempotent); refusals raise `StoreAccessDenied` or `BucketNotFound` (never retry).
  `StoreRetriesExhausted` is a `StoreUnavailable` whose call already retried a step of
  itself as often as its policy allows: wrappers do not retry the call again.

A driver whose call has steps worth retrying on their own (S3's multipart parts and their
completion) takes a `RetryStep` from whoever builds the store stack; it never chooses a
policy of its own.

Streaming a range (`get_into`) is a capability a store may add, not part of the Protocol:
`get_into(store, ...)` uses a store's own `get_into` where it has one (the S3 driver, and the
wrappers, which pass it on) and `get` otherwise. A stream's bytes go into a `ByteSink` as
they arrive, so a range of any size costs the sink's buffer, not the range, in memory: a
large file's stage reads each pack in one request (docs/design.md, "A large file's packs
are streamed").
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from datamover.errors import DatamoverError, InvalidInput


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing or `head` tells about one object."""

    key: str
    size: int


@runtime_checkable
class Store(Protocol):
    """A bucket-like object store. See the module docstring for the contract."""

    #: A short human name for messages, e.g. ``s3://bucket@http://host:port``.
    description: str

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `key`, replacing any previous object atomically."""
        ...

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes (or the range `[offset, offset+length)`)."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Return the object's size; raise `ObjectNotFound` if it does not exist."""
        ...

    def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield objects under `prefix` whose key sorts after `start_after`, sorted by key,
        streaming."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is fine."""
        ...

    async def check(self) -> None:
        """Prove the store is reachable and usable with the configured credentials.

        Raises `StoreUnavailable`, `StoreAccessDenied` or `BucketNotFound` with a message
        that names the endpoint and bucket.
        """
        ...

    async def close(self) -> None:
        """Release connections. Idempotent."""
        ...


T = TypeVar("T")


class RetryStep(Protocol):
    """Retries one idempotent step inside a store call (rclone's "low-level retries"), so a
    fault costs that step again, not the whole call. `storage.retry.RetryPolicy` is one."""

    async def __call__(self, step: Callable[[], Awaitable[T]], what: str, op: str) -> T:
        """`step()`'s result. A `TransientError` is retried, except `UploadLost` (retrying the
        step cannot cure it); when the tries run out, `StoreRetriesExhausted` from the last
        fault is raised, naming `what` ("part 3 of 'key'"). Any other error, and
        cancellation (also while waiting to try again), passes at once. `op` names the kind
        of step ("part") for counting retries."""
        ...


#: The longest key, in UTF-8 bytes (S3's limit).
MAX_KEY_BYTES = 1024


def check_key(key: str) -> str:
    """Return `key` if it is a well-formed store key, else raise `InvalidInput`."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidInput(
            f"bad store key {key!r}: must be non-empty and not start or end with '/'"
        )
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidInput(f"bad store key {key!r}: empty, '.' or '..' part")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise InvalidInput(f"bad store key {key!r}: control character")
    size = len(_utf8(key, "key"))
    if size > MAX_KEY_BYTES:
        raise InvalidInput(
            f"bad store key {key[:60]!r}...: {size} bytes in UTF-8, more than {MAX_KEY_BYTES}"
        )
    return key


def check_prefix(prefix: str) -> bool:
    """Whether a valid key can start with `prefix`; raise `InvalidInput` if the prefix is
    not valid Unicode (it cannot be compared with keys at all).

    A driver lists nothing for a prefix no key starts with, without asking its medium:
    SeaweedFS and a file system both read `/q` or `./q` as the directory `q`.
    """
    _utf8(prefix, "listing prefix")
    if any(ord(c) < 32 or c == "\x7f" for c in prefix):
        return False
    whole = prefix.split("/")[:-1]  # the parts that are complete
    return not (prefix.startswith("/") or any(p in ("", ".", "..") for p in whole))


def start_key(start_after: str) -> bytes:
    """`start_after` in UTF-8; `InvalidInput` if it is not valid Unicode."""
    return _utf8(start_after, "listing start")


def passed(key: bytes, start_after: bytes, subtree: bool = False) -> bool:
    """Whether a listing from `start_after` skips `key` (UTF-8): it sorts at or before
    `start_after`. With `subtree`, `key` is a prefix ending in `/` and the question is
    whether every key under it does: a prefix `start_after` itself lies under is entered."""
    if subtree:
        return key < start_after and not start_after.startswith(key)
    return key <= start_after


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidInput(f"bad store {what} {text!r}: not valid Unicode") from None


def check_range(offset: int, length: int | None) -> None:
    """Reject negative ranges with `InvalidInput` (a programming or input error, never I/O)."""
    if offset < 0 or (length is not None and length < 0):
        raise InvalidInput(f"bad range offset={offset} length={length}")


class ByteSink(Protocol):
    """Takes a stream's bytes in order, on whatever thread reads them (blocking calls are
    fine there; the event loop is never one). `view()` is where the next bytes go (a
    non-empty writable view, valid until `took`); `took(n)` says its first `n` bytes (n > 0)
    now hold the stream's next bytes. An exception from either stops the stream and reaches
    the caller of `get_into` as it is (a full disk stays an `OSError`, a bad chunk `Corrupt`)."""

    def view(self) -> memoryview:
        """Where the next bytes go."""
        ...

    def took(self, n: int) -> None:
        """The first `n` bytes of the last `view()` are the stream's next bytes."""
        ...


class SinkFailed(DatamoverError):
    """A `ByteSink`'s own exception, carried through a driver's mapping of I/O errors (an
    `OSError` of the sink's file is not the store's; a `DatamoverError` passes that mapping
    as it is). Never raised out of `get_into`, which raises `error` itself."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def feed(sink: ByteSink, data: bytes | bytearray | memoryview) -> None:
    """Hand all of `data` to `sink`, in the pieces its views take (blocking: on a thread)."""
    src = memoryview(data)
    while src:
        dst = sink.view()
        n = min(len(dst), len(src))
        dst[:n] = src[:n]
        sink.took(n)
        src = src[n:]


#: What `get_into` holds of a range at most when it has to read it with `get` (default).
HOLD = 16 << 20


class Counted:
    """A `ByteSink` passing everything to `sink`, counting the bytes it took (`n`)."""

    __slots__ = ("n", "sink")

    def __init__(self, sink: ByteSink) -> None:
        self.sink = sink
        self.n = 0

    def view(self) -> memoryview:
        """`sink.view()`."""
        return self.sink.view()

    def took(self, n: int) -> None:
        """`sink.took(n)`, counted once it returns."""
        self.sink.took(n)
        self.n += n


async def get_into(
    store: Store, key: str, offset: int, length: int, sink: ByteSink, hold: int = HOLD
) -> int:
    """Stream `length` bytes of `key` from `offset` into `sink`; how many came: `length`, or
    fewer only where the object ends (as `get` cuts a range). Through `store.get_into` where
    the store has it, else with `get`s of at most `hold` bytes (`read_into`), as a store
    that has it does for an answer it does not stream. Errors as `get`'s, and the sink's
    own, unchanged; bytes the sink took before a failure stay taken (a retry resumes after
    them: `RetryingStore`)."""
    own = getattr(store, "get_into", None)
    if own is not None:
        got: int = await own(key, offset, length, sink, hold)
        return got
    check_range(offset, length)
    return await read_into(store.get, key, offset, length, sink, hold)


async def read_into(
    get: Callable[[str, int, int], Awaitable[bytes]],
    key: str,
    offset: int,
    length: int,
    sink: ByteSink,
    hold: int,
) -> int:
    """The range read with `get` (a store's) in pieces of at most `hold` bytes, each fed to
    `sink` on a thread; how many bytes came (fewer than `length` only where the object
    ends). So a range that cannot be streamed holds what a range held whole used to
    (`[transfer] max_request`), not the range."""
    import asyncio  # here: the CLI's thin client imports this module, not asyncio (13 ms)

    got = 0
    while got < length:
        want = min(hold, length - got)
        data = await get(key, offset + got, want)
        if data:
            await asyncio.to_thread(feed, sink, data)
        got += len(data)
        if len(data) < want:  # the object ends
            break
    return got
