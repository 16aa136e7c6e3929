"""sealed data: masked account numbers and IBANs only; an audit of administrative events

- bank_accounts.iban / number become iban_masked / number_masked, masked in place as ContractSpec
  masks them (all but the last 4 characters): the full values were never needed.
- audit_events: role grants and revokes (who, whom, when), the bootstrap, key rotations, reconnect
  links issued, forged task messages.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _mask(column: str) -> str:
    """SQL for ContractSpec's mask: 4 characters or fewer all '*', else '*' x (len-4) + the last 4."""
    return (
        f"CASE WHEN {column} IS NULL THEN NULL "
        f"WHEN length({column}) <= 4 THEN substr('****', 1, length({column})) "
        f"ELSE substr('{'*' * 64}', 1, length({column}) - 4) || substr({column}, length({column}) - 3) END"
    )


def upgrade() -> None:
    with op.batch_alter_table("bank_accounts") as batch:
        batch.add_column(sa.Column("iban_masked", sa.String(64), nullable=True))
        batch.add_column(sa.Column("number_masked", sa.String(64), nullable=True))
    masks = f"iban_masked = {_mask('iban')}, number_masked = {_mask('number')}"
    op.execute(f"UPDATE bank_accounts SET {masks}")  # noqa: S608 - our own column names
    with op.batch_alter_table("bank_accounts") as batch:
        batch.drop_column("iban")
        batch.drop_column("number")
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(256), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    with op.batch_alter_table("bank_accounts") as batch:
        batch.add_column(sa.Column("iban", sa.String(64), nullable=True))
        batch.add_column(sa.Column("number", sa.String(64), nullable=True))
    # The full values are gone for good: the old columns come back holding the masked ones.
    op.execute("UPDATE bank_accounts SET iban = iban_masked, number = number_masked")
    with op.batch_alter_table("bank_accounts") as batch:
        batch.drop_column("iban_masked")
        batch.drop_column("number_masked")
