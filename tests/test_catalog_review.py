"""Review of the catalog, namespace, config and verify: each test shows one defect that was
fixed (it failed before the fix). Catalog tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from datamover.catalog.access import Access
from datamover.catalog.engine import HEAD, catalog_revision, create_engine_for, open_engine, upgrade
from datamover.catalog.models import metadata
from datamover.catalog.transfer_rows import Submission
from datamover.catalog.transfers import Transfers
from datamover.config import load_config
from datamover.domain.namespace import Namespace
from datamover.errors import CatalogError, InvalidInput
from datamover.transfer.push import push
from datamover.transfer.stage import stage
from datamover.transfer.verify import verify
from tests.fixtures_catalog import NewCatalog
from tests.fixtures_sites import MakeSite
from tests.treegen import make_tree

# -- catalog creation and migration ------------------------------------------------------


async def test_workers_starting_together_on_a_new_catalog_all_open_it(
    new_catalog: NewCatalog,
) -> None:
    # Several workers (or a daemon and a CLI) opening a new catalog at once: each saw it
    # empty and created the schema; all but one failed ("table chunks already exists",
    # "duplicate key value violates unique constraint pg_type_typname_nsp_index"), and on
    # SQLite switching the new file to WAL failed at once with "database is locked".
    for _ in range(8):
        url = await new_catalog()
        opened = await asyncio.gather(*(open_engine(url) for _ in range(4)), return_exceptions=True)
        try:
            assert [type(e).__name__ for e in opened] == ["AsyncEngine"] * 4, opened
        finally:
            for engine in opened:
                if not isinstance(engine, BaseException):
                    await engine.dispose()


async def test_an_interrupted_creation_leaves_no_half_catalog(
    catalog_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On SQLite every CREATE TABLE committed on its own, so a creation interrupted after the
    # tables (killed, disk full) left tables without a revision, and every later command was
    # refused ("schema revision None, unknown to this datamover (is it newer?)").
    create_all = metadata.create_all

    def interrupted(conn: Any, **kw: Any) -> None:
        create_all(conn, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metadata, "create_all", interrupted)
    with pytest.raises(CatalogError, match="No space left"):
        await open_engine(catalog_url)
    monkeypatch.setattr(metadata, "create_all", create_all)

    engine = await open_engine(catalog_url)
    try:
        assert await catalog_revision(engine) == (HEAD, True)
    finally:
        await engine.dispose()


async def test_an_interrupted_upgrade_can_be_run_again(catalog_url: str) -> None:
    # `datamover db upgrade` stopped half way (here: 0003 meets a table in its way after it
    # created `transfers`). On SQLite the tables it had made stayed, so once the cause was
    # gone the upgrade failed again, forever: "table transfers already exists".
    engine = create_engine_for(catalog_url)
    try:
        await upgrade(engine, "0002")
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE pins (x INTEGER)"))
        with pytest.raises(Exception, match="pins"):
            await upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE pins"))
        assert await upgrade(engine) == ("0002", HEAD)
    finally:
        await engine.dispose()
    engine = await open_engine(catalog_url)
    await engine.dispose()


async def test_a_database_of_something_else_is_named_as_such(catalog_url: str) -> None:
    engine = create_engine_for(catalog_url)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE invoices (x INTEGER)"))
    await engine.dispose()
    with pytest.raises(CatalogError, match="no datamover schema revision"):
        await open_engine(catalog_url)


async def test_db_upgrade_leaves_a_database_of_something_else_alone(catalog_url: str) -> None:
    # Before: `open_engine` refused such a database, but `datamover db upgrade`, what a user
    # tries next, ran every migration into it: nine datamover tables and `alembic_version`
    # in another program's database, which every later command then took for a catalog.
    engine = create_engine_for(catalog_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE invoices (x INTEGER)"))
        with pytest.raises(CatalogError, match="no datamover schema revision"):
            await upgrade(engine)
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert tables == {"invoices"}
    finally:
        await engine.dispose()


# -- the transfer queue ---------------------------------------------------------------------


async def test_prefix_filters_are_exact_on_both_engines(catalog_url: str) -> None:
    # Listing by a token's prefixes (or `?path=`) used LIKE, which SQLite applies without
    # regard to ASCII case: a token for `/proj` saw its tenant's transfers under `/PROJ` on
    # SQLite and not on PostgreSQL.
    engine = await open_engine(catalog_url)
    try:
        queue = Transfers(engine)
        for path in ("/PROJ/x", "/proj", "/proj/y", "/Proj/z", "/proj_a/b", "/pr%j/c"):
            await queue.submit(Submission("t", "stage", path))

        async def paths(**filters: Any) -> list[str]:
            return sorted(r.path for r in await queue.list(**filters))

        assert await paths(prefixes=["/proj"]) == ["/proj", "/proj/y"]
        assert await paths(path_prefix="/proj") == ["/proj", "/proj/y"]
        assert await paths(path_prefix="/PROJ") == ["/PROJ/x"]
        assert await paths(prefixes=["/pr%j", "/proj_a"]) == ["/pr%j/c", "/proj_a/b"]
        assert len(await paths(prefixes=["/"])) == 6
        assert await paths(prefixes=[]) == []
    finally:
        await engine.dispose()


# -- pins -----------------------------------------------------------------------------------


async def _pin_rows(access: Access) -> list[tuple[str, str, str]]:
    return [(p.tenant, p.pin, p.dataset) for p in await access.pins()]


async def test_two_tenants_pinning_one_pin_id_hold_it_apart(catalog_url: str) -> None:
    # A pin id is the client's (a Slurm job id): the table was keyed by (pin, dataset), so a
    # second tenant's `slurm-7` on the same dataset merged into the first one's row, and the
    # first tenant's release took away the hold the second one's job still relied on.
    engine = await open_engine(catalog_url)
    try:
        access, queue = Access(engine), Transfers(engine)
        await access.add_pin("slurm-7", "/proj/x", "t1", "v1")
        await access.add_pin("slurm-7", "/proj/x", "t2", "v2")
        assert await _pin_rows(access) == [
            ("t1", "slurm-7", "/proj/x"),
            ("t2", "slurm-7", "/proj/x"),
        ]
        # A stage's pin is its submitter's: the worker adds it under the transfer's tenant.
        staged, _ = await queue.submit(Submission("t3", "stage", "/proj/x", pin="slurm-7"))
        assert (await queue.claim("w", 30)).id == staged.id  # pinned as its run ends
        assert await access.pin_for_transfer(staged.id, "/proj/x", "v3")
        assert (await _pin_rows(access))[2] == ("t3", "slurm-7", "/proj/x")
        assert [p.version for p in await access.pins(tenant="t2")] == ["v2"]
        assert await access.release("slurm-7", "t1") == 1
        assert await _pin_rows(access) == [
            ("t2", "slurm-7", "/proj/x"),
            ("t3", "slurm-7", "/proj/x"),
        ]
        assert (await queue.get(staged.id)).pin == "slurm-7"  # t1's release left t3's alone
        assert await access.release("slurm-7", "t2") == 1
        assert await _pin_rows(access) == [("t3", "slurm-7", "/proj/x")]
    finally:
        await engine.dispose()


async def test_pinning_again_answers_the_pin_the_catalog_keeps(catalog_url: str) -> None:
    # Pinning again updates only the version: the catalog keeps the first created_at, but
    # the answer (POST /v1/pins) gave the time of the repeat.
    engine = await open_engine(catalog_url)
    try:
        access = Access(engine)
        first = await access.add_pin("slurm-7", "/proj/x", "t1", "v1")
        await asyncio.sleep(0.01)
        again = await access.add_pin("slurm-7", "/proj/x", "t1", "v2")
        [held] = await access.pins()
        assert again.created_at == first.created_at == held.created_at
        assert again.version == held.version == "v2"
    finally:
        await engine.dispose()


async def test_an_upgrade_keeps_existing_pins_under_the_tenant_they_record(
    catalog_url: str,
) -> None:
    # A catalog of revision 0003 holds pins keyed by (pin, dataset): it is refused until
    # `datamover db upgrade`, which keys them by tenant too and keeps every row as it was.
    engine = create_engine_for(catalog_url)
    try:
        await upgrade(engine, "0003")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO pins (pin, dataset, tenant, version, created_at) "
                    "VALUES ('slurm-7', '/proj/x', 't1', 'v1', :at)"
                ),
                {"at": datetime(2026, 11, 29, tzinfo=UTC)},
            )
    finally:
        await engine.dispose()
    with pytest.raises(CatalogError, match="run `datamover db upgrade`"):
        await open_engine(catalog_url)
    engine = create_engine_for(catalog_url)
    try:
        assert await upgrade(engine) == ("0003", HEAD)

        def key(conn: Any) -> list[str]:
            return inspect(conn).get_pk_constraint("pins")["constrained_columns"]

        async with engine.connect() as conn:
            assert await conn.run_sync(key) == ["tenant", "pin", "dataset"]
    finally:
        await engine.dispose()
    engine = await open_engine(catalog_url)
    try:
        access = Access(engine)
        (old,) = await access.pins()
        assert (old.tenant, old.pin, old.dataset, old.version) == ("t1", "slurm-7", "/proj/x", "v1")
        assert old.created_at.startswith("2026-11-29")
        await access.add_pin("slurm-7", "/proj/x", "t2", "v2")
        assert await access.release("slurm-7", "t1") == 1
        assert await _pin_rows(access) == [("t2", "slurm-7", "/proj/x")]
    finally:
        await engine.dispose()


# -- verify -------------------------------------------------------------------------------


async def test_verify_compares_directory_mtimes_as_stage_sets_them(make_site: MakeSite) -> None:
    # Stage gives every directory the version's mtime, but verify never compared them: a
    # tree whose directories had other mtimes was reported as matching the version.
    a, b = await make_site("a"), await make_site("b")
    make_tree(a.data / "run1", files=12)
    site_a, site_b = await a.open(), await b.open()
    try:
        await push(site_a, "/proj/run1")
        await stage(site_b, "/proj/run1")
        assert (await verify(site_b, "/proj/run1")).ok
        os.utime(b.data / "run1" / "d00", ns=(1, 1))
        found = await verify(site_b, "/proj/run1")
        assert not found.ok
        assert found.problems == ["d00: modification time differs from the version"]
        # Extra files change their directory's mtime: allowing them allows that too.
        assert (await verify(site_b, "/proj/run1", allow_extra=True)).ok
        await stage(site_b, "/proj/run1")  # and stage puts it right
        assert (await verify(site_b, "/proj/run1")).ok
    finally:
        await site_a.close()
        await site_b.close()


async def test_verify_does_not_follow_a_symlinked_dataset_directory(
    make_site: MakeSite, tmp_path: Path
) -> None:
    # `run1 -> /somewhere/else` below the configured directory: stage refuses to write
    # through it, but verify walked through it and reported a match.
    a = await make_site("a")
    make_tree(a.data / "run1", files=12)
    site = await a.open()
    try:
        await push(site, "/proj/run1")
        elsewhere = tmp_path / "elsewhere"
        shutil.copytree(a.data / "run1", elsewhere, symlinks=True)
        (a.data / "run1").rename(a.data / "moved")
        (a.data / "run1").symlink_to(elsewhere)
        found = await verify(site, "/proj/run1")
        assert not found.ok
        assert found.problems == [
            f"{a.data / 'run1'}: is a symlink, not the dataset's directory "
            "(datamover never reads or writes through it)"
        ]
        (a.data / "run1").unlink()
        (a.data / "run1").write_text("")
        found = await verify(site, "/proj/run1")
        assert found.problems == [f"{a.data / 'run1'}: is not a directory"]
    finally:
        await site.close()


# -- namespace and config -----------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        {"/proj": "/gpfs/a", "/proj/": "/gpfs/b"},
        {"/proj/": "/gpfs/a", "/proj": "/gpfs/a"},
    ],
)
def test_two_namespace_keys_for_one_prefix_are_refused(mapping: dict[str, str]) -> None:
    # `/proj` and `/proj/` are two TOML keys but one prefix: the map was accepted and one of
    # the two directories silently ignored.
    with pytest.raises(InvalidInput, match=r"both name '/proj'; keep one"):
        Namespace.from_mapping(mapping)


def test_two_namespace_keys_for_one_prefix_in_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        "[site]\nname = 'a'\n[store]\nbucket = 'b'\n"
        "[namespace]\n'/proj' = '/gpfs/proj'\n'/proj/' = '/scratch/proj'\n"
    )
    with pytest.raises(InvalidInput, match="keys '/proj' and '/proj/' both name") as info:
        load_config(path, env={})
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_relative_paths_in_a_config_file_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `state_dir = "state"` was resolved against the working directory: a daemon started
    # from / and a CLI run from a home directory used two state directories, two SQLite
    # catalogs and two lock files for one site (and the one-process lock was no lock).
    conf = tmp_path / "etc"
    conf.mkdir()
    path = conf / "site.toml"
    path.write_text(
        "[site]\nname = 'a'\nstate_dir = 'state'\ncatalog = 'sqlite:///db/catalog.db'\n"
        "[store]\nbucket = 'b'\n[api]\ntoken_file = 'token'\n"
        "[namespace]\n'/proj' = '/gpfs/proj'\n"
    )
    seen = set()
    for cwd in (tmp_path, conf, Path("/")):
        monkeypatch.chdir(cwd)
        cfg = load_config(path, env={})
        seen.add((cfg.site.state_dir, cfg.catalog_url, cfg.api.token_file))
    assert seen == {
        (str(conf / "state"), f"sqlite:///{conf / 'db' / 'catalog.db'}", str(conf / "token"))
    }

    # Read from a path relative to the working directory: still the file's directory.
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("etc/site.toml"), env={}).site.state_dir == str(conf / "state")
    # From the environment, relative to the working directory, as the shell means it.
    env = {"DATAMOVER_SITE_STATE_DIR": "mine", "DATAMOVER_SITE_CATALOG": "sqlite:///c.db"}
    cfg = load_config(path, env=env)
    assert cfg.site.state_dir == str(tmp_path / "mine")
    assert cfg.catalog_url == f"sqlite:///{tmp_path / 'c.db'}"
    # Left as they are: absolute paths, in-memory and server catalogs.
    for url in ("sqlite:////var/dm/c.db", "sqlite:///:memory:", "postgresql://h/db"):
        assert load_config(path, env={"DATAMOVER_SITE_CATALOG": url}).catalog_url == url


def test_a_misspelt_environment_override_is_an_error(tmp_path: Path) -> None:
    # An unknown key in the file is refused ("a typo silently ignored is a setting not
    # applied"), but `DATAMOVER_STORE_ENDPIONT=...` was ignored and the file's endpoint used.
    path = tmp_path / "site.toml"
    path.write_text("[site]\nname = 'a'\n[store]\nbucket = 'b'\n[namespace]\n'/p' = '/x'\n")
    with pytest.raises(InvalidInput, match="DATAMOVER_STORE_ENDPIONT is not a setting") as info:
        load_config(path, env={"DATAMOVER_STORE_ENDPIONT": "http://other:8333"})
    assert "endpoint" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InvalidInput, match="DATAMOVER_TRANSFER_PACKSIZE is not a setting"):
        load_config(path, env={"DATAMOVER_TRANSFER_PACKSIZE": "8388608"})
    # Every other DATAMOVER_ variable is someone else's business.
    others = {
        "DATAMOVER_CONFIG": str(path),
        "DATAMOVER_TOKEN": "dm_x",
        "DATAMOVER_DEBUG": "1",
        "DATAMOVER_TEST_POSTGRES_URL": "postgresql://x/y",
        "DATAMOVER_STORE_ENDPOINT": "http://other:8333",
    }
    assert load_config(path, env=others).store.endpoint == "http://other:8333"


async def test_token_list_shows_what_each_token_grants_never_its_secret(
    make_site: MakeSite,
) -> None:
    # Before there was no way to find a token's id once its creation's output was lost, so
    # it could not be revoked.
    a = await make_site("site-a")
    create = ("token", "create", "--prefix", "/proj", "--scope", "read")
    first = a.cli_json(*create, "--tenant", "t1")
    second = a.cli_json(*create, "--tenant", "t2", "--expires-in", "1h")
    gone = a.cli_json(*create, "--tenant", "t1")
    assert a.cli("token", "revoke", gone["id"]).returncode == 0
    listed = a.cli_json("token", "list")["tokens"]
    assert [t["id"] for t in listed] == [first["id"], second["id"]]
    assert listed[0] == {
        "id": first["id"],
        "tenant": "t1",
        "prefixes": ["/proj"],
        "scopes": ["read"],
        "created_at": listed[0]["created_at"],
        "expires_at": None,
        "revoked_at": None,
    }
    assert listed[1]["expires_at"] == second["expires_at"]
    everyone = a.cli_json("token", "list", "--all")["tokens"]
    assert [t["id"] for t in everyone] == [first["id"], second["id"], gone["id"]]
    assert everyone[2]["revoked_at"] is not None
    assert [t["id"] for t in a.cli_json("token", "list", "--tenant", "t2")["tokens"]] == [
        second["id"]
    ]
    text = a.cli("token", "list")
    assert text.returncode == 0 and first["id"] in text.stdout and "until revoked" in text.stdout
    for made in (first, second, gone):
        assert made["token"] not in text.stdout
    site = await a.open()
    try:  # one that expired is told so in the text, not "expires" at a time gone by
        past = datetime(2020, 1, 1, tzinfo=UTC)
        _, expired = await Access(site.catalog.engine).create_token("t3", ["/proj"], ["read"], past)
    finally:
        await site.close()
    text = a.cli("token", "list", "--all", "--tenant", "t3")
    assert expired.token_id in text.stdout, text.stdout
    assert "expired 2020-01-01T00:00:00Z" in text.stdout, text.stdout
    assert a.cli_json("token", "list", "--tenant", "t3")["tokens"] == []
    bad = a.cli("token", "list", "--tenant", "")
    assert bad.returncode == 2 and bad.stderr == "datamover: error: --tenant must not be blank\n"
