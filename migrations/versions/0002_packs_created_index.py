"""Index packs by creation time (garbage collection's grace period scans them by age).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_packs_created_at", "packs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_packs_created_at", table_name="packs")
