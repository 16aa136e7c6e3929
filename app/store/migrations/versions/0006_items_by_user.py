"""run items know their Powens user: published grouped by user

A user's accounts then reach the user's shared read together (one Powens call, one backoff window),
instead of spread across the run in account-id order.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_items") as batch:
        batch.add_column(sa.Column("powens_user_pk", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_run_items_run_user", ["run_id", "powens_user_pk", "account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("run_items") as batch:
        batch.drop_index("ix_run_items_run_user")
        batch.drop_column("powens_user_pk")
