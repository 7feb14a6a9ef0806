"""SQLAlchemy models of the catalog. The schema's history lives in `migrations/`.

The catalog is a site's cache and work record; the bucket stays the source of truth for data
and versions (docs/format.md). What only the catalog knows: which chunks this site has seen in
which pack (dedup on push), what is materialised in the cache (replicas) and unfinished work
(push checkpoints).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""


class Chunk(Base):
    """Where a chunk known to this site is stored (one row per digest)."""

    __tablename__ = "chunks"
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    pack: Mapped[bytes] = mapped_column(LargeBinary(32))
    offset: Mapped[int] = mapped_column(BigInteger)
    stored_length: Mapped[int] = mapped_column(Integer)
    raw_length: Mapped[int] = mapped_column(Integer)
    codec: Mapped[int] = mapped_column(SmallInteger)


class Pack(Base):
    """A pack this site knows to be complete in the store."""

    __tablename__ = "packs"
    id: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunks: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_packs_created_at", "created_at"),)


class Version(Base):
    """A cached copy of an immutable version document."""

    __tablename__ = "versions"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    dataset: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(128))
    site: Mapped[str] = mapped_column(String(64))
    created: Mapped[str] = mapped_column(String(40))
    manifest: Mapped[str] = mapped_column(String(64))
    manifest_size: Mapped[int] = mapped_column(BigInteger)
    segments: Mapped[int] = mapped_column(Integer)
    files: Mapped[int] = mapped_column(BigInteger)
    dirs: Mapped[int] = mapped_column(BigInteger)
    symlinks: Mapped[int] = mapped_column(BigInteger)
    bytes: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_versions_dataset_id", "dataset", "id"),)


class Replica(Base):
    """A dataset materialised (or being materialised) in this site's cache.

    `version` is what the tree holds or is being brought to; `base_version` is the last
    version that was complete here, so a stage can tell files datamover wrote from files a
    user changed. `owner` is `host:pid` of a running stage, for crash detection.
    """

    __tablename__ = "replicas"
    dataset: Mapped[str] = mapped_column(Text, primary_key=True)
    root: Mapped[str] = mapped_column(Text)
    version: Mapped[str] = mapped_column(String(128))
    base_version: Mapped[str | None] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    files: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_access: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PushCheckpoint(Base):
    """An unfinished push: who runs it and from which parent."""

    __tablename__ = "push_checkpoints"
    dataset: Mapped[str] = mapped_column(Text, primary_key=True)
    parent: Mapped[str | None] = mapped_column(String(128))
    owner: Mapped[str | None] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PushSegment(Base):
    """A manifest segment an unfinished push has uploaded, in order (`seq`).

    A rerun reads these back to skip unchanged files without reading them, and to skip
    uploading identical segments again.
    """

    __tablename__ = "push_segments"
    dataset: Mapped[str] = mapped_column(Text, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    stored_size: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(BigInteger)
    first_path: Mapped[str] = mapped_column(Text)
    last_path: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)


class Transfer(Base):
    """A durable push or stage job. `state` changes only through `transfers.transition`.

    `rank_time` orders the queue (see `domain.transfers.rank_time`); `not_before` delays a
    retry; `lease_owner`/`lease_expires` say which worker runs it and until when, renewed by
    heartbeats, so a dead worker's transfer is taken over once its lease lapses.
    """

    __tablename__ = "transfers"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(String(128))
    priority: Mapped[str] = mapped_column(String(16))
    deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pin: Mapped[str | None] = mapped_column(String(256))
    options: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    rank_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    not_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    files_done: Mapped[int] = mapped_column(BigInteger)
    files_total: Mapped[int | None] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    bytes_moved: Mapped[int] = mapped_column(BigInteger)
    rate: Mapped[float] = mapped_column(Float)
    result: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_paths: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_transfers_idempotency"),
        Index("ix_transfers_queue", "state", "rank_time"),
        # A path's newest ended stage, and its queued ones (thousands of ended stages of one
        # dataset are common: a job array's prologs).
        Index("ix_transfers_path_state", "path", "state", "finished_at"),
        Index("ix_transfers_finished", "finished_at"),  # the history's pruning, oldest first
    )


class Token(Base):
    """An API bearer token, stored as its SHA-256 (tokens are random, 256 bits)."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    prefixes: Mapped[str] = mapped_column(Text)  # JSON list of logical prefixes
    scopes: Mapped[str] = mapped_column(Text)  # JSON list of read/write/admin
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Pin(Base):
    """A hold on a dataset's replica at this site (a Slurm job, a pod): eviction skips it.

    The pin id is the client's (a job id), so it is one tenant's: two tenants using one id
    for one dataset hold two rows, each released by its own tenant."""

    __tablename__ = "pins"
    pin: Mapped[str] = mapped_column(String(256))
    dataset: Mapped[str] = mapped_column(Text)
    tenant: Mapped[str] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (PrimaryKeyConstraint("tenant", "pin", "dataset", name="pins_pkey"),)
