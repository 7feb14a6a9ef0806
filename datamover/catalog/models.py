"""SQLAlchemy models of the catalog. The schema's history lives in `migrations/`.

The catalog is a site's cache and work record; the bucket stays the source of truth for data
and versions (docs/format.md). What only the catalog knows: which chunks this site has seen in
which pack (dedup on push), what is materialised in the cache (replicas) and unfinished work
(push checkpoints).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

#: Every catalog table (Core tables: declaring them as ORM classes cost 30 ms of every
#: command's start-up, and nothing maps rows to objects).
metadata = MetaData()

#: Where a chunk known to this site is stored (one row per digest).
Chunk = Table(
    "chunks",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("pack", LargeBinary(32), nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("stored_length", Integer, nullable=False),
    Column("raw_length", Integer, nullable=False),
    Column("codec", SmallInteger, nullable=False),
)


#: A pack this site knows to be complete in the store.
Pack = Table(
    "packs",
    metadata,
    Column("id", LargeBinary(32), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_packs_created_at", "created_at"),
)


#: A cached copy of an immutable version document.
Version = Table(
    "versions",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("dataset", Text, nullable=False),
    Column("parent", String(128)),
    Column("site", String(64), nullable=False),
    Column("created", String(40), nullable=False),
    Column("manifest", String(64), nullable=False),
    Column("manifest_size", BigInteger, nullable=False),
    Column("segments", Integer, nullable=False),
    Column("files", BigInteger, nullable=False),
    Column("dirs", BigInteger, nullable=False),
    Column("symlinks", BigInteger, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Index("ix_versions_dataset_id", "dataset", "id"),
)


#: A dataset materialised (or being materialised) in this site's cache.
#:
#: `version` is what the tree holds or is being brought to; `base_version` is the last
#: version that was complete here, so a stage can tell files datamover wrote from files a
#: user changed. `owner` is `host:pid` of a running stage, for crash detection.
#: `held_since` (migration 0007) is since when the tree holds `base_version`, but for files
#: with a later ctime: a push reads those whatever their size and mtime, a stage before it
#: keeps them. A stage leaves it as it is until it ends `ready` (files an interrupted one
#: wrote are newer). NULL when unknown (a record from before): size and mtime decide.
Replica = Table(
    "replicas",
    metadata,
    Column("dataset", Text, primary_key=True),
    Column("root", Text, nullable=False),
    Column("version", String(128), nullable=False),
    Column("base_version", String(128)),
    Column("state", String(16), nullable=False),
    Column("files", BigInteger, default=0, nullable=False),
    Column("bytes", BigInteger, default=0, nullable=False),
    Column("owner", String(128)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("last_access", DateTime(timezone=True), nullable=False),
    Column("held_since", DateTime(timezone=True)),
)


#: An unfinished push: who runs it, from which parent, which local tree it reads (`root`;
#: NULL from before migration 0007: not resumed), and when the run whose segments it keeps
#: began to walk it (`started_at`): a file whose ctime is later is read by a rerun.
PushCheckpoint = Table(
    "push_checkpoints",
    metadata,
    Column("dataset", Text, primary_key=True),
    Column("parent", String(128)),
    Column("owner", String(128)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("root", Text),
    Column("started_at", DateTime(timezone=True)),
)


#: A manifest segment an unfinished push has uploaded, in order (`seq`).
#:
#: A rerun reads these back to skip unchanged files without reading them, and to skip
#: uploading identical segments again.
PushSegment = Table(
    "push_segments",
    metadata,
    Column("dataset", Text, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("digest", LargeBinary(32), nullable=False),
    Column("stored_size", BigInteger, nullable=False),
    Column("entries", BigInteger, nullable=False),
    Column("first_path", Text, nullable=False),
    Column("last_path", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
)


#: A durable push or stage job. `state` changes only through `transfers.transition`.
#:
#: `rank_time` orders the queue (see `domain.transfers.rank_time`); `not_before` delays a
#: retry; `lease_owner`/`lease_expires` say which worker runs it and until when, renewed by
#: heartbeats, so a dead worker's transfer is taken over once its lease lapses. `pin` is null
#: once a release took it; `options` (JSON) keeps it as submitted (`transfer_rows.SUBMITTED_PIN`),
#: for an idempotent retry to be compared with.
Transfer = Table(
    "transfers",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("path", Text, nullable=False),
    Column("version", String(128)),
    Column("priority", String(16), nullable=False),
    Column("deadline", DateTime(timezone=True)),
    Column("pin", String(256)),
    Column("options", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("rank_time", DateTime(timezone=True), nullable=False),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_expires", DateTime(timezone=True)),
    Column("cancel_requested", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("files_done", BigInteger, nullable=False),
    Column("files_total", BigInteger),
    Column("bytes_done", BigInteger, nullable=False),
    Column("bytes_total", BigInteger),
    Column("bytes_moved", BigInteger, nullable=False),
    Column("rate", Float, nullable=False),
    Column("result", Text),
    Column("error_code", String(64)),
    Column("error_message", Text),
    Column("error_paths", Text),
    Column("idempotency_key", String(256)),
    UniqueConstraint("tenant", "idempotency_key", name="uq_transfers_idempotency"),
    Index("ix_transfers_queue", "state", "rank_time"),
    # A path's newest ended stage, and its queued ones (thousands of ended stages of one
    # dataset are common: a job array's prologs).
    Index("ix_transfers_path_state", "path", "state", "finished_at"),
    Index("ix_transfers_finished", "finished_at"),  # the history's pruning, oldest first
)


#: An API bearer token, stored as its SHA-256 (tokens are random, 256 bits).
Token = Table(
    "tokens",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("hash", String(64), unique=True, nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("prefixes", Text, nullable=False),  # JSON list of logical prefixes
    Column("scopes", Text, nullable=False),  # JSON list of read/write/admin
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),  # None: until revoked
)


#: A hold on a dataset's replica at this site (a Slurm job, a pod): eviction skips it.
#:
#: The pin id is the client's (a job id), so it is one tenant's: two tenants using one id
#: for one dataset hold two rows, each released by its own tenant.
Pin = Table(
    "pins",
    metadata,
    Column("pin", String(256), nullable=False),
    Column("dataset", Text, nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("version", String(128)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("tenant", "pin", "dataset", name="pins_pkey"),
)


#: The site whose catalog this is, recorded by the first site that opens it (one row, id 1).
#: A second site's configuration pointed at the same catalog is refused, not run: its
#: daemon would take this site's queued transfers and run them at its own paths.
CatalogSite = Table(
    "catalog_site",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("claimed_at", DateTime(timezone=True), nullable=False),
)
