"""Registering what a Powens accounts read reveals: new accounts (and connections), deleted ones.

Used by the nightly shared read. It inserts what is new and flags what disappeared, and never rewrites
an existing account or connection row: refresh transactions lock those, and a second writer of the
same rows in another order could deadlock with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select, update

from app.config import Settings
from app.powens.models import PowensAccount
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection, PowensUser
from app.store.repo import new_id


def account_fields(a: PowensAccount) -> dict[str, Any]:
    """The columns of ``bank_accounts`` that come from a Powens account payload."""
    return {
        "name": a.name,
        "original_name": a.original_name,
        "account_type": a.type,
        "usage": a.usage,
        "currency": a.currency,
        "iban": a.iban,
        "bic": a.bic,
        "number": a.number,
        "status": "deleted" if a.deleted else "disabled" if a.disabled else "active",
        "balance": a.balance,
        "coming": a.coming,
        "powens_last_update": a.last_update,
    }


def register_new_accounts(
    settings: Settings, user_pk: int, accounts: Sequence[PowensAccount], now: datetime
) -> int:
    with session_scope(settings) as session:
        user = session.get(PowensUser, user_pk)
        if user is None:
            return 0
        known = {
            ext: (acc_id, status)
            for ext, acc_id, status in session.execute(
                select(BankAccount.external_id, BankAccount.id, BankAccount.status).where(
                    BankAccount.powens_user_pk == user_pk
                )
            ).all()
        }
        conns = dict(
            session.execute(
                select(BankConnection.external_id, BankConnection.id).where(
                    BankConnection.powens_user_pk == user_pk
                )
            ).all()
        )
        created = 0
        for a in accounts:
            if a.id in known:
                continue
            conn_id = conns.get(a.id_connection)
            if conn_id is None:
                conn_id = new_id("con")
                session.add(
                    BankConnection(
                        id=conn_id,
                        tenant_id=user.tenant_id,
                        powens_user_pk=user_pk,
                        external_id=a.id_connection,
                        state=a.error,
                        active=True,
                        created_at=now,
                        updated_at=now,
                    )
                )
                session.flush()
                conns[a.id_connection] = conn_id
            session.add(
                BankAccount(
                    id=new_id("acc"),
                    tenant_id=user.tenant_id,
                    powens_user_pk=user_pk,
                    connection_id=conn_id,
                    external_id=a.id,
                    last_synced_at=now,
                    created_at=now,
                    updated_at=now,
                    **account_fields(a),
                )
            )
            created += 1
        listed = {a.id for a in accounts}
        gone = [
            acc_id for ext, (acc_id, status) in known.items() if ext not in listed and status != "deleted"
        ]
        if gone:
            session.execute(
                update(BankAccount).where(BankAccount.id.in_(gone)).values(status="deleted", updated_at=now)
            )
        return created
