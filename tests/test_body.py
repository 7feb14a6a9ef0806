"""Upload bodies (storage/body.py): file-like for botocore, checksummed as S3 defines it."""

from __future__ import annotations

import base64
import os

from datamover.storage.body import SLICE, Body, BodyPayload, crc32c


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


def _crc32c_bitwise(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected polynomial 0x82F63B78) one bit at a time: what S3's
    `x-amz-checksum-crc32c` holds, written from its definition."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_checksum_is_s3s_crc32c() -> None:
    # The check value of CRC-32C (RFC 3720, appendix B.4): base64 of 0xE3069283.
    assert crc32c(b"123456789") == base64.b64encode(bytes.fromhex("e3069283")).decode()
    data = os.urandom(3 * 4096 + 17)
    want = base64.b64encode(_crc32c_bitwise(data).to_bytes(4, "big")).decode()
    assert crc32c(data) == want
    assert crc32c(memoryview(bytearray(data))) == want  # a pack's buffer, not copied


class _Writer:
    transport = None  # no connection: the upload watch sees no send queue

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
