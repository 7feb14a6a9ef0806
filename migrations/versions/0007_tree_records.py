"""Record which local tree an unfinished push read and when its run began to walk it
(`push_checkpoints.root`, `started_at`), and since when a replica's tree is known to hold
its version (`replicas.held_since`).

`push_checkpoints.root`: a rerun takes the files its interrupted run checkpointed as
unchanged when their names, sizes and mtimes match. That holds only for the same tree: a
first push killed, the namespace then mapped to another directory with the same names,
sizes and mtimes (a copy made with `cp -p`, `rsync -a`), and the rerun would publish the
first tree's bytes for the second's. A rerun now resumes only a checkpoint of the tree it
reads; a checkpoint of another tree, or one written before this revision (NULL), starts the
push over.

`push_checkpoints.started_at`: a rerun reads a file the interrupted run took from its
checkpoint if its ctime is later (replaced since the run walked it).

`replicas.held_since`: a file replaced by other bytes of its size under its old mtime has a
newer ctime; a push reads every file whose ctime is not before this time, whatever its size
and mtime. NULL (records from before this revision) keeps size and mtime alone, until the
next push or stage of the dataset records a time.

Nullable columns only: daemons of the previous release may keep running while it is applied;
the checkpoints they start record no root (a rerun of the new release starts those over) and
the replicas they record no time.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("push_checkpoints", sa.Column("root", sa.Text(), nullable=True))
    op.add_column(
        "push_checkpoints", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("replicas", sa.Column("held_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("held_since")
    with op.batch_alter_table("push_checkpoints") as batch:
        batch.drop_column("started_at")
        batch.drop_column("root")
