"""Catalog fixtures: every catalog test runs on SQLite and on PostgreSQL.

PostgreSQL runs need `DATAMOVER_TEST_POSTGRES_URL` (e.g.
`postgresql://postgres@127.0.0.1:5432/test`, which `.ci/run` sets); each catalog a test asks
for is a fresh database created on that server, dropped with others later (`_UNDROPPED`).
Without the variable the PostgreSQL runs are reported as skipped, never silently passed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

PG_ENV = "DATAMOVER_TEST_POSTGRES_URL"

NewCatalog = Callable[[], Awaitable[str]]


async def _pg_admin(url: str, sql: str) -> None:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username or "postgres",
        password=u.password,
        database=u.database or "postgres",
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def new_catalog(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NewCatalog]:
    """A factory of URLs of fresh, empty catalogs on the parametrized engine."""
    created: list[str] = []
    server = os.environ.get(PG_ENV)
    if request.param == "postgresql" and not server:
        pytest.skip(f"PostgreSQL run: set {PG_ENV} to a server URL to run it")

    async def make() -> str:
        name = f"dm_test_{secrets.token_hex(6)}"
        if request.param == "sqlite":
            return f"sqlite:///{tmp_path / (name + '.db')}"
        assert server is not None
        await _pg_admin(server, f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_url(server).set(database=name).render_as_string(hide_password=False)

    yield make
    if created:
        assert server is not None
        _UNDROPPED.extend((server, name) for name in created)
        if len(_UNDROPPED) >= _DROP_EVERY:
            await drop_undropped()


#: Test databases not dropped yet, `(server URL, name)`: dropped `_DROP_EVERY` at a time and
#: at the end of the session (`drop_undropped`). Each DROP DATABASE makes the server write
#: out every dirty buffer first (a checkpoint): under the suite's load one drop per test took
#: 0.6 s on average and up to 6 s, a tenth of the suite's time, where a drop right after
#: another has little to write.
_UNDROPPED: list[tuple[str, str]] = []
_DROP_EVERY = 25


async def drop_undropped() -> None:
    """Drop every test database still in `_UNDROPPED`."""
    while _UNDROPPED:
        server, name = _UNDROPPED.pop()
        await _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def catalog_url(new_catalog: NewCatalog) -> str:
    """The URL of one fresh, empty catalog on each engine."""
    return await new_catalog()
