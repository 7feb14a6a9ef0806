"""The transfers' history on both engines: the index that finds ended transfers by age."""

from __future__ import annotations

from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from datamover.catalog.engine import HEAD, _alembic_config, create_engine_for, upgrade
from datamover.catalog.transfers import Submission, Transfers


def _indexes(conn: Connection) -> dict[str, Any]:
    return {i["name"]: i["column_names"] for i in inspect(conn).get_indexes("transfers")}


def _downgrade(conn: Connection, revision: str) -> None:
    from alembic import command

    cfg = _alembic_config()
    cfg.attributes["connection"] = conn
    command.downgrade(cfg, revision)


async def test_an_upgrade_indexes_transfers_by_their_end_and_keeps_them(catalog_url: str) -> None:
    engine = create_engine_for(catalog_url)
    try:
        await upgrade(engine, "0004")
        old, _ = await Transfers(engine).submit(Submission("t1", "stage", "/proj/x"))
        async with engine.connect() as conn:
            assert "ix_transfers_finished" not in await conn.run_sync(_indexes)
        assert await upgrade(engine) == ("0004", HEAD)
        async with engine.connect() as conn:
            assert (await conn.run_sync(_indexes))["ix_transfers_finished"] == ["finished_at"]
        assert (await Transfers(engine).get(old.id)).state == "queued"
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "0004")
        async with engine.connect() as conn:
            assert "ix_transfers_finished" not in await conn.run_sync(_indexes)
        assert (await Transfers(engine).get(old.id)).state == "queued"
    finally:
        await engine.dispose()
