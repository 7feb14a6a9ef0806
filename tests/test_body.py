"""Upload bodies (storage/body.py): file-like for botocore, checksummed like botocore."""

from __future__ import annotations

import os

from botocore.httpchecksum import Crc32Checksum

from datamover.storage.body import SLICE, Body, BodyPayload, crc32


def test_body_reads_seeks_and_tells_like_a_file() -> None:
    data = os.urandom(1000)
    body = Body(data)
    assert len(body) == 1000
    assert body.read(10) == data[:10]
    assert body.tell() == 10
    assert body.read() == data[10:]
    assert body.read(5) == b""
    assert body.seek(-4, 2) == 996
    assert body.read(100) == data[-4:]
    assert body.seek(3) == 3 and body.read(2) == data[3:5]
    assert body.seek(10**6) == 1000


def test_checksum_matches_botocore() -> None:
    data = os.urandom(3 * SLICE + 17)
    reference = Crc32Checksum()
    reference.update(data)
    assert crc32(data) == reference.b64digest()
    assert crc32(memoryview(data)) == reference.b64digest()


class _Writer:
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    async def write(self, chunk: memoryview) -> None:
        assert len(chunk) <= SLICE
        self.pieces.append(bytes(chunk))


async def test_payload_writes_the_body_in_slices_up_to_the_length() -> None:
    data = os.urandom(2 * SLICE + 5)
    payload = BodyPayload(Body(data))
    assert payload.size == len(data)
    writer = _Writer()
    await payload.write(writer)  # type: ignore[arg-type]
    assert b"".join(writer.pieces) == data and len(writer.pieces) == 3
    writer = _Writer()
    await payload.write_with_length(writer, SLICE + 1)  # type: ignore[arg-type]
    assert b"".join(writer.pieces) == data[: SLICE + 1]
