"""status columns checked by the database; unused refresh_runs.powens_calls dropped

Runs started from the admin shell used to carry trigger ``manual``, a value outside the refresh
triggers; they now carry ``on_demand`` like every other operator action.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from the app) so that this migration keeps meaning what it meant.
CHECKS = {
    "bank_accounts": [("status", "status IN ('active', 'disabled', 'deleted')")],
    "refresh_attempts": [
        ("outcome", "outcome IN ('succeeded', 'failed')"),
        ("trigger", "trigger IN ('scheduled', 'on_demand')"),
    ],
    "refresh_runs": [
        ("status", "status IN ('pending', 'planning', 'running', 'completed', 'stale')"),
        ("trigger", "trigger IN ('scheduled', 'on_demand')"),
        ("kind", "kind IN ('nightly')"),
    ],
    "run_tenants": [("status", "status IN ('refreshing', 'summarising', 'forecasting', 'done')")],
    "run_items": [("status", "status IN ('pending', 'succeeded', 'failed', 'stale')")],
}


def upgrade() -> None:
    op.execute("UPDATE refresh_runs SET trigger = 'on_demand' WHERE trigger = 'manual'")
    with op.batch_alter_table("refresh_runs") as batch:
        batch.drop_column("powens_calls")
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            for name, condition in checks:
                batch.create_check_constraint(op.f(f"ck_{table}_{name}"), condition)


def downgrade() -> None:
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            for name, _condition in checks:
                batch.drop_constraint(op.f(f"ck_{table}_{name}"), type_="check")
    with op.batch_alter_table("refresh_runs") as batch:
        batch.add_column(sa.Column("powens_calls", sa.Integer(), nullable=True))
