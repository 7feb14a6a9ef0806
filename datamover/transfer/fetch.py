"""Fetching chunks: coalesce references into few ranged GETs, then decode and verify each.

`plan_ranges` is pure: chunks are grouped by pack, sorted by offset, and neighbours closer
than `gap` bytes are merged into one request of at most `max_request` bytes (reading a small
gap costs less than another round trip). `Fetcher` runs those requests with bounded
concurrency and returns verified raw chunks; a digest mismatch is `Corrupt`, naming the file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from datamover.aio import gather_or_cancel
from datamover.chunking import codec
from datamover.chunking.pack import pack_key
from datamover.domain.manifest import ChunkRef
from datamover.errors import Corrupt, ObjectNotFound
from datamover.storage.base import HOLD, ByteSink, Store, get_into


@dataclass(slots=True)
class Range:
    """One ranged GET covering `refs` (sorted by offset) in pack `pack`."""

    pack: bytes
    start: int
    end: int
    refs: list[ChunkRef] = field(default_factory=list)


def plan_ranges(refs: Iterable[ChunkRef], gap: int, max_request: int) -> list[Range]:
    """Coalesce chunk references into ranges (equal references fetched once).

    Every distinct reference is in exactly one range, so each is verified: two references
    at the same place in a pack that differ in length, codec or digest (only a hostile or
    broken store makes them) get a range each, and cannot share one verified chunk.
    """
    by_pack: dict[bytes, dict[int, ChunkRef]] = {}
    odd: list[ChunkRef] = []
    for r in refs:
        located = by_pack.setdefault(r.pack, {})
        seen = located.setdefault(r.offset, r)
        if seen is not r and seen != r:
            odd.append(r)
    ranges: list[Range] = [
        Range(r.pack, r.offset, r.offset + r.stored_length, [r]) for r in dict.fromkeys(odd)
    ]
    for pack, located in by_pack.items():
        current: Range | None = None
        for offset in sorted(located):
            ref = located[offset]
            end = offset + ref.stored_length
            if (
                current is not None
                and offset - current.end <= gap
                and end - current.start <= max_request
                and offset >= current.end
            ):
                current.end = end
                current.refs.append(ref)
            else:
                current = Range(pack, offset, end, [ref])
                ranges.append(current)
    return ranges


#: Builds, when an error needs it, the map of a chunk digest to a file that needs it.
Owners = Callable[[], Mapping[bytes, str]]


class Fetcher:
    """Runs ranged GETs against `store` and verifies what comes back."""

    def __init__(self, store: Store, concurrency: int, hold: int = HOLD) -> None:
        self.store = store
        self.downloaded = 0
        self._limit = asyncio.Semaphore(concurrency)
        self._hold = hold

    async def _get(self, rng: Range, owners: Owners) -> bytes:
        key = pack_key(rng.pack)
        async with self._limit:
            try:
                data = await self.store.get(key, rng.start, rng.end - rng.start)
            except ObjectNotFound:
                raise _lacking(rng, None, owners()) from None
        self.downloaded += len(data)
        if len(data) != rng.end - rng.start:
            raise _lacking(rng, len(data), owners())
        return data

    async def stream(self, rng: Range, sink: ByteSink, owner: str | None = None) -> None:
        """Stream `rng` into `sink` (`storage.base.get_into`): the sink sees its bytes as
        they arrive, so the range is never held whole (where the store cannot stream it, at
        most `hold` bytes of it are); a store fault is retried from the first byte not
        taken by the retrying store. A pack shorter than the range, or missing, is
        `Corrupt` naming `owner`, the file the range is of; the sink's own exceptions pass
        unchanged."""
        key = pack_key(rng.pack)
        length = rng.end - rng.start

        def owners() -> Mapping[bytes, str]:
            return {ref.digest: owner for ref in rng.refs} if owner is not None else {}

        async with self._limit:
            try:
                got = await get_into(self.store, key, rng.start, length, sink, self._hold)
            except ObjectNotFound:
                raise _lacking(rng, None, owners()) from None
        self.downloaded += got
        if got != length:
            raise _lacking(rng, got, owners())

    async def fetch(self, ranges: Sequence[Range], owners: Owners | None = None) -> list[bytes]:
        """The bytes of each range, in order. The first failure cancels the GETs still
        running (they would hold slots and fetch for nothing) and is raised once they end.
        `owners()` maps a chunk digest to a file that needs it, for the error of a pack
        missing or shorter than the ranges (called only then)."""
        return await gather_or_cancel([self._get(r, owners or dict) for r in ranges])


def _lacking(rng: Range, got: int | None, owners: Mapping[bytes, str]) -> Corrupt:
    """The error of a range whose pack is missing (`got` None) or ends `got` bytes into
    the range: naming the first file whose chunk it lacks, when `owners` knows it."""
    key = pack_key(rng.pack)
    if got is None:
        what = f"pack {key} is missing from the store"
        lacked = rng.refs
    else:
        end = rng.start + got
        what = (
            f"pack {key} ends after {end:,} bytes, where the manifest has chunks up to byte "
            f"{rng.end:,}"
        )
        lacked = [r for r in rng.refs if r.offset + r.stored_length > end]
    name = next((owners[r.digest] for r in lacked if r.digest in owners), None)
    if name is None:
        return Corrupt(f"{what}: the data is corrupt")
    return Corrupt(f"{name!r}: {what}: the data is corrupt", [name])


def decode_ranges(
    ranges: Sequence[Range],
    blobs: Sequence[bytes],
    owners: dict[bytes, str],
    default_owner: str = "?",
) -> dict[ChunkRef, bytes | memoryview]:
    """Decode and verify every chunk of fetched ranges; key: the whole reference (so a
    chunk is only ever used where its own digest and lengths were checked).

    `owners` maps a chunk digest to a file that needs it (else `default_owner`), for the
    error message. Blocking (zstd and BLAKE3): run it off the event loop.
    """
    out: dict[ChunkRef, bytes | memoryview] = {}
    for rng, blob in zip(ranges, blobs, strict=True):
        view = memoryview(blob)
        for ref in rng.refs:
            lo = ref.offset - rng.start
            stored = view[lo : lo + ref.stored_length]
            try:
                out[ref] = codec.decode_verified(stored, ref.codec, ref.raw_length, ref.digest)
            except Corrupt as exc:
                name = owners.get(ref.digest, default_owner)
                raise Corrupt(
                    f"{name!r}: chunk at {pack_key(ref.pack)} offset {ref.offset} failed "
                    f"verification ({exc}): the data is corrupt",
                    [name],
                ) from None
    return out


class ChunkSink:
    """A `ByteSink` for one range (`Fetcher.stream`): takes its bytes in order, and the
    moment a chunk's last byte is in, decodes and verifies it and calls `chunk(ref, raw)` on
    the thread that read it; the bytes between chunks (a coalesced gap) are dropped. It
    holds one chunk's stored bytes at a time, in `buffer` (at least `buffer_size(rng)`
    bytes; the caller may reuse it for another range once this one's stream has ended).
    A chunk that fails its digest is `Corrupt`, naming `owner`; `raw` is valid only during
    the call (it may be a view of `buffer`)."""

    __slots__ = ("_buffer", "_chunk", "_filled", "_i", "_owner", "_pos", "_refs")

    def __init__(
        self,
        rng: Range,
        buffer: bytearray,
        chunk: Callable[[ChunkRef, bytes | memoryview], None],
        owner: str,
    ) -> None:
        if len(buffer) < buffer_size(rng):
            raise ValueError("the buffer is smaller than the range's largest chunk")
        self._refs = rng.refs
        self._buffer = memoryview(buffer)
        self._chunk = chunk
        self._owner = owner
        self._pos = rng.start  # the pack offset of the next byte
        self._i = 0  # the chunk that byte belongs to, or precedes
        self._filled = 0  # bytes of that chunk taken

    def view(self) -> memoryview:
        """The rest of the current chunk's place in the buffer, or a piece of the gap
        before it."""
        if self._i >= len(self._refs):
            raise Corrupt(f"{self._owner!r}: more bytes than the range holds")
        ref = self._refs[self._i]
        if self._pos < ref.offset:
            return self._buffer[: min(ref.offset - self._pos, len(self._buffer))]
        return self._buffer[self._filled : ref.stored_length]

    def took(self, n: int) -> None:
        """Count `n` bytes in; hand on a chunk that is complete."""
        ref = self._refs[self._i]
        self._pos += n
        if self._pos <= ref.offset:
            return  # a gap's bytes
        self._filled += n
        if self._filled < ref.stored_length:
            return
        stored = self._buffer[: ref.stored_length]
        try:
            raw = codec.decode_verified(stored, ref.codec, ref.raw_length, ref.digest)
        except Corrupt as exc:
            raise Corrupt(
                f"{self._owner!r}: chunk at {pack_key(ref.pack)} offset {ref.offset} failed "
                f"verification ({exc}): the data is corrupt",
                [self._owner],
            ) from None
        self._i += 1
        self._filled = 0
        self._chunk(ref, raw)


def buffer_size(rng: Range) -> int:
    """The buffer a `ChunkSink` of `rng` needs: its largest chunk's stored bytes."""
    return max(ref.stored_length for ref in rng.refs)
