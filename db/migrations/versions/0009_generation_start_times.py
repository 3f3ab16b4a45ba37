"""generation start times on candidates and outputs

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("candidates", "outputs"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("outputs", "candidates"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("started_at")
