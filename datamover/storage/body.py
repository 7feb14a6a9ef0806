"""Upload bodies that reach the socket without being copied.

A 32 MiB pack handed to botocore as `bytes` is copied three to four times on its way out
(botocore's `BytesIO` wrapper, aiohttp's `Content-Length` slice, asyncio's send buffer on
Python 3.11), about a second of CPU per GiB on the event loop, the one thread every transfer
shares. `Body` wraps the buffer; `BodyPayload` (registered with aiohttp) writes it in 1 MiB
memoryview slices, so only what the socket does not take at once is ever copied, and
aiohttp's flow control keeps that small. aiohttp times no part of sending a body (its read
timeout starts once the body is out): `Body.moved` lets the store see a server that stopped
taking it (`S3Store._watched`). `crc32c` is the upload checksum (`checksum`
computes it off the loop for large bodies), sent by the caller as `ChecksumCRC32C`, so
botocore does not read the body either. CRC32C, not CRC32: the `crc32c` package computes it
with the CPU's CRC instruction at about 12 GB/s here, against 3.9 GB/s for `zlib.crc32`
(docs/design.md, "A CRC32C checksum header on every upload").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import sys
import termios
from typing import Any

import aiohttp.payload
import crc32c as _crc32c
from aiohttp.abc import AbstractStreamWriter

SLICE = 1 << 20


class Body:
    """A read-only request body over `data` (kept, not copied: do not modify it meanwhile).

    File-like enough for botocore (`read`, `seek`, `tell`, `len`); aiohttp sends it through
    `BodyPayload` without calling those.
    """

    __slots__ = ("_pos", "moved", "sent", "transport", "view")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.view = memoryview(data).cast("B")
        self._pos = 0
        #: The event loop's time when the socket last took a slice of the body (when its
        #: sending began, before the first); None until then. For `S3Store`'s watch on a
        #: stalled upload: nothing else times the sending of a body (below).
        self.moved: float | None = None
        #: Whether the whole body went out (then the read timeout of the answer applies).
        self.sent = False
        #: The connection's transport while the body is being sent: what it still holds
        #: to send shows progress within a slice (`unsent`).
        self.transport: asyncio.BaseTransport | None = None

    def unsent(self) -> int | None:
        """Bytes of the body's connection not yet taken by the server (None: unknown): what
        the transport holds plus the socket's send queue (`SIOCOUTQ`). The queue is what
        moves on a slow link: the kernel asks for more only once a third of its buffer
        (megabytes) is free, so the transport's own count can stand still for seconds."""
        transport = self.transport
        if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
            return None
        held = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                held += int.from_bytes(queued, sys.byteorder, signed=True)
        return held

    def __len__(self) -> int:
        return len(self.view)

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes from the current position (all that is left if negative)."""
        end = len(self.view) if size is None or size < 0 else min(self._pos + size, len(self.view))
        data = bytes(self.view[self._pos : end])
        self._pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the read position (`whence` as for files)."""
        base = (0, self._pos, len(self.view))[whence]
        self._pos = max(0, min(base + offset, len(self.view)))
        return self._pos

    def tell(self) -> int:
        """The read position."""
        return self._pos


def crc32c(data: bytes | bytearray | memoryview) -> str:
    """The `x-amz-checksum-crc32c` value of `data` (base64 of the big-endian CRC32C)."""
    return base64.b64encode(_crc32c.crc32c(data).to_bytes(4, "big")).decode()


async def checksum(view: memoryview) -> str:
    """CRC32C for the upload header; off the event loop for large bodies (`crc32c` drops
    the GIL)."""
    if len(view) >= 1 << 20:
        return await asyncio.to_thread(crc32c, view)
    return crc32c(view)


class BodyPayload(aiohttp.payload.Payload):
    """aiohttp's way of sending a `Body`: slices of the buffer, never the whole copied."""

    _value: Body

    def __init__(self, value: Body, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The body as text (aiohttp's interface; unused for uploads)."""
        return bytes(self._value.view).decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """The body as bytes (a copy; aiohttp calls this only for debugging output)."""
        return bytes(self._value.view)

    async def write(self, writer: AbstractStreamWriter) -> None:
        """Write the whole body."""
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        """Write at most `content_length` bytes of the body, a slice at a time, noting when
        each went (`Body.moved`) and when all had (`Body.sent`)."""
        body = self._value
        view = body.view
        if content_length is not None:
            view = view[:content_length]
        clock = asyncio.get_running_loop().time
        # Each send starts afresh: aiohttp sends a body again on a new connection when the
        # first closed under it (a PUT is idempotent to it).
        body.sent, body.moved, body.transport = False, clock(), writer.transport
        for start in range(0, len(view), SLICE):
            await writer.write(view[start : start + SLICE])
            body.moved = clock()
        body.sent = True


aiohttp.payload.PAYLOAD_REGISTRY.register(BodyPayload, Body)
