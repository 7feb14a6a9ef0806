"""A PostgreSQL catalog down under a running daemon: its API answers 503 (try again), which
the CLI and the job hooks take as exit 6, not a 500 taken for a failure; and the daemon
serves again once the server is back. The server is reached through a TCP forwarder the
test closes, as a restart or failover looks to the daemon: connections reset, then
refused."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.fixtures_catalog import PG_ENV, _pg_admin
from tests.fixtures_daemon import StartSite, with_token

PG_ONLY = pytest.mark.parametrize("new_catalog", ["postgresql"], indirect=True)


class Forwarder:
    """Forwards TCP connections from a loopback port to `upstream` until `down()`, which
    resets every connection and refuses new ones; `up()` listens on the same port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                conn.close()  # with a zero linger: a reset, as a server killed mid-answer

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


@PG_ONLY
async def test_a_catalog_server_down_is_a_503_and_exit_6_not_an_internal_error(
    served_site: StartSite, new_catalog: object
) -> None:
    url = await new_catalog()  # type: ignore[operator]
    parts = urlsplit(url)
    forwarder = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    forwarder.up()
    try:
        netloc = f"{parts.username}@127.0.0.1:{forwarder.port}"
        d = await served_site("site-b", catalog=urlunsplit(parts._replace(netloc=netloc)))
        token = d.token("t1", "/proj", "write")
        assert d.request("GET", "/v1/transfers", token)[0] == 200
        forwarder.down()
        # Before: 500 {"code": "internal"} with a traceback in the log, and exit 1 at the
        # client, which the Slurm prolog takes for a failure (the job not started).
        status, body = d.request("GET", "/v1/transfers", token)
        assert status == 503, body
        assert body["error"]["code"] == "catalog_unavailable", body
        assert body["error"]["message"].startswith("catalog unavailable: "), body
        env = with_token(d.env, token)
        proc = env.cli("stage", "/proj/ds", "--daemon", timeout=300)
        assert proc.returncode == 6, (proc.returncode, proc.stderr)
        assert "catalog unavailable" in proc.stderr, proc.stderr
        assert "Traceback" not in d.log()
        forwarder.up()
        status, body = d.request("GET", "/v1/transfers", token)
        assert status == 200, body
    finally:
        forwarder.down()


@PG_ONLY
async def test_a_catalog_database_dropped_under_the_daemon_is_exit_8_not_a_bug(
    served_site: StartSite, new_catalog: object
) -> None:
    url = await new_catalog()  # type: ignore[operator]
    d = await served_site("site-b", catalog=url)
    token = d.token("t1", "/proj", "write")
    assert d.request("GET", "/v1/transfers", token)[0] == 200
    name = urlsplit(url).path.lstrip("/")
    await _pg_admin(os.environ[PG_ENV], f'DROP DATABASE "{name}" WITH (FORCE)')
    # Before: 500 {"code": "internal"}, exit 70 ("a bug; see the daemon's log").
    status, body = d.request("GET", "/v1/transfers", token)
    assert status == 503 and body["error"]["code"] == "catalog", body
    assert f'database "{name}" does not exist' in body["error"]["message"], body
    proc = with_token(d.env, token).cli("transfer", "list")
    assert proc.returncode == 8, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr
    assert "Traceback" not in d.log()


def test_a_daemons_internal_error_is_exit_70_at_its_client() -> None:
    """A daemon's 500 `internal` (a bug, its traceback in the daemon's log) had reached
    scripts as exit 1, which the README gives to `verify` differences and refusals."""
    from datamover.client import error_from
    from datamover.errors import InternalError

    exc = error_from(500, {"error": {"code": "internal", "message": "internal error"}})
    assert isinstance(exc, InternalError) and exc.exit_code == 70
    # A transfer a worker's bug ended (recorded with `InternalError`'s code): the same at a
    # `--wait`ing client (a job's prolog), not exit 1.
    from datamover.client import transfer_error

    ended = {"id": "tr-1", "state": "failed", "error": {"code": "internal", "message": "x"}}
    assert transfer_error(ended).exit_code == 70


class _Refused(Exception):
    """A PostgreSQL error as asyncpg's adaptation carries it: a SQLSTATE and a message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "message", "permanent"),
    [
        ("3D000", 'database "dm" does not exist', True),
        ("28P01", 'password authentication failed for user "dm"', True),
        ("28000", 'role "dm" does not exist', True),
        ("28000", 'no pg_hba.conf entry for host "10.0.0.5", user "dm"', True),
        ("28000", 'role "dm" is not permitted to log in', True),
        ("28000", 'pg_hba.conf rejects connection for host "10.0.0.5", user "dm"', True),
        ("28000", "Rolle »dm« existiert nicht", True),  # a server of lc_messages de_DE
        # Its LDAP server down: PostgreSQL says 28000 too, and it passes.
        ("28000", 'LDAP authentication failed for user "dm"', False),
    ],
)
def test_a_refused_login_is_a_catalog_error_only_where_it_needs_a_person(
    sqlstate: str, message: str, permanent: bool
) -> None:
    from sqlalchemy.exc import DBAPIError

    from datamover.catalog.engine import catalog_outage
    from datamover.errors import CatalogError, CatalogUnavailable

    exc = DBAPIError("SELECT 1", None, _Refused(sqlstate, message))
    found = catalog_outage(exc, catalog_only=True)
    assert isinstance(found, CatalogError if permanent else CatalogUnavailable), found
    assert message in found.message


@PG_ONLY
async def test_a_role_that_does_not_exist_is_a_catalog_error(new_catalog: object) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from datamover.catalog.engine import catalog_outage
    from datamover.errors import CatalogError

    url = urlsplit(await new_catalog())  # type: ignore[operator]
    netloc = f"no_such_role_dm@{url.hostname}:{url.port or 5432}"
    engine = create_async_engine(
        urlunsplit(url._replace(netloc=netloc, scheme="postgresql+asyncpg"))
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # the error under test
        found = catalog_outage(exc, catalog_only=True)
    else:
        raise AssertionError("a role that does not exist was let in")
    finally:
        await engine.dispose()
    assert isinstance(found, CatalogError) and "no_such_role_dm" in found.message
