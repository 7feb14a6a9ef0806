"""Record which site a catalog belongs to (`catalog_site`, one row); tokens may expire
(`tokens.expires_at`, nullable: a token made before never does).

Nothing tied a catalog to its site: a second site whose configuration named the first one's
PostgreSQL catalog started, took the first site's queued transfers and ran them at its own
paths, and the first site reported them done. The first site that opens the catalog after
this revision records its `[site] name`; any other name is refused from then on.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_site",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.add_column("tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("expires_at")
    op.drop_table("catalog_site")
