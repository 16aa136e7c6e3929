"""Powens users can be unlinked: the token is deleted, the row and its accounts' history stay

``powens_users.token_encrypted`` may be NULL (unlinked), ``powens_users.unlinked_at`` says since when (a
CHECK keeps the two together), and ``bank_accounts.status`` admits ``unlinked``: the accounts of an
unlinked user, out of every refresh until the user is linked again.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out (not imported from the app) so that this migration keeps meaning what it meant.
BEFORE = "status IN ('active', 'disabled', 'deleted')"
AFTER = "status IN ('active', 'disabled', 'deleted', 'unlinked')"
LINKED = "(token_encrypted IS NULL) = (unlinked_at IS NOT NULL)"


def _status_check(condition: str) -> None:
    with op.batch_alter_table("bank_accounts") as batch:
        batch.drop_constraint(op.f("ck_bank_accounts_status"), type_="check")
        batch.create_check_constraint(op.f("ck_bank_accounts_status"), condition)


def upgrade() -> None:
    _status_check(AFTER)
    with op.batch_alter_table("powens_users") as batch:
        batch.add_column(sa.Column("unlinked_at", sa.DateTime(timezone=True), nullable=True))
        batch.alter_column("token_encrypted", existing_type=sa.LargeBinary(), nullable=True)
        batch.create_check_constraint(op.f("ck_powens_users_linked"), LINKED)


def downgrade() -> None:
    unlinked = op.get_bind().execute(
        sa.text("SELECT count(*) FROM powens_users WHERE unlinked_at IS NOT NULL")
    )
    if unlinked.scalar_one():
        raise RuntimeError(
            "unlinked Powens users have no token to keep before 0010: link them again "
            "(`balances powens link`) before downgrading"
        )
    with op.batch_alter_table("powens_users") as batch:
        batch.drop_constraint(op.f("ck_powens_users_linked"), type_="check")
        batch.alter_column("token_encrypted", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("unlinked_at")
    _status_check(BEFORE)
