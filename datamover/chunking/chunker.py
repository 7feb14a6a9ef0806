"""Cutting file content into chunks: whole small files, FastCDC for large ones.

The parameters are repository-wide (stored in the bucket's `config` object, see
docs/format.md): equal content must give equal chunks at every site or dedup is lost.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyfastcdc

from datamover.errors import Corrupt

_READ_BLOCK = 8 << 20

#: Inclusive bounds of the integer chunker parameters (docs/format.md, "config"): FastCDC's
#: (pyfastcdc refuses anything else), and at most one 16 MiB chunk for a small file.
LIMITS: dict[str, tuple[int, int]] = {
    "min_size": (64, 1 << 20),
    "avg_size": (256, 4 << 20),
    "max_size": (1 << 10, 16 << 20),
    "normalization": (0, 3),
    "small_file_limit": (0, 16 << 20),
}


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC parameters plus the size up to which a file is a single chunk."""

    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024
    normalization: int = 1
    small_file_limit: int = 1024 * 1024
    algorithm: str = "fastcdc2020"

    def to_json(self) -> dict[str, Any]:
        """The `chunker` object of the repository config."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ChunkerParams:
        """Parse the repository config's `chunker` object; raise `Corrupt` if unusable.

        Every field must be present with its type (integers are not `bool`s or floats) and
        within `LIMITS` (FastCDC's own bounds, and a small file must fit in one chunk of at
        most 16 MiB, docs/format.md "config"), with `min_size <= avg_size <= max_size`: a
        value FastCDC refuses would fail every push with an internal error, and a larger
        small-file limit would publish chunks no reader accepts.
        """
        fields = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or set(data) != fields:
            raise Corrupt(
                "repository config has an unusable chunker section: expected exactly the "
                f"fields {sorted(fields)}, found {str(data)[:200]}"
            )
        bad = [
            name
            for name, (low, high) in LIMITS.items()
            if type(data[name]) is not int or not low <= data[name] <= high
        ]
        if (
            bad
            or data["algorithm"] != "fastcdc2020"
            or not data["min_size"] <= data["avg_size"] <= data["max_size"]
        ):
            raise Corrupt(
                f"repository config names unsupported chunker parameters {data!r}"
                + (f" (out of range: {', '.join(bad)})" if bad else "")
            )
        return cls(**data)


class _Reader:
    """A file-object facade over a raw fd that counts bytes, for FastCDC's `cut_stream`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.total = 0

    def readinto(self, buffer: memoryview) -> int:
        n = os.readv(self.fd, [buffer])
        self.total += n
        return n


class Chunker:
    """Cuts open files into raw chunks. One instance per thread (FastCDC is not reentrant)."""

    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._cdc = pyfastcdc.FastCDC(
            avg_size=params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
        )

    @staticmethod
    def read_small(fd: int, size: int) -> bytes:
        """Read a whole small file, up to `size + 1` bytes so that growth is noticed.

        The caller compares the length read with `size`: more or fewer means the file
        changed between stat and read.
        """
        data = os.read(fd, size + 1)
        if len(data) == size or not data:
            return data
        parts = [data]
        got = len(data)
        while got <= size:  # short reads happen on some network file systems
            more = os.read(fd, size + 1 - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def chunks(self, fd: int, size: int) -> Iterator[bytes]:
        """Yield the raw chunks of the open file `fd` whose stat size is `size`.

        Yields copies (`bytes`), so chunks stay valid after the next one is cut. The total
        length yielded may differ from `size` if the file changed: the caller must check.
        """
        if size <= self.params.small_file_limit:
            data = self.read_small(fd, size)
            if data:
                yield data
            return
        reader = _Reader(fd)
        for chunk in self._cdc.cut_stream(reader):
            yield bytes(chunk.data)
