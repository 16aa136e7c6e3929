"""planning in steps: the planner's cursors and lease on the run, its keyset index on the accounts

``refresh_runs.plan_tenant_id`` / ``plan_user_pk`` / ``plan_account_id``: the last account written as
an item (the keyset of (tenant, Powens user, account id) the planner pages through); ``published_*``:
the last one published; ``planner_lease_until``: until when the live planner holds the run (renewed by
every step); ``outcomes``: the run's final counts, kept on the run when retention prunes its items.

Indexes, built ``CONCURRENTLY`` on PostgreSQL (the tables are read and written all night; a plain
CREATE INDEX would block their writers for as long as the build takes, minutes at 10 M accounts):
``ix_bank_accounts_active_plan``, the planner reads a page of active accounts in its keyset order off
it instead of sorting every account for every page; ``ix_run_items_run_plan`` replaces the index on
(run, tenant), which is its prefix, and serves the keyset too; ``ix_run_tenants_run_status``: whether a
run has a tenant still open, asked by every forecast, answered by index instead of counted.

Re-runnable: a failed upgrade (its job killed during a build) leaves the columns added and maybe an
INVALID index; the next attempt adds what is missing and builds again what is invalid.

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

COLUMNS = (
    ("plan_tenant_id", sa.String(128), "varchar(128)"),
    ("plan_user_pk", sa.BigInteger(), "bigint"),
    ("plan_account_id", sa.String(64), "varchar(64)"),
    ("published_tenant_id", sa.String(128), "varchar(128)"),
    ("published_user_pk", sa.BigInteger(), "bigint"),
    ("published_account_id", sa.String(64), "varchar(64)"),
    ("planner_lease_until", sa.DateTime(timezone=True), "timestamp with time zone"),
    ("outcomes", sa.JSON(), "json"),
)
# name, table, columns, partial condition
INDEXES = (
    (
        "ix_bank_accounts_active_plan",
        "bank_accounts",
        ("tenant_id", "powens_user_pk", "id"),
        "status = 'active'",
    ),
    ("ix_run_items_run_plan", "run_items", ("run_id", "tenant_id", "powens_user_pk", "account_id"), None),
    ("ix_run_tenants_run_status", "run_tenants", ("run_id", "status"), None),
)
REPLACED = ("ix_run_items_run_tenant", "run_items", ("run_id", "tenant_id"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("refresh_runs") as batch:
            for name, kind, _sql in COLUMNS:
                batch.add_column(sa.Column(name, kind, nullable=True))
        for name, table, cols, where in INDEXES:
            op.create_index(name, table, list(cols), sqlite_where=sa.text(where) if where else None)
        op.drop_index(REPLACED[0], table_name=REPLACED[1])
        return
    for name, _kind, sql in COLUMNS:
        op.execute(f"ALTER TABLE refresh_runs ADD COLUMN IF NOT EXISTS {name} {sql}")
    with op.get_context().autocommit_block():
        for name, table, cols, where in INDEXES:
            _drop_if_invalid(name)
            condition = f" WHERE {where}" if where else ""
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({', '.join(cols)}){condition}"
            )
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {REPLACED[0]}")


def _drop_if_invalid(name: str) -> None:
    """An interrupted CONCURRENTLY build leaves an INVALID index that IF NOT EXISTS would accept."""
    valid = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = :n"
            ),
            {"n": name},
        )
        .scalar()
    )
    if valid is False:
        op.execute(f"DROP INDEX CONCURRENTLY {name}")


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    if postgres:
        with op.get_context().autocommit_block():
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {REPLACED[0]} ON run_items (run_id, tenant_id)"
            )
            for name, _table, _cols, _where in INDEXES:
                op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    else:
        op.create_index(REPLACED[0], REPLACED[1], list(REPLACED[2]))
        for name, table, _cols, _where in INDEXES:
            op.drop_index(name, table_name=table)
    with op.batch_alter_table("refresh_runs") as batch:
        for name, _kind, _sql in reversed(COLUMNS):
            batch.drop_column(name)
