"""Rows found by Powens' ids (a push names Powens' user, connection and account ids, not ours).

A Powens user id is linked to one tenant (unique); its connections and accounts are found within
that user only, so a push can never reach another tenant's rows, and nothing here creates a row. A
user the tenant unlinked is not found: what Powens still says of it is no longer ours to keep.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.store.models import BankAccount, BankConnection, PowensUser


def user(session: Session, powens_user_id: int) -> PowensUser | None:
    """The linked Powens user (None: no tenant linked it, or it was unlinked)."""
    return session.scalar(
        select(PowensUser).where(
            PowensUser.powens_user_id == powens_user_id, PowensUser.token_encrypted.is_not(None)
        )
    )


def connection(session: Session, user_pk: int, external_id: int) -> BankConnection | None:
    return session.scalar(
        select(BankConnection).where(
            BankConnection.powens_user_pk == user_pk, BankConnection.external_id == external_id
        )
    )


def account(session: Session, user_pk: int, external_id: int) -> tuple[BankAccount, BankConnection] | None:
    row = session.execute(
        select(BankAccount, BankConnection)
        .join(BankConnection, BankConnection.id == BankAccount.connection_id)
        .where(BankAccount.powens_user_pk == user_pk, BankAccount.external_id == external_id)
    ).first()
    return None if row is None else (row[0], row[1])
