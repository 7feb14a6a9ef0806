"""Alembic environment. datamover runs migrations in-process on an existing connection
(`datamover db upgrade`, or a fresh catalog on first use); plain `alembic` with `-x url=...`
works too for operators who prefer it."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from datamover.catalog.models import metadata

config = context.config
target_metadata = metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from datamover.catalog.engine import create_engine_for

    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )

    async def main() -> None:
        engine = create_engine_for(url)
        async with engine.begin() as conn:
            await conn.run_sync(_run)
        await engine.dispose()

    asyncio.run(main())


_run_online()
