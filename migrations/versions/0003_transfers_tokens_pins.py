"""Transfers (durable jobs with leases), API tokens and pins.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfers",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("version", sa.String(128)),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True)),
        sa.Column("pin", sa.String(256)),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("rank_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("files_done", sa.BigInteger, nullable=False),
        sa.Column("files_total", sa.BigInteger),
        sa.Column("bytes_done", sa.BigInteger, nullable=False),
        sa.Column("bytes_total", sa.BigInteger),
        sa.Column("bytes_moved", sa.BigInteger, nullable=False),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("error_paths", sa.Text),
        sa.Column("idempotency_key", sa.String(256)),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_transfers_idempotency"),
    )
    op.create_index("ix_transfers_queue", "transfers", ["state", "rank_time"])
    op.create_index("ix_transfers_path", "transfers", ["path"])
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("prefixes", sa.Text, nullable=False),
        sa.Column("scopes", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
    )
    op.create_table(
        "pins",
        sa.Column("pin", sa.String(256), primary_key=True),
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pins")
    op.drop_table("tokens")
    op.drop_index("ix_transfers_path", table_name="transfers")
    op.drop_index("ix_transfers_queue", table_name="transfers")
    op.drop_table("transfers")
