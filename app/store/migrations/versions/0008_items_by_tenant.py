"""run items found by tenant: a tenant's summary reads its own items, not the whole run's

Without it each of a run's summaries walked every item of the run (the primary key starts with the
run): 2,000 tenants, each walking 100,000 items, a night.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run_items") as batch:
        batch.create_index("ix_run_items_run_tenant", ["run_id", "tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("run_items") as batch:
        batch.drop_index("ix_run_items_run_tenant")
