"""the worker that ran each stage

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("candidates", "outputs"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("worker", sa.String(length=200), nullable=True))


def downgrade() -> None:
    for table in ("candidates", "outputs"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_column("worker")
