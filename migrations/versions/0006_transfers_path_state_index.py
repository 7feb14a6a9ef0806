"""Index transfers by path, state and end time instead of by path alone.

A job array's prologs stage one dataset thousands of times a day, and the history keeps
them for `[api] history_days`: a path can hold hundreds of thousands of ended stages. Each
stage claimed looks for the newest stage of its path that succeeded since it was asked
(`Transfers.stage_ended_since_asked`), which read every row of the path through the path
index: 127 ms on SQLite and 108 ms on PostgreSQL at 300,000 rows, against 1.8 and 2.4 ms
through this one. It serves the path-only lookups too (its first column), so it replaces
the old index.

An index only: daemons of the previous release may keep running while it is applied (on
PostgreSQL the CREATE INDEX holds writes to `transfers` back while it builds).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_transfers_path_state", "transfers", ["path", "state", "finished_at"])
    op.drop_index("ix_transfers_path", table_name="transfers")


def downgrade() -> None:
    op.create_index("ix_transfers_path", "transfers", ["path"])
    op.drop_index("ix_transfers_path_state", table_name="transfers")
