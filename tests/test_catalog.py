"""The catalog on both engines: creation, migration checks, bulk chunk index, records."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from datamover.catalog.engine import (
    HEAD,
    cannot_open,
    catalog_revision,
    create_engine_for,
    head_revision,
    open_engine,
    upgrade,
)
from datamover.catalog.queries import Catalog
from datamover.domain.manifest import ChunkRef
from datamover.errors import CatalogError, CatalogUnavailable, Conflict, InvalidInput
from datamover.repo.layout import VersionDoc
from datamover.repo.manifest import SegmentRef
from tests.fixtures_catalog import PG_ENV


def test_head_constant_matches_the_migration_scripts() -> None:
    assert head_revision() == HEAD


async def test_fresh_catalog_is_created_on_first_use(catalog_url: str) -> None:
    engine = await open_engine(catalog_url)
    try:
        current, has_tables = await catalog_revision(engine)
        assert current == head_revision()
        assert has_tables
    finally:
        await engine.dispose()
    engine = await open_engine(catalog_url)  # and opened again as it is
    await engine.dispose()


async def test_a_catalog_is_the_first_sites_to_open_it(catalog_url: str) -> None:
    # Before, a second site's configuration naming the first one's catalog started a daemon
    # that took the first site's queued stages and ran them at its own paths.
    for site in ("hpc-a", "hpc-a", None):  # claimed, then its own again; unchecked
        engine = await open_engine(catalog_url, site)
        await engine.dispose()
    with pytest.raises(CatalogError, match="belongs to site 'hpc-a', not to 'hpc-b'") as err:
        await open_engine(catalog_url, "hpc-b")
    assert "catalog of its own" in str(err.value) and "\n" not in str(err.value)
    engine = await open_engine(catalog_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, name FROM catalog_site"))).all()
        assert [tuple(r) for r in rows] == [(1, "hpc-a")]  # the refused site recorded nothing
    finally:
        await engine.dispose()


def test_a_second_site_on_a_catalog_is_refused_by_every_command(tmp_path: Path) -> None:
    catalog = f"sqlite:///{tmp_path / 'shared.db'}"

    def config(name: str, api: str = "") -> Path:
        path = tmp_path / f"{name}{'-api' if api else ''}.toml"
        path.write_text(
            api + f'[site]\nname = "{name}"\ncatalog = "{catalog}"\n'
            f'state_dir = "{tmp_path / name / "state"}"\n'
            '[store]\nendpoint = "http://127.0.0.1:1"\nbucket = "bkt"\n'
            'access_key = "k"\nsecret_key = "s"\n'
            f'[namespace]\n"/proj" = "{tmp_path / name / "data"}"\n'
        )
        return path

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "datamover", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    made = run(
        "token",
        "create",
        "--tenant",
        "t",
        "--prefix",
        "/proj",
        "--scope",
        "read",
        "--config",
        str(config("site-a")),
    )
    assert made.returncode == 0, made.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = f'[api]\nlisten = "127.0.0.1:{probe.getsockname()[1]}"\n'
    for args in (["ls"], ["pins"], ["token", "revoke", "tok-x"], ["serve"]):
        r = run(*args, "--config", str(config("site-b", listen if args == ["serve"] else "")))
        assert r.returncode == 8, (args, r.stderr)
        assert r.stderr.splitlines() == [
            f"datamover: error: catalog {catalog} belongs to site 'site-a', not to 'site-b' "
            "([site] name): each site needs a catalog of its own"
        ], (args, r.stderr)
    assert not (tmp_path / "site-b" / "data").exists()


async def test_migrations_and_models_give_the_same_schema(catalog_url: str) -> None:
    # A fresh catalog is created from the models (engine.create_fresh); an old one reaches the
    # same schema through the migrations. alembic's autogenerate comparison sees no difference.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from datamover.catalog.models import metadata

    def diffs(conn: Any) -> list[Any]:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))

    engine = create_engine_for(catalog_url)
    await upgrade(engine)
    async with engine.connect() as conn:
        assert await conn.run_sync(diffs) == []
        assert await conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.execute(text("DROP TABLE alembic_version"))
    await engine.dispose()

    engine = await open_engine(catalog_url)  # empty again: created from the models
    async with engine.connect() as conn:
        assert await conn.run_sync(diffs) == []
        assert await conn.scalar(text("SELECT version_num FROM alembic_version")) == HEAD
    await engine.dispose()
    engine = create_engine_for(catalog_url)
    assert await upgrade(engine) == (HEAD, HEAD)  # alembic agrees it is at the head
    await engine.dispose()


async def test_catalog_behind_the_code_names_db_upgrade(catalog_url: str) -> None:
    engine = create_engine_for(catalog_url)
    await upgrade(engine, "0001")
    await engine.dispose()
    with pytest.raises(CatalogError, match="datamover db upgrade"):
        await open_engine(catalog_url)
    engine = create_engine_for(catalog_url)
    before, after = await upgrade(engine)
    await engine.dispose()
    assert (before, after) == ("0001", head_revision())
    engine = await open_engine(catalog_url)
    await engine.dispose()


async def test_catalog_from_a_newer_datamover_is_refused(catalog_url: str) -> None:
    engine = await open_engine(catalog_url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'zz99'"))
    await engine.dispose()
    with pytest.raises(CatalogError, match="unknown to this datamover"):
        await open_engine(catalog_url)


async def test_bad_catalog_urls() -> None:
    with pytest.raises(InvalidInput, match="only sqlite and postgresql"):
        create_engine_for("mysql://x/y")
    with pytest.raises(InvalidInput, match="not a valid database URL"):
        create_engine_for("::nonsense::")
    # A server that refuses the connection may take it later (a restart): exit 6, which
    # a hook retries, not 8, which asks a person.
    with pytest.raises(CatalogUnavailable, match=r"cannot be opened: .*Connect call failed"):
        await open_engine("postgresql://nobody@127.0.0.1:1/none")


def test_an_unreachable_catalog_server_is_an_outage() -> None:
    # Every address of a name refusing (asyncio's "Multiple exceptions", errno None), no
    # route to the host: a later try may succeed, as for one refused connection.
    several = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 5432)"
    )
    for exc in (several, OSError(errno.EHOSTUNREACH, "No route to host")):
        assert isinstance(cannot_open("catalog x cannot be opened", exc), CatalogUnavailable)
    assert type(cannot_open("x", OSError(errno.EACCES, "Permission denied"))) is CatalogError


async def test_a_missing_database_is_no_outage() -> None:
    server = os.environ.get(PG_ENV)
    if not server:
        pytest.skip(f"PostgreSQL run: set {PG_ENV} to a server URL to run it")
    url = make_url(server).set(database="no_such_database_here").render_as_string(False)
    with pytest.raises(CatalogError, match='database "no_such_database_here" does not exist'):
        await open_engine(url)


def test_a_catalog_that_refuses_is_exit_6_for_every_command(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        '[site]\nname = "a"\ncatalog = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[store]\nendpoint = "http://127.0.0.1:1"\nbucket = "bkt"\n'
        'access_key = "k"\nsecret_key = "s"\n'
        f'[namespace]\n"/proj" = "{tmp_path / "data"}"\n'
    )
    for args in (["ls"], ["db", "upgrade"]):
        r = subprocess.run(
            [sys.executable, "-m", "datamover", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 6, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "Connect call failed" in r.stderr, r.stderr


async def test_chunk_index_bulk_insert_and_lookup(catalog_url: str) -> None:
    catalog = Catalog(await open_engine(catalog_url))
    try:
        pack = os.urandom(32)
        refs = [ChunkRef(os.urandom(32), pack, i * 10, 10, 20, 1) for i in range(12_000)]
        await catalog.add_pack(pack, 120_000, refs)
        await catalog.add_pack(pack, 120_000, refs[:10])  # a rerun is harmless
        assert await catalog.count_chunks() == 12_000
        wanted = [r.digest for r in refs[::7]] + [os.urandom(32)]
        found = await catalog.lookup_chunks(wanted)
        assert len(found) == len(refs[::7])
        assert found[refs[7].digest] == refs[7]
    finally:
        await catalog.close()


async def test_a_pack_recorded_without_chunks_is_recorded(catalog_url: str) -> None:
    # Before: on SQLite the chunk insert was sent an empty list, which the driver refuses
    # ("Incorrect number of bindings supplied"); PostgreSQL took it.
    catalog = Catalog(await open_engine(catalog_url))
    try:
        pack = os.urandom(32)
        assert await catalog.add_packs([(pack, 100, [])]) == 0
        assert await catalog.add_packs([]) == 0
        assert await catalog.known_packs([pack]) == {pack}
    finally:
        await catalog.close()


async def test_a_pack_found_gone_is_forgotten_with_its_chunks(catalog_url: str) -> None:
    # Before: its chunk rows went and its pack row stayed, so once it came back (a bucket
    # restored) `db rebuild` took it as indexed and never indexed its chunks again.
    catalog = Catalog(await open_engine(catalog_url))
    try:
        gone, kept = os.urandom(32), os.urandom(32)
        refs = [ChunkRef(os.urandom(32), gone, i * 10, 10, 20, 1) for i in range(3)]
        await catalog.add_pack(gone, 100, refs)
        await catalog.add_pack(kept, 100, [ChunkRef(os.urandom(32), kept, 0, 10, 20, 1)])
        await catalog.forget_chunks([r.digest for r in refs[:2]], {gone})
        assert await catalog.known_packs([gone, kept]) == {kept}
        assert list(await catalog.lookup_chunks([r.digest for r in refs])) == [refs[2].digest]
    finally:
        await catalog.close()


async def test_a_replica_record_is_given_back_as_it_was(catalog_url: str) -> None:
    # A stage that ended before it changed the tree gives the record back as it found it
    # (`stage._record_failure`), so a push of that tree is not refused.
    catalog = Catalog(await open_engine(catalog_url))
    try:
        assert await catalog.begin_replica("/p/x", "/data/x", "v1", None, "host:1") is None
        await catalog.restore_replica("/p/x", "v1", "host:1", None)
        assert await catalog.replica("/p/x") is None  # there was none
        await catalog.begin_replica("/p/x", "/data/x", "v1", None, "host:1")
        assert await catalog.finish_replica("/p/x", "v1", "ready", 3, 30, owner="host:1")
        ready = await catalog.replica("/p/x")
        assert ready is not None and ready.updated_at is not None
        before = await catalog.begin_replica("/p/x", "/data/x", "v2", "v1", "host:2")
        assert before == ready
        await catalog.restore_replica("/p/x", "v2", "host:2", before)
        assert await catalog.replica("/p/x") == ready  # every field, times included
        # Only a record that still is that stage's: not one another stage took since, nor
        # one already recorded as failed.
        await catalog.begin_replica("/p/x", "/data/x", "v2", "v1", "host:3")
        await catalog.restore_replica("/p/x", "v2", "host:2", before)
        await catalog.restore_replica("/p/x", "v3", "host:3", before)
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.owner) == ("staging", "host:3")
        # Ending ready only while the record is still that stage's.
        assert not await catalog.finish_replica("/p/x", "v2", "ready", 3, 30, owner="host:2")
        assert not await catalog.finish_replica("/p/x", "v1", "ready", 3, 30, owner="host:3")
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.owner) == ("staging", "host:3")
        await catalog.finish_replica("/p/x", "v2", "failed", 0, 0)
        await catalog.restore_replica("/p/x", "v2", "host:3", before)
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.version) == ("failed", "v2")
    finally:
        await catalog.close()


async def test_replica_and_checkpoint_records(catalog_url: str) -> None:
    catalog = Catalog(await open_engine(catalog_url))
    try:
        assert await catalog.replica("/p/x") is None
        await catalog.begin_replica("/p/x", "/data/x", "v2", "v1", "host:1")
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.version, row.base_version) == (
            "staging",
            "v2",
            "v1",
        )
        assert row.held_since_ns is None  # a tree being staged holds no version
        before = time.time_ns()
        await catalog.finish_replica("/p/x", "v2", "ready", 3, 30)
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.base_version, row.files) == ("ready", "v2", 3)
        assert (
            row.held_since_ns is not None and before - 1000 <= row.held_since_ns <= time.time_ns()
        )
        pushed_at = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)
        await catalog.pushed_replica("/p/x", "/data/x", "v3", 3, 30, pushed_at)
        row = await catalog.replica("/p/x")
        assert row is not None and row.held_since_ns == 1796551200_123456_000
        again = await catalog.begin_replica("/p/x", "/data/x", "v4", "v3", "host:1")
        assert again is not None and again.held_since_ns == 1796551200_123456_000
        await catalog.restore_replica("/p/x", "v4", "host:1", again)
        row = await catalog.replica("/p/x")
        assert row is not None and (row.version, row.held_since_ns) == ("v3", 1796551200_123456_000)
        # A stage of the same tree keeps the time until it ends ready, also when it fails.
        await catalog.begin_replica("/p/x", "/data/x", "v4", "v3", "host:1")
        await catalog.finish_replica("/p/x", "v4", "failed", 0, 0)
        row = await catalog.replica("/p/x")
        assert row is not None and (row.state, row.held_since_ns) == (
            "failed",
            1796551200_123456_000,
        )
        began = datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
        await catalog.begin_replica("/p/x", "/elsewhere/x", "v4", None, "host:1", began)
        row = await catalog.replica("/p/x")  # another tree: known from the stage's start
        assert row is not None and row.root == "/elsewhere/x"
        assert row.held_since_ns == 1796554800 * 10**9

        assert await catalog.checkpoint("/p/x") is None
        began = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)
        await catalog.start_checkpoint(
            "/p/x", "v1", "host:2", keep_segments=False, root="/d/x", started_at=began
        )
        seg = SegmentRef(os.urandom(32), 100, 5, "a", "e", 50)
        more = [SegmentRef(os.urandom(32), 90, 4, f"f{i}", f"g{i}", 40) for i in range(3)]
        await catalog.add_checkpoint_segments("/p/x", [(0, seg)])
        await catalog.add_checkpoint_segments("/p/x", [(0, seg)])  # idempotent
        await catalog.add_checkpoint_segments("/p/x", [])
        found = await catalog.checkpoint("/p/x")
        assert found is not None
        assert (found.parent, found.owner, found.root) == ("v1", "host:2", "/d/x")
        assert found.started_ns == 1796547600 * 10**9
        later = datetime(2026, 12, 6, 9, 30, tzinfo=UTC)
        await catalog.start_checkpoint("/p/x", "v1", "host:2", True, found, "/d/x", later)
        resumed = await catalog.checkpoint("/p/x")  # its segments keep their run's time
        assert resumed is not None and resumed.started_ns == 1796547600 * 10**9
        found = resumed
        assert await catalog.checkpoint_segments("/p/x") == [seg]
        await catalog.add_checkpoint_segments("/p/x", [(2, more[1]), (1, more[0]), (3, more[2])])
        assert await catalog.checkpoint_segments("/p/x") == [seg, *more]
        # A rerun's segment 1 replaces the interrupted run's rows from 1 on: one run's list.
        await catalog.add_checkpoint_segments("/p/x", [(1, more[2])])
        assert await catalog.checkpoint_segments("/p/x") == [seg, more[2]]
        await catalog.start_checkpoint("/p/x", "v1", "host:3", keep_segments=False, found=found)
        assert await catalog.checkpoint_segments("/p/x") == []
        taken = await catalog.checkpoint("/p/x")
        assert taken is not None and (taken.owner, taken.root) == ("host:3", None)
        await catalog.clear_checkpoint("/p/x")
        assert await catalog.checkpoint("/p/x") is None
    finally:
        await catalog.close()


async def test_a_push_whose_checkpoint_was_taken_over_writes_into_it_no_more(
    catalog_url: str,
) -> None:
    # Before: a push stopped past the holder timeout (SIGSTOP, a paused VM) went on after
    # another push had taken its checkpoint over, replaced that push's rows from its own
    # seq on and cleared the checkpoint after publishing: a later kill could resume from
    # a list mixed from two runs.
    catalog = Catalog(await open_engine(catalog_url))
    try:
        await catalog.start_checkpoint("/p/x", "v1", "host:1", keep_segments=False)
        stale = [SegmentRef(os.urandom(32), 90, 4, f"a{i}", f"b{i}", 40) for i in range(2)]
        await catalog.add_checkpoint_segments("/p/x", [(0, stale[0])], "host:1")
        found = await catalog.checkpoint("/p/x")
        await catalog.start_checkpoint("/p/x", "v1", "host:2", keep_segments=False, found=found)
        current = SegmentRef(os.urandom(32), 80, 3, "a0", "c0", 30)
        await catalog.add_checkpoint_segments("/p/x", [(0, current)], "host:2")
        with pytest.raises(Conflict, match="taken over by another push"):
            await catalog.add_checkpoint_segments("/p/x", [(0, stale[1])], "host:1")
        await catalog.clear_checkpoint("/p/x", "host:1")  # not its own any more: left
        assert await catalog.checkpoint_segments("/p/x") == [current]
        found = await catalog.checkpoint("/p/x")
        assert found is not None and found.owner == "host:2"
        await catalog.clear_checkpoint("/p/x", "host:2")
        assert await catalog.checkpoint("/p/x") is None
    finally:
        await catalog.close()


async def test_version_cache(catalog_url: str) -> None:
    catalog = Catalog(await open_engine(catalog_url))
    doc = VersionDoc(
        "/p/x",
        "20261129T181500.000001Z-a-00000000",
        None,
        "a",
        "2026-11-29T18:15:00.000001Z",
        "00" * 32,
        10,
        1,
        2,
        3,
        0,
        4,
    )
    try:
        await catalog.record_versions([doc, doc])
        assert await catalog.cached_versions([doc.version, "nope"]) == {doc.version: doc}
    finally:
        await catalog.close()


async def test_replica_records_are_read_a_page_at_a_time(catalog_url: str) -> None:
    catalog = Catalog(await open_engine(catalog_url))
    try:
        names = ["/p/a", "/p/a/b", "/p/b", "/PROJ/x", "/q/x", "/pp"]
        for i, name in enumerate(names):
            await catalog.begin_replica(name, "/data" + name, "v1", None, "host:1")
            await catalog.finish_replica(name, "v1", "ready", 1, 10 * (i + 1))
        assert [r.dataset for r in await catalog.replicas()] == sorted(names)
        assert [r.dataset for r in await catalog.replicas(prefixes=["/p"])] == [
            "/p/a",
            "/p/a/b",
            "/p/b",
        ]
        pages, after = [], None
        while True:
            page = await catalog.replicas(prefixes=["/p", "/q"], after=after, limit=2)
            pages.append([r.dataset for r in page])
            if len(page) < 2:
                break
            after = page[-1].dataset
        assert pages == [["/p/a", "/p/a/b"], ["/p/b", "/q/x"], []]
        assert await catalog.replicas(prefixes=[]) == []
        assert await catalog.replica_bytes() == 210
    finally:
        await catalog.close()


def test_a_sqlite_catalog_that_cannot_be_opened_is_one_line_every_time(tmp_path: Path) -> None:
    # aiosqlite answered the stop of the connection that failed to open on an event loop
    # the CLI had closed: a traceback followed the error line in about one run in four.
    config = tmp_path / "site.toml"
    config.write_text(
        '[site]\nname = "a"\ncatalog = "sqlite:////proc/catalog.db"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[store]\nendpoint = "http://127.0.0.1:1"\nbucket = "bkt"\n'
        'access_key = "k"\nsecret_key = "s"\n'
        f'[namespace]\n"/proj" = "{tmp_path / "data"}"\n'
    )
    for _ in range(10):
        r = subprocess.run(
            [sys.executable, "-m", "datamover", "pins", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 8, r.stderr
        assert r.stderr.splitlines() == [
            "datamover: error: catalog sqlite:////proc/catalog.db cannot be opened: "
            "unable to open database file"
        ]
