"""Catalog queries. Every write is bulk (one statement for many rows), never a row per commit.

`Catalog` wraps an `AsyncEngine`; each method runs in its own short transaction. Inserts use
the dialect's ON CONFLICT DO NOTHING so concurrent writers of the same chunk or version, and
reruns after a crash, are harmless.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, false, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from datamover.catalog.engine import path_under, upsert_for
from datamover.catalog.models import Chunk, Pack, PushCheckpoint, PushSegment, Replica, Version
from datamover.catalog.queue_sql import lineage
from datamover.domain.manifest import ChunkRef
from datamover.errors import CatalogUnavailable, Conflict
from datamover.repo.layout import VersionDoc
from datamover.repo.manifest import SegmentRef

_LOOKUP_BATCH = 900  # stays below every engine's bound-parameter limit
_COLUMNS = 'digest, pack, "offset", stored_length, raw_length, codec'
_SQLITE_LOOKUP = f"SELECT {_COLUMNS} FROM chunks WHERE digest IN (%s)"
_SQLITE_INSERT = f"INSERT OR IGNORE INTO chunks ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_PG_LOOKUP = f"SELECT {_COLUMNS} FROM chunks WHERE digest = ANY($1::bytea[])"
_PG_TEMP = "CREATE TEMPORARY TABLE IF NOT EXISTS chunks_in (LIKE chunks) ON COMMIT DELETE ROWS"
_PG_MERGE = (
    f"INSERT INTO chunks ({_COLUMNS}) SELECT {_COLUMNS} FROM chunks_in ORDER BY digest "
    "ON CONFLICT DO NOTHING"
)
_INSERT_BATCH = 5000


#: The inode of the initial PID namespace (the kernel's `PROC_PID_INIT_INO`): the host's.
_INIT_PID_NS = 0xEFFFFFFC


@functools.cache
def _pid_namespace() -> str:
    """'' in the host's PID namespace, else `@` and its inode in hex. A process in a
    container of its own has PIDs no process of another namespace can check, and two
    containers with one host name (pods on one node's network, both with the daemon as
    PID 1) would otherwise have one `host:pid`: each took the other's running transfers
    for its dead predecessor's and ran them again."""
    try:
        inode = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return "" if inode == _INIT_PID_NS else f"@{inode:x}"


def owner_id() -> str:
    """`host:pid` of this process, recorded on work it owns; in a PID namespace other than
    the host's, `host:pid@namespace` (`_pid_namespace`)."""
    return f"{socket.gethostname()}:{os.getpid()}{_pid_namespace()}"


def owner_alive(owner: str | None) -> bool:
    """False when `owner` (`owner_id`, maybe `/worker` after it) names a process of this
    host and PID namespace that no longer exists. One of another host or namespace cannot
    be told from here: it counts as alive (its lease ends it). A zombie is dead: a killed
    process its parent has not reaped yet (a shell's `timeout -s KILL`, a container whose
    first process never reaps) had held its work against the rerun until reaped."""
    if not owner:
        return False
    who, _, namespace = owner.partition("/")[0].partition("@")
    host, _, pid = who.rpartition(":")
    if host != socket.gethostname() or (f"@{namespace}" if namespace else "") != _pid_namespace():
        return True  # cannot tell; assume alive (leases handle remote owners)
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return not _exited(int(pid))


