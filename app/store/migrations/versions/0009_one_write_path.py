"""one write path: snapshots say when the run carried them; account statuses know when they were said

``balance_snapshots.carried``: the day's snapshot of an account the run did not read (a push kept it
fresh) is copied from its latest record, and says so. ``bank_accounts.status_at``: when Powens' word set
the account's status, so that an older word (a replayed ``ACCOUNT_DISABLED``) changes nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Adding a column with a constant default is a catalogue change on PostgreSQL 11+ (no rewrite).
    with op.batch_alter_table("balance_snapshots") as batch:
        batch.add_column(sa.Column("carried", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("bank_accounts") as batch:
        batch.add_column(sa.Column("status_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("bank_accounts") as batch:
        batch.drop_column("status_at")
    with op.batch_alter_table("balance_snapshots") as batch:
        batch.drop_column("carried")
