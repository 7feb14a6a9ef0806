"""A ranged GET that fails to connect, on the threaded path (direct.py) as on aiohttp's: a
host name that does not resolve is the store unavailable (retried), a certificate that
fails verification a permanent error (not retried), the same on both paths.

Before: the threaded path connected outside the block that maps failures, so a DNS failure
(`socket.gaierror`), no route to the host (`EHOSTUNREACH`) and a certificate refused
(`ssl.SSLCertVerificationError`) came out of the store as they were: never retried, and a
daemon transfer ended as "internal error".
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from datamover.errors import PermanentError, StoreUnavailable
from datamover.storage.s3 import S3Store
from tests.tls import self_signed

PATHS = pytest.mark.parametrize("direct_min", [1, 1 << 40], ids=["direct", "aiohttp"])


@PATHS
async def test_a_host_name_that_does_not_resolve_is_the_store_unavailable(
    direct_min: int,
) -> None:
    store = S3Store(
        "http://no-such-host.invalid:8333", "b", access_key="a", secret_key="b",
        direct_min=direct_min,
    )  # fmt: skip
    try:
        with pytest.raises(StoreUnavailable, match=r"no-such-host\.invalid"):
            await store.get("k", 0, 10)  # before (direct): socket.gaierror
    finally:
        await store.close()


@contextlib.contextmanager
def _untrusted_tls_server(tmp_path: Path) -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate (trusted by no CA
    bundle); its URL."""
    cert, key = self_signed(tmp_path)

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.handle_error = lambda *args: None  # type: ignore[method-assign]  # refused handshakes
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@PATHS
async def test_a_certificate_that_fails_verification_is_a_permanent_error(
    tmp_path: Path, direct_min: int
) -> None:
    with _untrusted_tls_server(tmp_path) as url:
        store = S3Store(url, "b", access_key="a", secret_key="b", direct_min=direct_min)
        try:
            with pytest.raises(PermanentError, match="TLS with S3 endpoint") as info:
                await store.get("k", 0, 10)  # before (direct): ssl.SSLCertVerificationError
            assert not isinstance(info.value, StoreUnavailable)
            assert url in str(info.value)
        finally:
            await store.close()
