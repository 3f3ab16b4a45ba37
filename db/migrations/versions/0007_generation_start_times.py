"""generation start times on candidates and outputs

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
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
