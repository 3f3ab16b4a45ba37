"""engine loads

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "engine_loads",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("evicted", sa.JSON(), nullable=False),
        sa.Column("unload_seconds", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("engine_loads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_engine_loads_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("engine_loads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_engine_loads_job_id"))
    op.drop_table("engine_loads")
