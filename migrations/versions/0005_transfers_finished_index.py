"""Index transfers by the time they ended: the daemon deletes those that ended more than
`[api] history_days` ago, oldest first, a batch at a time, and each batch must find its rows
without reading the whole table.

An index only: daemons of the previous release may keep running while it is applied (on
PostgreSQL the CREATE INDEX holds writes to `transfers` back while it builds).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_transfers_finished", "transfers", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_transfers_finished", table_name="transfers")
