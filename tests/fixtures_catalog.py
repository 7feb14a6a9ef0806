"""Catalog fixtures: every catalog test runs on SQLite and on PostgreSQL.

PostgreSQL runs need `DATAMOVER_TEST_POSTGRES_URL` (e.g.
`postgresql://postgres@127.0.0.1:5432/test`, which `.ci/run` sets); each test gets a fresh
database created from that server and dropped afterwards. Without the variable the
PostgreSQL runs are reported as skipped, never silently passed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

PG_ENV = "DATAMOVER_TEST_POSTGRES_URL"


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
async def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A URL of an empty catalog database on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
        return
    server = os.environ.get(PG_ENV)
    if not server:
        pytest.skip(f"PostgreSQL run: set {PG_ENV} to a server URL to run it")
    name = f"dm_test_{secrets.token_hex(6)}"
    await _pg_admin(server, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        await _pg_admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
