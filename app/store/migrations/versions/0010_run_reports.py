"""the run report: one delivery sequence per run, claimed and recorded on the run's row

``report_owner`` (the task holding the delivery, claimed by a conditional UPDATE) until
``report_lease_until``; ``report_attempts`` made; ``report_outcome`` (sent, failed, refused) and
``report_finished_at``; ``report_resends`` by the sweeper. All nullable or defaulted: existing runs
are untouched (the sweeper only re-sends reports of runs finished within the last day).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from the app) so that this migration keeps meaning what it meant.
OUTCOMES = "report_outcome IN ('sent', 'failed', 'refused')"


def upgrade() -> None:
    # Nullable columns and constant defaults: a catalogue change on PostgreSQL 11+ (no rewrite).
    with op.batch_alter_table("refresh_runs") as batch:
        batch.add_column(sa.Column("report_owner", sa.String(64), nullable=True))
        batch.add_column(sa.Column("report_lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("report_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("report_outcome", sa.String(16), nullable=True))
        batch.add_column(sa.Column("report_finished_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("report_resends", sa.Integer(), nullable=False, server_default="0"))
        batch.create_check_constraint(op.f("ck_refresh_runs_report_outcome"), OUTCOMES)


def downgrade() -> None:
    with op.batch_alter_table("refresh_runs") as batch:
        batch.drop_constraint(op.f("ck_refresh_runs_report_outcome"), type_="check")
        for column in (
            "report_resends",
            "report_finished_at",
            "report_outcome",
            "report_attempts",
            "report_lease_until",
            "report_owner",
        ):
            batch.drop_column(column)
