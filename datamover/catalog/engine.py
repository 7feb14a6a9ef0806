"""Catalog engines: URL to async engine, schema revision checks, migrations.

`open_engine` is the one way in: it creates a fresh catalog on first use, refuses one that is
behind the code (naming `datamover db upgrade`) or ahead of it, and tunes SQLite for one
writer process with concurrent readers (WAL, busy timeout).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time
import warnings
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, func, inspect, or_, select, text, true
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    InvalidRequestError,
    OperationalError,
    SAWarning,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from datamover.errors import CatalogError, CatalogUnavailable, InvalidInput

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}

#: The newest migration in `migrations/versions`. Opening a catalog compares its revision
#: with this constant instead of loading alembic (a fifth of the CLI's start-up time);
#: `tests/test_catalog.py` checks it equals alembic's head.
HEAD = "0008"


def upsert_for(dialect: str, table: Any) -> Any:
    """`INSERT` with `ON CONFLICT` for `table` in this dialect. The PostgreSQL dialect is
    imported only when used: 35 ms a SQLite command need not spend."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def path_under(column: Any, prefix: str) -> Any:
    """SQL: logical path `column` is `prefix` or lies below it, compared exactly on both
    engines (not with LIKE, which SQLite applies without regard to ASCII case: a token for
    `/proj` matched paths under `/PROJ` there, and only there)."""
    if prefix == "/":
        return true()
    return or_(column == prefix, func.substr(column, 1, len(prefix) + 1) == prefix + "/")


#: What SQLite says of a catalog file it may not write or cannot read: no retry cures that.
#: ("unable to open database file" stays transient: a file system not mounted yet may be.)
_SQLITE_PERMANENT = (
    "readonly database",
    "file is not a database",
    "database disk image is malformed",
)


