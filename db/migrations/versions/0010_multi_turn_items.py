"""multi-turn items: candidates and outputs per user turn

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# SQLite's batch mode rebuilds the table from reflection, where the outputs' unique constraint on
# item_id has no name: this convention gives it the one Postgres gave it.
_NAMES = {"uq": "%(table_name)s_%(column_0_name)s_key"}


def upgrade() -> None:
    with op.batch_alter_table("items") as batch_op:
        batch_op.add_column(sa.Column("turns", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("last_turn", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("candidates") as batch_op:
        batch_op.add_column(sa.Column("turn", sa.Integer(), server_default="0", nullable=False))
        batch_op.drop_constraint("uq_candidates_item_layer_slot", type_="unique")
        batch_op.create_unique_constraint(
            "uq_candidates_item_turn_layer_slot", ["item_id", "turn", "layer", "slot"]
        )
    with op.batch_alter_table("outputs", naming_convention=_NAMES) as batch_op:
        batch_op.add_column(sa.Column("turn", sa.Integer(), server_default="0", nullable=False))
        batch_op.drop_constraint("outputs_item_id_key", type_="unique")
        batch_op.create_unique_constraint("uq_outputs_item_turn", ["item_id", "turn"])


def downgrade() -> None:
    op.execute("DELETE FROM outputs WHERE turn > 0")
    op.execute("DELETE FROM candidates WHERE turn > 0")
    with op.batch_alter_table("outputs", naming_convention=_NAMES) as batch_op:
        batch_op.drop_constraint("uq_outputs_item_turn", type_="unique")
        batch_op.create_unique_constraint("outputs_item_id_key", ["item_id"])
        batch_op.drop_column("turn")
    with op.batch_alter_table("candidates") as batch_op:
        batch_op.drop_constraint("uq_candidates_item_turn_layer_slot", type_="unique")
        batch_op.create_unique_constraint("uq_candidates_item_layer_slot", ["item_id", "layer", "slot"])
        batch_op.drop_column("turn")
    with op.batch_alter_table("items") as batch_op:
        batch_op.drop_column("last_turn")
        batch_op.drop_column("turns")
