"""`MemoryStore`: a dict-backed Store for tests and for trying things out.

It keeps every object in process memory, so it suits small data only; it follows the Store
contract exactly (key checks, ranges, byte-ordered listing) so code tested against it behaves
the same on the real stores.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from datamover.errors import ObjectNotFound
from datamover.storage.base import ObjectInfo, check_key, check_prefix, check_range, start_key


class MemoryStore:
    """A Store holding objects in a dict. Every call is atomic (there is no `await` inside)."""

    def __init__(self, description: str = "memory://") -> None:
        self.description = description
        self.objects: dict[str, bytes] = {}

    async def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store a copy of `data` (later changes to a caller's buffer do not leak in)."""
        self.objects[check_key(key)] = bytes(data)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object or the range; `length=0` returns b"" without looking the key up,
        like the S3 driver, which makes no request for it."""
        check_key(key)
        check_range(offset, length)
        if length == 0:
            return b""
        data = self._find(key)
        return data[offset:] if length is None else data[offset : offset + length]

    async def head(self, key: str) -> ObjectInfo:
        """Return the object's size; raise `ObjectNotFound` if it is missing."""
        return ObjectInfo(key, len(self._find(check_key(key))))

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """Yield objects under `prefix` after `start_after` in UTF-8 byte order of their keys.

        The keys are snapshotted when the listing starts; objects put later are not seen and
        objects deleted meanwhile are skipped, as on a real store listing page by page.
        """
        after = start_key(start_after)
        if not check_prefix(prefix):
            return
        keys = sorted(
            (k for k in self.objects if k.startswith(prefix) and k.encode() > after),
            key=str.encode,
        )
        for key in keys:
            data = self.objects.get(key)
            if data is not None:
                yield ObjectInfo(key, len(data))

    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is fine."""
        self.objects.pop(check_key(key), None)

    async def check(self) -> None:
        """Always usable."""

    async def close(self) -> None:
        """Nothing to release."""

    def _find(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise ObjectNotFound(f"object {key!r} not found in {self.description}") from None