def _exited(pid: int) -> bool:
    """Whether process `pid` has exited and awaits its parent (state Z or X in
    `/proc/PID/stat`); False where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 1 :].split()  # the name in parentheses may hold spaces
    return bool(fields) and fields[0] in (b"Z", b"X")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CheckpointRow:
    """An unfinished push: its parent version, who runs it (`host:pid`), when that process
    last said so, the local tree it reads and when the run whose segments it keeps began to
    walk it (None: recorded before migration 0007)."""

    parent: str | None
    owner: str | None
    touched: datetime
    root: str | None = None
    started_at: datetime | None = None

    @property
    def started_ns(self) -> int | None:
        """`started_at` in nanoseconds since the epoch, as ctimes are (None: unknown)."""
        return _epoch_ns(self.started_at)


@dataclass(frozen=True)
class ReplicaRow:
    """A replica as the catalog records it."""

    dataset: str
    root: str
    version: str
    base_version: str | None
    state: str
    files: int
    bytes: int
    owner: str | None
    updated_at: datetime | None = None
    last_access: datetime | None = None
    held_since: datetime | None = None

    @property
    def held_since_ns(self) -> int | None:
        """`held_since` in nanoseconds since the epoch, as ctimes are (None: unknown). A
        file whose ctime is not before it changed since the tree was known to hold
        `base_version`."""
        return _epoch_ns(self.held_since)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ns(at: datetime | None) -> int | None:
    """`at` in nanoseconds since the epoch (None stays None); naive is UTC, as SQLite gives
    back what was stored aware."""
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return (at - _EPOCH) // timedelta(microseconds=1) * 1000


def _replica_row(r: Any) -> ReplicaRow:
    return ReplicaRow(
        r.dataset,
        r.root,
        r.version,
        r.base_version,
        r.state,
        r.files,
        r.bytes,
        r.owner,
        r.updated_at,
        r.last_access,
        r.held_since,
    )


class Catalog:
    """Queries over one catalog engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    def _insert(self, table: Any) -> Any:
        return upsert_for(self.dialect, table)

    async def close(self) -> None:
        """Dispose of the engine's connections."""
        await self.engine.dispose()

    async def _insert_ignore(self, conn: AsyncConnection, table: Any, rows: list[dict]) -> None:
        for start in range(0, len(rows), _INSERT_BATCH):
            stmt = self._insert(table).on_conflict_do_nothing()
            await conn.execute(stmt, rows[start : start + _INSERT_BATCH])

    # -- chunk index ---------------------------------------------------------------------

    async def lookup_chunks(self, digests: Sequence[bytes]) -> dict[bytes, ChunkRef]:
        """Known locations of `digests` (absent digests are simply missing from the result).

        The chunk index is the hottest table (one probe per chunk pushed), so this goes to the
        driver directly: SQLAlchemy's compilation of a 900-value IN list costs more than the
        query itself.
        """
        found: dict[bytes, ChunkRef] = {}
        if not digests:
            return found
        async with self.engine.connect() as conn:
            for start in range(0, len(digests), _LOOKUP_BATCH):
                batch = list(digests[start : start + _LOOKUP_BATCH])
                if self.dialect == "postgresql":
                    result = await conn.exec_driver_sql(_PG_LOOKUP, (batch,))
                else:
                    marks = ",".join("?" * len(batch))
                    result = await conn.exec_driver_sql(_SQLITE_LOOKUP % marks, tuple(batch))
                for row in result:
                    ref = ChunkRef(*row)
                    found[ref.digest] = ref
        return found

    async def add_pack(self, pack_id: bytes, size: int, chunks: Iterable[ChunkRef]) -> None:
        """Record a pack that is complete in the store, and index its chunks (idempotent)."""
        await self.add_packs([(pack_id, size, chunks)])

    async def add_packs(
        self,
        packs: Sequence[tuple[bytes, int | None, Iterable[ChunkRef]]],
        totals: Mapping[bytes, int] | None = None,
    ) -> int:
        """Record packs `(id, size, chunks)` complete in the store and index their chunks,
        in one transaction (idempotent); return how many chunks were new to the index. A
        size of None indexes the chunks alone, without the pack (a part of a long pack
        index, `reindex`: the pack is recorded with its last part, its chunk count taken
        from `totals` where given).

        Bulk at the driver: COPY into a temporary table on PostgreSQL, one executemany of
        INSERT OR IGNORE on SQLite. Many packs in one transaction cost much less than one
        each: the chunk index's keys are random, so a commit writes nearly a page per row
        (250 transactions of 800 rows took 4.1 s on SQLite, 25 of 8,000 rows 2.5 s).
        Packs and chunks are written in key order, so two writers of overlapping chunks
        (two daemons sharing a catalog, a rebuild beside a push) lock them in one order and
        never deadlock; a PostgreSQL connection lost or a transaction rolled back by the
        server under the driver's COPY is `CatalogUnavailable`, as through SQLAlchemy.
        """
        now = _now()
        rows: list[tuple[Any, ...]] = []
        pack_rows = []
        for pack_id, size, chunks in sorted(packs, key=lambda p: p[0]):
            first = len(rows)
            rows.extend(tuple(c) for c in chunks)
            if size is None:
                continue
            pack_rows.append(
                {
                    "id": pack_id,
                    "size": size,
                    "chunks": (totals or {}).get(pack_id, len(rows) - first),
                    "created_at": now,
                }
            )
        rows.sort()
        async with self.engine.begin() as conn:
            await self._insert_ignore(conn, Pack, pack_rows)
            if not rows:  # SQLite's executemany refuses an empty list
                return 0
            if self.dialect == "postgresql":
                return await self._pg_merge(conn, rows)
            changes = "SELECT total_changes()"
            before = (await conn.exec_driver_sql(changes)).scalar_one()
            await conn.exec_driver_sql(_SQLITE_INSERT, rows)
            return (await conn.exec_driver_sql(changes)).scalar_one() - before

    async def _pg_merge(self, conn: AsyncConnection, rows: list[tuple[Any, ...]]) -> int:
        """COPY `rows` (sorted) into the chunk index through the driver; the rows added."""
        import asyncpg

        # Through SQLAlchemy first: its adapter begins the transaction at its first
        # statement, and the driver's own calls alone would each commit, emptying the
        # temporary table (ON COMMIT DELETE ROWS) before the merge (chunks of a long
        # pack index's parts, recorded without a pack row, were lost so).
        await conn.exec_driver_sql(_PG_TEMP)
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        try:
            await driver.copy_records_to_table("chunks_in", records=rows)
            status = await driver.execute(_PG_MERGE)
        except (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.TransactionRollbackError,
            asyncpg.exceptions.OperatorInterventionError,
            OSError,
        ) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CatalogUnavailable(f"catalog unavailable: {reason}") from None
        return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"

    async def known_packs(self, pack_ids: Sequence[bytes]) -> set[bytes]:
        """Which of `pack_ids` this catalog has recorded (`add_pack`: its chunks indexed)."""
        table = Pack
        known: set[bytes] = set()
        async with self.engine.connect() as conn:
            for start in range(0, len(pack_ids), _LOOKUP_BATCH):
                batch = list(pack_ids[start : start + _LOOKUP_BATCH])
                result = await conn.execute(select(table.c.id).where(table.c.id.in_(batch)))
                known.update(row[0] for row in result)
        return known

    async def forget_chunks(self, digests: Sequence[bytes], packs: Iterable[bytes] = ()) -> None:
        """Drop index rows of chunks whose pack is gone from the store, and the rows of
        those `packs`: a pack that comes back (a bucket restored, a HEAD answered 404 by
        mistake) is then new to `db rebuild`, which indexes its chunks again; with its row
        kept, it was taken as indexed for good."""
        gone = sorted(set(packs))
        async with self.engine.begin() as conn:
            for start in range(0, len(digests), _LOOKUP_BATCH):
                batch = list(digests[start : start + _LOOKUP_BATCH])
                await conn.execute(delete(Chunk).where(Chunk.c.digest.in_(batch)))
            for start in range(0, len(gone), _LOOKUP_BATCH):
                batch = gone[start : start + _LOOKUP_BATCH]
                await conn.execute(delete(Pack).where(Pack.c.id.in_(batch)))

    async def count_chunks(self) -> int:
        """Number of indexed chunks (for reports and tests)."""
        from sqlalchemy import func

        async with self.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(Chunk))).scalar_one()

    # -- versions (a cache of immutable documents) --------------------------------------

    async def record_versions(self, docs: Iterable[VersionDoc]) -> None:
        """Cache version documents (idempotent)."""
        rows = [
            {
                "id": d.version,
                "dataset": d.dataset,
                "parent": d.parent,
                "site": d.site,
                "created": d.created,
                "manifest": d.manifest,
                "manifest_size": d.manifest_size,
                "segments": d.segments,
                "files": d.files,
                "dirs": d.dirs,
                "symlinks": d.symlinks,
                "bytes": d.bytes,
            }
            for d in docs
        ]
        if rows:
            async with self.engine.begin() as conn:
                await self._insert_ignore(conn, Version, rows)

    async def cached_versions(self, ids: Sequence[str]) -> dict[str, VersionDoc]:
        """Cached documents for the given version ids."""
        found: dict[str, VersionDoc] = {}
        table = Version
        async with self.engine.connect() as conn:
            for start in range(0, len(ids), _LOOKUP_BATCH):
                batch = list(ids[start : start + _LOOKUP_BATCH])
                for r in await conn.execute(select(table).where(table.c.id.in_(batch))):
                    found[r.id] = VersionDoc(
                        dataset=r.dataset,
                        version=r.id,
                        parent=r.parent,
                        site=r.site,
                        created=r.created,
                        manifest=r.manifest,
                        manifest_size=r.manifest_size,
                        segments=r.segments,
                        files=r.files,
                        dirs=r.dirs,
                        symlinks=r.symlinks,
                        bytes=r.bytes,
                    )
        return found

    # -- replicas ------------------------------------------------------------------------

    async def replica(self, dataset: str) -> ReplicaRow | None:
        """The replica record of `dataset` at this site, if any."""
        table = Replica
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(table).where(table.c.dataset == dataset))).first()
        return None if r is None else _replica_row(r)

    async def replicas_near(self, dataset: str) -> list[ReplicaRow]:
        """The replica records of datasets above or below `dataset` (not `dataset` itself),
        by dataset."""
        table = Replica
        query = (
            select(table)
            .where(
                table.c.dataset != dataset,
                or_(
                    table.c.dataset.in_(sorted(lineage(dataset))),
                    path_under(table.c.dataset, dataset),
                ),
            )
            .order_by(table.c.dataset)
        )
        async with self.engine.connect() as conn:
            return [_replica_row(r) for r in await conn.execute(query)]

    async def replicas(
        self,
        prefixes: Sequence[str] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[ReplicaRow]:
        """This site's replica records by dataset: those under one of `prefixes` (all when
        None), after dataset `after` in that order, at most `limit` of them."""
        table = Replica
        query = select(table).order_by(table.c.dataset)
        if prefixes is not None:
            query = query.where(or_(false(), *(path_under(table.c.dataset, p) for p in prefixes)))
        if after is not None:
            query = query.where(table.c.dataset > after)
        if limit is not None:
            query = query.limit(limit)
        async with self.engine.connect() as conn:
            return [_replica_row(r) for r in await conn.execute(query)]

    async def replica_bytes(self) -> int:
        """The bytes of every replica record of this site, summed in the database."""
        table = Replica
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.sum(table.c.bytes)))).scalar() or 0)

    async def begin_replica(
        self,
        dataset: str,
        root: str,
        version: str,
        base_version: str | None,
        owner: str,
        began: datetime | None = None,
    ) -> ReplicaRow | None:
        """Mark `dataset` as being staged to `version` by `owner` (upsert), keeping
        `held_since` where the record has one for the tree at `root`, else making it
        `began` (a tree with no time holds nothing known: `ctimes.NEVER`); return its
        record as it was before (None: there was none), for `restore_replica`."""
        table = Replica
        # FOR UPDATE (PostgreSQL; SQLite has no such clause): the row read is the one replaced.
        read = select(table).where(table.c.dataset == dataset).with_for_update()
        async with self.engine.begin() as conn:
            before = (await conn.execute(read)).first()
            kept = before is not None and before.root == root and before.held_since is not None
            since = before.held_since if kept else began
            stmt = self._replica_upsert(
                dataset, root, version, base_version, "staging", 0, 0, owner, since
            )
            await conn.execute(stmt)
        return None if before is None else _replica_row(before)

    async def touch_replica(self, dataset: str, owner: str) -> None:
        """Note that `owner` is still staging `dataset` (its record's `updated_at`), so that
        a stage silent for long is known to have died (`transfer.stage._base`)."""
        table = Replica
        stmt = (
            update(table)
            .where(table.c.dataset == dataset, table.c.owner == owner, table.c.state == "staging")
            .values(updated_at=_now())
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def restore_replica(
        self, dataset: str, version: str, owner: str, before: ReplicaRow | None
    ) -> None:
        """Give `dataset`'s record back as it was before `owner` began staging it to
        `version` (`before`, from `begin_replica`; None: there was no record), if it is
        still that stage's (`staging`, `owner`): for a stage that ended before it changed
        anything in the tree, which is then still what the old record says it is."""
        table = Replica
        ours = (
            table.c.dataset == dataset,
            table.c.version == version,
            table.c.state == "staging",
            table.c.owner == owner,
        )
        stmt: Any
        if before is None:
            stmt = delete(table).where(*ours)
        else:
            stmt = (
                update(table)
                .where(*ours)
                .values(
                    root=before.root,
                    version=before.version,
                    base_version=before.base_version,
                    state=before.state,
                    files=before.files,
                    bytes=before.bytes,
                    owner=before.owner,
                    updated_at=before.updated_at or _now(),
                    last_access=before.last_access or _now(),
                    held_since=before.held_since,
                )
            )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def mark_overwritten(self, datasets: Sequence[str]) -> None:
        """Mark the `ready` records of `datasets` `overwritten`: a stage of a dataset above
        each is about to change files of its tree (`pins.overwritten_below`). A stage of
        the dataset itself makes it `ready` again; its push refuses until then."""
        await self._replica_state(datasets, "ready", "overwritten")

    async def unmark_overwritten(self, datasets: Sequence[str]) -> None:
        """Give the records of `datasets` marked `overwritten` their `ready` back: the stage
        that marked them ended before it changed anything (`mark_overwritten`)."""
        await self._replica_state(datasets, "overwritten", "ready")

    async def _replica_state(self, datasets: Sequence[str], was: str, state: str) -> None:
        """Records of `datasets` in state `was` are now in `state`."""
        if not datasets:
            return
        table = Replica
        stmt = (
            update(table)
            .where(table.c.dataset.in_(list(datasets)), table.c.state == was)
            .values(state=state, updated_at=_now())
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def pushed_replica(
        self,
        dataset: str,
        root: str,
        version: str,
        files: int,
        nbytes: int,
        held_since: datetime | None = None,
    ) -> None:
        """Record that the tree at `root` is `version`, just pushed from it (upsert,
        `ready`), as it was when the push began to walk it (`held_since`): a later push from
        it is checked against the latest version as one from a staged tree is, and a stage
        into it starts from that version."""
        stmt = self._replica_upsert(
            dataset, root, version, version, "ready", files, nbytes, None, held_since
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    def _replica_upsert(
        self,
        dataset: str,
        root: str,
        version: str,
        base_version: str | None,
        state: str,
        files: int,
        nbytes: int,
        owner: str | None,
        held_since: datetime | None = None,
    ) -> Any:
        """The statement that makes `dataset`'s replica record these values, touched now."""
        now = _now()
        values = {
            "held_since": held_since,
            "dataset": dataset,
            "root": root,
            "version": version,
            "base_version": base_version,
            "state": state,
            "files": files,
            "bytes": nbytes,
            "owner": owner,
            "updated_at": now,
            "last_access": now,
        }
        stmt = self._insert(Replica).values(**values)
        return stmt.on_conflict_do_update(
            index_elements=["dataset"],
            set_={k: v for k, v in values.items() if k != "dataset"},
        )

    async def finish_replica(
        self,
        dataset: str,
        version: str,
        state: str,
        files: int,
        nbytes: int,
        held_since: datetime | None = None,
        owner: str | None = None,
    ) -> bool:
        """Record the outcome of a stage: `ready` makes `version` the new base, held by the
        tree since `held_since` (default: now); another state keeps the base and its time,
        so files the stage wrote, newer, are read before a rerun keeps them. With `owner`,
        only while the record is still that stage's (`staging` to `version` by `owner`: no
        other stage took it over since, `transfer.stage._base`). Whether a record was
        changed."""
        now = _now()
        values: dict[str, Any] = {
            "state": state,
            "files": files,
            "bytes": nbytes,
            "owner": None,
            "updated_at": now,
        }
        if state == "ready":
            values["base_version"] = version
            values["held_since"] = held_since or now
        table = Replica
        which = [table.c.dataset == dataset]
        if owner is not None:
            which += [
                table.c.owner == owner,
                table.c.state == "staging",
                table.c.version == version,
            ]
        async with self.engine.begin() as conn:
            done = await conn.execute(update(table).where(*which).values(**values))
        return bool(done.rowcount)

    # -- push checkpoints ----------------------------------------------------------------

    async def checkpoint(self, dataset: str) -> CheckpointRow | None:
        """The unfinished push of `dataset`, or None."""
        table = PushCheckpoint
        async with self.engine.connect() as conn:
            r = (await conn.execute(select(table).where(table.c.dataset == dataset))).first()
        if r is None:
            return None
        touched = r.updated_at if r.updated_at.tzinfo else r.updated_at.replace(tzinfo=UTC)
        return CheckpointRow(r.parent, r.owner, touched, r.root, r.started_at)

    async def checkpoint_segments(self, dataset: str) -> list[SegmentRef]:
        """Segments an unfinished push of `dataset` uploaded, in order."""
        table = PushSegment
        query = select(table).where(table.c.dataset == dataset).order_by(table.c.seq)
        async with self.engine.connect() as conn:
            return [
                SegmentRef(r.digest, r.stored_size, r.entries, r.first_path, r.last_path, r.bytes)
                for r in await conn.execute(query)
            ]

    async def start_checkpoint(
        self,
        dataset: str,
        parent: str | None,
        owner: str,
        keep_segments: bool,
        found: CheckpointRow | None = None,
        root: str | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """Claim the push of `dataset` for `owner`, reading the local tree at `root` from
        `started_at` on; keep or drop earlier segments (kept, they keep the time of the run
        that began them: their files were walked then).

        `found` is the checkpoint the caller read and decided to take over (None: it saw
        none). The claim is a compare-and-set on that row's owner, so of two pushes that
        both decided to start, one gets `Conflict`.
        """
        table = PushCheckpoint
        values = {"parent": parent, "owner": owner, "updated_at": _now(), "root": root}
        if not keep_segments:
            values["started_at"] = started_at
        if found is None:
            stmt: Any = self._insert(table).values(dataset=dataset, **values)
            stmt = stmt.on_conflict_do_nothing(index_elements=["dataset"])
        else:
            held = table.c.owner.is_(None) if found.owner is None else table.c.owner == found.owner
            stmt = update(table).where(table.c.dataset == dataset, held).values(**values)
        segs = PushSegment
        async with self.engine.begin() as conn:
            if (await conn.execute(stmt)).rowcount != 1:
                raise Conflict(f"another push of {dataset!r} started at the same time")
            if not keep_segments:
                await conn.execute(delete(segs).where(segs.c.dataset == dataset))

    async def touch_checkpoint(self, dataset: str, owner: str) -> None:
        """Note that `owner` is still running the push of `dataset` (see `checkpoint`)."""
        async with self.engine.begin() as conn:
            await _still_held(conn, dataset, owner)

    async def release_checkpoint(self, dataset: str, owner: str) -> None:
        """Give up `owner`'s claim on the unfinished push of `dataset` (a push that failed):
        its segments stay for any later push to resume, which need not wait for `owner`'s
        process to end (a site daemon's lives on). A claim someone else took meanwhile is
        left alone."""
        table = PushCheckpoint
        stmt = (
            update(table)
            .where(table.c.dataset == dataset, table.c.owner == owner)
            .values(owner=None, updated_at=_now())
        )
        async with self.engine.begin() as conn:
            await conn.execute(stmt)

    async def add_checkpoint_segments(
        self, dataset: str, segments: Sequence[tuple[int, SegmentRef]], owner: str | None = None
    ) -> None:
        """Record that segments `(seq, ref)` of the running push are uploaded, in one
        transaction.

        The rows from the lowest `seq` given onwards are replaced: rows beyond what this run
        has written are an interrupted run's, whose segments no longer follow this run's
        (files removed or added in between shift the cuts), and a rerun must see one run's
        list, never a mix (a stale segment with the bounds of a current one would be reused
        and publish old content). For the same reason, with `owner` the rows are written
        only while the checkpoint is still `owner`'s: a push stopped longer than a holder
        is waited for (SIGSTOP, a paused VM) whose checkpoint another push took over gets
        `Conflict` instead of writing into the other's list."""
        if not segments:
            return
        rows = [
            {
                "dataset": dataset,
                "seq": seq,
                "digest": ref.digest,
                "stored_size": ref.stored_size,
                "entries": ref.entries,
                "first_path": ref.first_path,
                "last_path": ref.last_path,
                "bytes": ref.bytes,
            }
            for seq, ref in segments
        ]
        stmt = self._insert(PushSegment).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["dataset", "seq"],
            set_={k: stmt.excluded[k] for k in rows[0] if k not in ("dataset", "seq")},
        )
        first = min(seq for seq, _ in segments)
        table = PushSegment
        async with self.engine.begin() as conn:
            if owner is not None and not await _still_held(conn, dataset, owner):
                raise Conflict(
                    f"the push of {dataset!r} was taken over by another push while this one "
                    "was stopped; that push goes on"
                )
            await conn.execute(
                delete(table).where(table.c.dataset == dataset, table.c.seq >= first)
            )
            await conn.execute(stmt)

    async def clear_checkpoint(self, dataset: str, owner: str | None = None) -> None:
        """Forget the checkpoint once the version is published; with `owner`, only while it
        is still `owner`'s (another push that took it over keeps its own)."""
        cps, segs = PushCheckpoint, PushSegment
        async with self.engine.begin() as conn:
            if owner is not None and not await _still_held(conn, dataset, owner):
                return
            await conn.execute(delete(segs).where(segs.c.dataset == dataset))
            await conn.execute(delete(cps).where(cps.c.dataset == dataset))


async def _still_held(conn: Any, dataset: str, owner: str) -> bool:
    """Whether the checkpoint of `dataset` is `owner`'s, noting that it is still running
    (its `updated_at`), within the transaction of `conn`."""
    table = PushCheckpoint
    stmt = (
        update(table)
        .where(table.c.dataset == dataset, table.c.owner == owner)
        .values(updated_at=_now())
    )
    return bool((await conn.execute(stmt)).rowcount == 1)
