"""the push path: trigger ``webhook``; when an account's balances last came by push; when a
connection entered its state and when its PSD2 consent ends; when a rate-limited refresh may be tried
again

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from the app) so that this migration keeps meaning what it meant.
BEFORE = "trigger IN ('scheduled', 'on_demand')"
AFTER = "trigger IN ('scheduled', 'on_demand', 'webhook')"


def _trigger_check(condition: str) -> None:
    for table in ("refresh_attempts", "refresh_runs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"ck_{table}_trigger"), type_="check")
            batch.create_check_constraint(op.f(f"ck_{table}_trigger"), condition)


def upgrade() -> None:
    _trigger_check(AFTER)
    with op.batch_alter_table("bank_accounts") as batch:
        batch.add_column(sa.Column("pushed_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("bank_connections") as batch:
        batch.add_column(sa.Column("state_since", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("consent_expires_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("refresh_attempts") as batch:
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    # A connection already in a state has been in it at least since its row last changed.
    op.execute("UPDATE bank_connections SET state_since = updated_at WHERE state IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("refresh_attempts") as batch:
        batch.drop_column("next_attempt_at")
    with op.batch_alter_table("bank_connections") as batch:
        batch.drop_column("consent_expires_at")
        batch.drop_column("state_since")
    with op.batch_alter_table("bank_accounts") as batch:
        batch.drop_column("pushed_at")
    op.execute("DELETE FROM refresh_attempts WHERE trigger = 'webhook'")
    op.execute("DELETE FROM refresh_runs WHERE trigger = 'webhook'")
    _trigger_check(BEFORE)
