"""Initial catalog: chunk index, packs, versions, replicas, push checkpoints and their segments.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chunks",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("pack", sa.LargeBinary(32), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("stored_length", sa.Integer, nullable=False),
        sa.Column("raw_length", sa.Integer, nullable=False),
        sa.Column("codec", sa.SmallInteger, nullable=False),
    )
    op.create_table(
        "packs",
        sa.Column("id", sa.LargeBinary(32), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("parent", sa.String(128)),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("created", sa.String(40), nullable=False),
        sa.Column("manifest", sa.String(64), nullable=False),
        sa.Column("manifest_size", sa.BigInteger, nullable=False),
        sa.Column("segments", sa.Integer, nullable=False),
        sa.Column("files", sa.BigInteger, nullable=False),
        sa.Column("dirs", sa.BigInteger, nullable=False),
        sa.Column("symlinks", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_versions_dataset_id", "versions", ["dataset", "id"])
    op.create_table(
        "replicas",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("root", sa.Text, nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("base_version", sa.String(128)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("files", sa.BigInteger, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(128)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_access", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "push_checkpoints",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("parent", sa.String(128)),
        sa.Column("owner", sa.String(128)),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "push_segments",
        sa.Column("dataset", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("stored_size", sa.BigInteger, nullable=False),
        sa.Column("entries", sa.BigInteger, nullable=False),
        sa.Column("first_path", sa.Text, nullable=False),
        sa.Column("last_path", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("push_segments")
    op.drop_table("push_checkpoints")
    op.drop_table("replicas")
    op.drop_index("ix_versions_dataset_id", table_name="versions")
    op.drop_table("versions")
    op.drop_table("packs")
    op.drop_table("chunks")
