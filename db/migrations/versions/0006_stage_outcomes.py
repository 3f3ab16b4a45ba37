"""stage outcomes: failed loads, submit fingerprints, judge dispatch

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("engine_loads") as batch_op:
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("idempotency_digest", sa.String(length=64), nullable=True))
    with op.batch_alter_table("judgments") as batch_op:
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("judgments") as batch_op:
        batch_op.drop_column("dispatched_at")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("idempotency_digest")
    with op.batch_alter_table("engine_loads") as batch_op:
        batch_op.drop_column("error")
