"""evaluations and judgments

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("reference", sa.String(length=1000), nullable=False),
        sa.Column("reference_digest", sa.String(length=64), nullable=False),
        sa.Column("judge", sa.String(length=500), nullable=False),
        sa.Column("judge_spec", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("win_rate", sa.Float(), nullable=True),
        sa.Column("standard_error", sa.Float(), nullable=True),
        sa.Column("lc_win_rate", sa.Float(), nullable=True),
        sa.Column("lc_standard_error", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "reference_digest", "judge", name="uq_evaluations_job_reference_judge"),
    )
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_evaluations_job_id"), ["job_id"], unique=False)

    op.create_table(
        "judgments",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("evaluation_id", BigId, nullable=False),
        sa.Column("item_id", BigId, nullable=False),
        sa.Column("reference_index", sa.Integer(), nullable=True),
        sa.Column("reference_output", sa.Text(), nullable=False),
        sa.Column("reference_generator", sa.String(length=200), nullable=True),
        sa.Column("swapped", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("preference", sa.Float(), nullable=True),
        sa.Column("verdict_logprobs", sa.JSON(), nullable=True),
        sa.Column("judge_text", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("judged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["evaluation_id"], ["evaluations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("evaluation_id", "item_id", name="uq_judgments_evaluation_item"),
    )
    with op.batch_alter_table("judgments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_judgments_evaluation_id"), ["evaluation_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_judgments_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("judgments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_judgments_status"))
        batch_op.drop_index(batch_op.f("ix_judgments_evaluation_id"))
    op.drop_table("judgments")
    with op.batch_alter_table("evaluations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_evaluations_job_id"))
    op.drop_table("evaluations")