def catalog_outage(
    exc: BaseException, *, catalog_only: bool = False
) -> CatalogUnavailable | CatalogError | None:
    """The error for a database failure that is no bug: transient (`CatalogUnavailable`)
    where a retry may cure it (the server restarted, the connection dropped or was refused,
    the database was locked), `CatalogError` for a SQLite file that may not be written
    (its mode, a read-only file system) or is no database and for a PostgreSQL database
    that is read-only (a standby); else None.

    Operational and interface errors, any DBAPI error that invalidated its connection, and
    a wait for a pooled connection that timed out (every one busy: an overload) count;
    programming errors (`ProgrammingError`, `IntegrityError`) stay what they are.

    `catalog_only`: `exc` came from a call that used the catalog and nothing else (a
    scheduler's step), so a connection refused, reset or timed out is the catalog's too.
    asyncpg raises those unwrapped (`ConnectionResetError`, then `ConnectionRefusedError`
    while the server is down: what a PostgreSQL restart looks like to a running daemon);
    from a transfer's run they may be the store's."""
    if isinstance(exc, PoolTimeout):
        return CatalogUnavailable(
            "catalog unavailable: no free connection in the pool (every one stayed busy)"
        )
    if catalog_only and unreachable(exc):
        return CatalogUnavailable(f"catalog unavailable: {first_line(exc)}")
    if _refused_login(exc):
        return CatalogError(
            f"catalog cannot be used: {first_line(getattr(exc, 'orig', None) or exc)} (check "
            "[site] catalog: the database, its role and password)"
        )
    if _external_auth_failed(exc):
        # A login its LDAP, RADIUS, PAM or Kerberos server did not answer: it may pass.
        return CatalogUnavailable(
            f"catalog unavailable: {first_line(getattr(exc, 'orig', None) or exc)} (its login "
            "was refused; if that lasts, check [site] catalog's role and password)"
        )
    read_only = _read_only(exc)
    if (
        read_only
        or isinstance(exc, OperationalError | InterfaceError)
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
    ):
        text = str(getattr(exc, "orig", None) or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        if read_only or any(marker in reason for marker in _SQLITE_PERMANENT):
            return CatalogError(
                f"catalog cannot be used: {reason} (check [site] catalog: the file, its "
                "-wal and -shm files and their directory must be readable and writable "
                "by this user)"
            )
        return CatalogUnavailable(f"catalog unavailable: {reason}")
    return None


#: Authentication methods whose own server may be down, as SQLSTATE 28000's messages name
#: them (in every language PostgreSQL speaks): such a refusal may pass.
_EXTERNAL_AUTH = ("LDAP", "RADIUS", "PAM", "GSSAPI", "SSPI")


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of the database error behind `exc` (asyncpg's `sqlstate`, psycopg's
    `pgcode`), if any."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def _external_auth_failed(exc: BaseException) -> bool:
    """Whether `exc` is SQLSTATE 28000 naming an external authentication method."""
    return _sqlstate(exc) == "28000" and any(
        m in str(getattr(exc, "orig", None)) for m in _EXTERNAL_AUTH
    )


def _refused_login(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a new connection for what needs a person: no such
    database (3D000: dropped under a running daemon), a wrong password (28P01), or class
    28's other refusals (no such role, no `pg_hba.conf` entry or one that rejects, a role
    that may not log in), but for an external method's (`_external_auth_failed`). Told
    by SQLSTATE, not by messages, which the server's `lc_messages` translates. A running
    daemon's requests had answered 500 `internal` (exit 70, "a bug")."""
    state = _sqlstate(exc) or ""
    if state == "3D000":
        return True
    return state.startswith("28") and not _external_auth_failed(exc)


def _read_only(exc: BaseException) -> bool:
    """Whether PostgreSQL refused a write as read-only (SQLSTATE 25006: a standby, or a
    database set `default_transaction_read_only`)."""
    return isinstance(exc, DBAPIError) and _sqlstate(exc) == "25006"


def _alembic_config() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    location = resources.files("datamover.migrations")
    cfg.set_main_option("script_location", str(location))
    return cfg


def head_revision() -> str:
    """The newest schema revision in the migration scripts (loads alembic)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def create_engine_for(url: str) -> AsyncEngine:
    """An async engine for a catalog URL (`sqlite:///path` or `postgresql://...`)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise InvalidInput(f"catalog URL {_describe(url)!r} is not a valid database URL") from None
    backend = parsed.get_backend_name()
    if backend == "postgres":  # the libpq spelling SQLAlchemy dropped
        raise InvalidInput(f"catalog URL {_describe(url)!r}: write postgresql://, not postgres://")
    if backend not in _DRIVERS:
        raise InvalidInput(
            f"catalog URL {_describe(url)!r}: only sqlite and postgresql are supported"
        )
    if backend == "sqlite" and (parsed.host or parsed.username or parsed.port):
        # `sqlite://site.db`: the file name parsed as a host, which the driver then refused.
        raise InvalidInput(
            f"catalog URL {_describe(url)!r}: an SQLite catalog is sqlite:/// followed by the "
            "file's path (sqlite:////var/lib/datamover/site.db, or sqlite:///site.db beside "
            "the config file)"
        )
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise InvalidInput(f"catalog URL {_describe(url)!r}: the port must be 1-65535")
    if "+" not in parsed.drivername:
        parsed = parsed.set(drivername=_DRIVERS[backend])
    if backend == "sqlite":
        # The engine first: it opens nothing, and refuses a driver before a directory exists.
        engine = _async_engine(url, parsed, connect_args={"timeout": _BUSY_SECONDS})
        database = parsed.database
        if database and database != ":memory:":
            folder = Path(database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CatalogError(
                    f"the SQLite catalog's directory {str(folder)!r} cannot be created: "
                    f"{exc.strerror or exc}"
                ) from None

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            _wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(_BUSY_SECONDS * 1000)}")
            cursor.close()

        return engine
    # READ COMMITTED whatever the server's default: the queue's claim (catalog/transfers.py)
    # relies on its UPDATE seeing rows committed after the advisory lock was taken, which a
    # REPEATABLE READ snapshot, taken at the transaction's first query, would not.
    return _async_engine(
        url,
        parsed,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        isolation_level="READ COMMITTED",
    )


def _async_engine(url: str, parsed: URL, **options: Any) -> AsyncEngine:
    """`create_async_engine(parsed)`; a driver named in the catalog `url` that is not
    installed, unknown or not an asyncio one is the user's to change (`InvalidInput`), not an
    internal error."""
    try:
        with warnings.catch_warnings():
            # SQLAlchemy warns of URL options a driver ignores (`?bogus=1` on SQLite):
            # a typo the user is told of, not a warning on every command.
            warnings.simplefilter("error", SAWarning)
            engine = create_async_engine(parsed, **options)
    except (ImportError, ArgumentError, InvalidRequestError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInput(
            f"catalog URL {_describe(url)!r}: the driver {parsed.get_driver_name()!r} cannot "
            f"be used ({reason}); give {parsed.get_backend_name()}://... and datamover picks "
            "its own"
        ) from None
    except (SAWarning, TypeError, ValueError) as exc:  # an option's value (`?timeout=x`)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInput(f"catalog URL {_describe(url)!r}: {reason}") from None
    return engine


async def _connect_once(engine: AsyncEngine) -> None:
    """Open (and give back) one connection: a URL option the driver refuses (asyncpg's
    `connect()` gets every option SQLAlchemy does not use itself: `?sslmode=x` is a
    `TypeError`, `?command_timeout=x` a `ValueError`, at each connection) is the user's to
    change (`InvalidInput`), not an internal error. Anything else is left to the caller."""
    try:
        async with engine.connect():
            pass
    except (TypeError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InvalidInput(
            f"catalog URL {_describe(engine.url)!r}: an option is not accepted: {reason}"
        ) from None


#: How long SQLite waits for a lock (seconds): its busy timeout, and `_wal`'s retries.
_BUSY_SECONDS = 30.0


def _wal(cursor: Any) -> None:
    """Put the SQLite database of `cursor` in WAL mode.

    The mode is persistent, so a catalog already in it costs one read. Switching a new
    database while another process opens it too fails at once with "database is locked",
    without waiting for the busy timeout; that is retried here for as long (sleeping on the
    event loop, which runs this connect hook)."""
    from sqlalchemy.util import await_only

    cursor.execute("PRAGMA journal_mode")
    if str(cursor.fetchone()[0]).lower() == "wal":
        return
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:  # the driver's OperationalError, as the adapter raises it
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        await_only(asyncio.sleep(0.01))


def describe_url(url: str | URL) -> str:
    """`_describe`, for messages outside this module."""
    return _describe(url)


def _describe(url: str | URL) -> str:
    """The catalog `url` for messages: as configured, without its password, and without the
    async driver `create_engine_for` adds (`sqlite+aiosqlite://` is `sqlite://`). A URL
    SQLAlchemy cannot parse is shown as typed, its password hidden all the same."""
    text = str(url)  # a `URL`'s own str() hides its password
    if text.count("@") > 1:
        # SQLAlchemy ends a password at its first `@`: the rest of one with an `@` not
        # escaped as %40 (`user:se@cret@host`) would be shown as the host or the database.
        return _hide_password(text)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return _hide_password(text)
    backend = parsed.get_backend_name()
    if parsed.drivername == _DRIVERS.get(backend):
        parsed = parsed.set(drivername=backend)
    return parsed.render_as_string(hide_password=True)


def _hide_password(text: str) -> str:
    """`text` with what stands between `[scheme://]user:` and the last `@` shown as `***`:
    a password as typed, whatever it holds (an `@`, a `/`); a path or query holding an `@`
    hides more than the password, which is the safe side."""
    scheme, sep, rest = text.partition("://")
    prefix = scheme + sep if sep else ""
    rest = rest if sep else text
    at = rest.rfind("@")
    user, colon, _ = rest[: max(at, 0)].partition(":")
    if at < 0 or not colon or "/" in user:  # no userinfo, or no password in it
        return text
    return f"{prefix}{user}:***{rest[at:]}"


def _state(connection: Connection) -> tuple[str | None, bool]:
    tables = set(inspect(connection).get_table_names())
    current = None
    if "alembic_version" in tables:
        current = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return current, bool(tables)


def _upgrade(connection: Connection, revision: str) -> None:
    from alembic import command

    cfg = _alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def catalog_revision(engine: AsyncEngine) -> tuple[str | None, bool]:
    """`(current revision, has any table)` of the catalog behind `engine`."""
    async with engine.connect() as conn:
        return await conn.run_sync(_state)


#: Advisory lock (two keys, as the queue's claim uses) that serialises creating a new
#: PostgreSQL catalog between processes; the second key is not a `hashtext` of a path's first
#: component only by convention, and a collision would only make one wait a moment.
_CREATE_LOCK = (0x646D, 0x63726561)  # "dm", "crea"


def _lock_schema(connection: Connection) -> None:
    """Make the transaction of `connection` the only one that may create or migrate the
    schema until it ends.

    SQLite: `BEGIN IMMEDIATE`, taking the write lock now (waiting out the busy timeout) and,
    as important, opening a real transaction: Python's sqlite3 runs DDL outside any
    transaction unless one was begun explicitly, so without it every `CREATE TABLE` commits on
    its own. PostgreSQL: a transaction-scoped advisory lock (its DDL is transactional)."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:a, :b)"),
            {"a": _CREATE_LOCK[0], "b": _CREATE_LOCK[1]},
        )


def _create_fresh(connection: Connection) -> tuple[str | None, bool]:
    """Create the newest schema in an empty catalog straight from the models and stamp it
    with `HEAD`, as alembic's cookbook suggests for new databases: running every migration
    (and loading alembic) costs 0.15-0.2 s, paid by the first command of every new site.
    `tests/test_catalog.py` checks the migrations and the models give the same schema.

    All or nothing, and once: under `_lock_schema` the catalog is looked at again, and left
    alone if another process created it (or anything else) meanwhile. Returns the catalog's
    `(revision, has any table)` as this leaves it."""
    from datamover.catalog.models import metadata

    _lock_schema(connection)
    current, has_tables = _state(connection)
    if current is not None or has_tables:
        return current, has_tables
    metadata.create_all(connection)
    connection.execute(
        text(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, "
            "CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))"
        )
    )
    connection.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": HEAD})
    return HEAD, True


async def create_fresh(engine: AsyncEngine) -> tuple[str | None, bool]:
    """Create the schema of an empty catalog (`_create_fresh`), in one transaction; return
    the catalog's `(revision, has any table)` afterwards."""
    async with engine.begin() as conn:
        return await conn.run_sync(_create_fresh)


def _known_revisions() -> set[str]:
    """Every schema revision in the migration scripts (loads alembic)."""
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions()}


def _foreign(url: str | URL) -> CatalogError:
    return CatalogError(
        f"catalog {_describe(url)} holds tables but no datamover schema revision (not "
        "a datamover catalog?); refusing to touch it"
    )


def _newer(url: str | URL, current: str | None) -> CatalogError:
    return CatalogError(
        f"catalog {_describe(url)} has schema revision {current!r}, unknown to this "
        "datamover (is it newer?); refusing to touch it"
    )


async def upgrade(engine: AsyncEngine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the catalog to `revision`; return `(before, after)` revisions. A catalog at a
    revision this datamover does not know (written by a newer one), or a database holding
    tables but no revision (another program's, as `open_engine` refuses it), is a
    `CatalogError`, and is left alone."""
    await _connect_once(engine)
    async with engine.begin() as conn:
        await conn.run_sync(_lock_schema)
        before, has_tables = await conn.run_sync(_state)
        if before is None and has_tables:
            raise _foreign(engine.url)
        if before is not None and before not in _known_revisions():
            raise _newer(engine.url, before)
        await conn.run_sync(_upgrade, revision)
        after, _ = await conn.run_sync(_state)
    assert after is not None
    return before, after


async def open_engine(url: str, site: str | None = None) -> AsyncEngine:
    """Open the catalog at `url`, creating it if empty; raise `CatalogError` if unusable,
    or if it is another site's than `site` (`claim_site`; None: not checked)."""
    engine = create_engine_for(url)
    try:
        await _connect_once(engine)
        current, has_tables = await catalog_revision(engine)
        head = HEAD
        if current is None and not has_tables:
            current, has_tables = await create_fresh(engine)
        if current == head:
            if site is not None:
                await claim_site(engine, site)
            return engine
        if current is None:
            raise _foreign(url)
        if current in _known_revisions():
            raise CatalogError(
                f"catalog {_describe(url)} is at schema revision {current}, this datamover needs "
                f"{head}: run `datamover db upgrade`"
            )
        raise _newer(url, current)
    except (CatalogError, InvalidInput):
        await _dispose(engine)
        raise
    except (SQLAlchemyError, DBAPIError, OSError, OverflowError) as exc:
        await _dispose(engine)
        raise cannot_open(f"catalog {_describe(url)} cannot be opened", exc) from None


#: aiosqlite's thread of one connection (`threading` names a thread by its target).
_SQLITE_THREAD = "(_connection_worker_thread)"


async def _dispose(engine: AsyncEngine) -> None:
    """Dispose of the engine of a catalog that cannot be used, and wait (a second at most)
    for aiosqlite's threads to end. A connection that failed to open is stopped by a job
    queued to its thread, which hands its answer to the event loop: a CLI whose loop had
    closed by then got a traceback on stderr after its one-line error, in a run of four."""
    await engine.dispose()
    if engine.dialect.name != "sqlite":
        return
    for _ in range(500):  # a thread's end sets no event to wait for: look every 2 ms
        if not any(t.name.endswith(_SQLITE_THREAD) for t in threading.enumerate()):
            return
        await asyncio.sleep(0.002)


async def claim_site(engine: AsyncEngine, site: str) -> None:
    """Record `site` as the catalog's on its first use by a site; afterwards, `CatalogError`
    unless it is the site recorded: a site's queue, replicas and tokens are its own, and
    another site's daemon on them would run its transfers at the wrong paths. One read
    (and one write, once)."""
    from datamover.catalog.models import CatalogSite

    async with engine.begin() as conn:
        query = select(CatalogSite.c.name).where(CatalogSite.c.id == 1)
        recorded = (await conn.execute(query)).scalar()
        if recorded is None:
            claim = upsert_for(conn.dialect.name, CatalogSite).values(
                id=1, name=site, claimed_at=datetime.now(UTC)
            )
            await conn.execute(claim.on_conflict_do_nothing())
            recorded = (await conn.execute(query)).scalar()
    if recorded != site:
        raise CatalogError(
            f"catalog {_describe(engine.url)} belongs to site {recorded!r}, not to "
            f"{site!r} ([site] name): each site needs a catalog of its own"
        )


#: SQLSTATEs of a PostgreSQL server that may take the connection later: shutting down or
#: starting up (57P01-57P03), out of connection slots (53300); and class 08, connection
#: exceptions.
_RETRY_LATER = ("57P01", "57P02", "57P03", "53300")
#: Connection errnos a later try may not see (a route or a server coming back).
_UNREACHABLE = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT}
)


def cannot_open(what: str, exc: BaseException) -> CatalogUnavailable | CatalogError:
    """The error for `exc` raised while connecting to a catalog, `what` and the reason in
    one line: `CatalogUnavailable` (exit 6: a hook retries it) when a later try may succeed
    (the server refused or dropped the connection, timed out, is starting up or out of
    connection slots, its name could not be resolved for now, a SQLite file is locked),
    `CatalogError` (exit 8) for what needs a person (no such database or role, a wrong
    password, an unknown host, a file that may not be written)."""
    orig = getattr(exc, "orig", None)
    reason = (str(orig or exc).strip().splitlines() or [type(exc).__name__])[0]
    state = _sqlstate(exc) or ""
    later = (
        unreachable(exc)
        or (isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN)
        or state.startswith("08")
        or state in _RETRY_LATER
        # A refused login that needs no person (its LDAP, RADIUS or Kerberos server down).
        or _external_auth_failed(exc)
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        or "database is locked" in reason
    )
    return (CatalogUnavailable if later else CatalogError)(f"{what}: {reason}")


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` is a connection that was refused, reset or timed out: a server a later
    try may reach."""
    return (
        isinstance(exc, ConnectionError | TimeoutError)
        or (isinstance(exc, OSError) and exc.errno in _UNREACHABLE)
        # asyncio's error when every address of a name refused: errno None, one line each
        or (isinstance(exc, OSError) and "Connect call failed" in str(exc))
    )


def first_line(exc: BaseException) -> str:
    """`exc`'s message's first line, or its class's name when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
