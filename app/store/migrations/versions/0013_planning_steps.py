"""planning in steps: the planner's cursors and lease on the run, its keyset index on the accounts

``refresh_runs.plan_user_pk`` / ``plan_account_id``: the last account written as an item (the keyset
of (Powens user, account id) the planner pages through); ``published_*``: the last one published;
``planner_lease_until``: until when the live planner holds the run (renewed by every step).
``outcomes``: the run's final counts, kept on the run when retention prunes its items.
``ix_bank_accounts_active_user``: the planner reads a page of active accounts in that order, from
an index instead of sorting every account for every page. Built ``CONCURRENTLY`` on PostgreSQL:
``bank_accounts`` is read and written all night, and a plain CREATE INDEX would block its writers for
as long as the build takes (minutes at 10 M accounts).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_bank_accounts_active_user"


def upgrade() -> None:
    with op.batch_alter_table("refresh_runs") as batch:
        batch.add_column(sa.Column("plan_user_pk", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("plan_account_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("published_user_pk", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("published_account_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("planner_lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("outcomes", sa.JSON(), nullable=True))
    where = sa.text("status = 'active'")
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index(
                INDEX,
                "bank_accounts",
                ["powens_user_pk", "id"],
                postgresql_where=where,
                postgresql_concurrently=True,
                if_not_exists=True,
            )
    else:
        op.create_index(INDEX, "bank_accounts", ["powens_user_pk", "id"], sqlite_where=where)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.drop_index(INDEX, table_name="bank_accounts", postgresql_concurrently=True, if_exists=True)
    else:
        op.drop_index(INDEX, table_name="bank_accounts")
    with op.batch_alter_table("refresh_runs") as batch:
        for column in (
            "outcomes",
            "planner_lease_until",
            "published_account_id",
            "published_user_pk",
            "plan_account_id",
            "plan_user_pk",
        ):
            batch.drop_column(column)
