"""Pins are keyed by tenant, pin id and dataset: a pin id is the client's (a Slurm job id),
so two tenants may use one for one dataset, and each must hold and release its own.

Every existing row keeps the tenant it records, the one that pinned first: a later tenant's
pin of the same id and dataset was merged into that row and cannot be told apart from it.

Daemons of the previous release must be stopped first: they upsert pins `ON CONFLICT (pin,
dataset)`, which no unique key matches after this, and check the revision only at start-up.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _pins(*key: str) -> sa.Table:
    """The `pins` table as it is before the change, its primary key named as PostgreSQL
    named it. SQLite reflects a primary key without its name; batch mode copies the table
    from this description instead, so one `drop_constraint` serves both engines."""
    return sa.Table(
        "pins",
        sa.MetaData(),
        sa.Column("pin", sa.String(256), nullable=False),
        sa.Column("dataset", sa.Text, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(*key, name="pins_pkey"),
    )


def upgrade() -> None:
    with op.batch_alter_table("pins", copy_from=_pins("pin", "dataset")) as batch:
        batch.drop_constraint("pins_pkey", type_="primary")
        batch.create_primary_key("pins_pkey", ["tenant", "pin", "dataset"])


def downgrade() -> None:
    # The old key holds one row per pin id and dataset: keep the first tenant's, as the old
    # key kept it.
    op.execute(
        "DELETE FROM pins WHERE EXISTS (SELECT 1 FROM pins AS o WHERE o.pin = pins.pin "
        "AND o.dataset = pins.dataset AND (o.created_at < pins.created_at "
        "OR (o.created_at = pins.created_at AND o.tenant < pins.tenant)))"
    )
    with op.batch_alter_table("pins", copy_from=_pins("tenant", "pin", "dataset")) as batch:
        batch.drop_constraint("pins_pkey", type_="primary")
        batch.create_primary_key("pins_pkey", ["pin", "dataset"])
