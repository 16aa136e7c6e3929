"""exact money of any scale, runs keyed by business day, bounded sweeping, forced syncs per task

- Money columns become NUMERIC without precision on PostgreSQL: NUMERIC(28,8) rounded amounts with
  more than 8 decimals silently, and refused 1e20 with an error the refresh could only call a bug.
- refresh_runs.business_day (fixed when the run starts), redrives and replans (the sweeper's bounded
  re-drives); run_tenants.resends (bounded re-sends of a summary or forecast); an index to find a
  run's latest progress.
- forced_syncs.task_id: a refresh's retries never force a second bank sync.
- bank_accounts.currency may be null (Powens sends none until the bank has reported).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MONEY_COLUMNS = {
    "bank_accounts": ("balance", "coming"),
    "account_balances": ("current_balance", "available_balance"),
    "balance_snapshots": ("current_balance", "available_balance"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":  # SQLite keeps exact decimal text already
        for table, columns in MONEY_COLUMNS.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.Numeric(), existing_type=sa.Numeric(28, 8))
    with op.batch_alter_table("bank_accounts") as batch:
        batch.alter_column("currency", existing_type=sa.String(3), nullable=True)
    with op.batch_alter_table("refresh_runs") as batch:
        batch.add_column(sa.Column("business_day", sa.Date(), nullable=True))
        batch.add_column(sa.Column("redrives", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("replans", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("run_tenants") as batch:
        batch.add_column(sa.Column("resends", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("run_items") as batch:
        batch.create_index("ix_run_items_run_finished", ["run_id", "finished_at"], unique=False)
    with op.batch_alter_table("forced_syncs") as batch:
        batch.add_column(sa.Column("task_id", sa.String(200), nullable=True))
        batch.create_index("ix_forced_syncs_task_id", ["task_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("forced_syncs") as batch:
        batch.drop_index("ix_forced_syncs_task_id")
        batch.drop_column("task_id")
    with op.batch_alter_table("run_items") as batch:
        batch.drop_index("ix_run_items_run_finished")
    with op.batch_alter_table("run_tenants") as batch:
        batch.drop_column("resends")
    with op.batch_alter_table("refresh_runs") as batch:
        batch.drop_column("replans")
        batch.drop_column("redrives")
        batch.drop_column("business_day")
    with op.batch_alter_table("bank_accounts") as batch:
        batch.alter_column("currency", existing_type=sa.String(3), nullable=False)
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in MONEY_COLUMNS.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.Numeric(28, 8), existing_type=sa.Numeric())
