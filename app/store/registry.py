"""Registering what a Powens read reveals about a user's connections and accounts: the one path.

Account discovery (``balances accounts sync``) updates every known row from what Powens says
(``update_existing=True``). The nightly shared read only inserts what is new and follows Powens' word
about accounts outside the run (``update_existing=False``): the run's refresh transactions lock the
active account rows, and a second writer of the same rows in another order could deadlock with them.

An account's status follows Powens' word only (``deleted``/``disabled`` set, or listed again): absence
from a list proves nothing — a list may shift or be cut — so it never marks an account deleted.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ops.telemetry import mask_value
from app.powens.models import PowensAccount, PowensConnection
from app.store.models import BankAccount, BankConnection, PowensUser
from app.store.repo import new_id
from app.store.states import AccountStatus, next_account_status


def masked(value: str | None) -> str | None:
    """ContractSpec's mask (all but the last 4 characters): the only form an IBAN or an account
    number is ever stored in."""
    return None if value is None else mask_value(value)


def powens_status(a: PowensAccount) -> AccountStatus:
    if a.deleted:
        return AccountStatus.DELETED
    return AccountStatus.DISABLED if a.disabled else AccountStatus.ACTIVE


def descriptive_fields(a: PowensAccount) -> dict[str, Any]:
    """What discovery keeps current on a known account: how Powens describes it, and its status."""
    return {
        "name": a.name,
        "original_name": a.original_name,
        "account_type": a.type,
        "usage": a.usage,
        "iban_masked": masked(a.iban),
        "bic": a.bic,
        "number_masked": masked(a.number),
        "status": powens_status(a),
    }


def account_fields(a: PowensAccount) -> dict[str, Any]:
    """The columns of a new ``bank_accounts`` row that come from a Powens account payload. On a known
    row, the balances and Powens' ``last_update`` only follow an answer at least as new as the one
    held (``PowensAccount.is_news_against``, the rule of the write path too)."""
    return {
        **descriptive_fields(a),
        "currency": a.currency,
        "balance": a.balance,
        "coming": a.coming,
        "powens_last_update": a.last_update,
    }


def connection_fields(c: PowensConnection) -> dict[str, Any]:
    return {
        "id_connector": c.id_connector,
        "state": c.state,
        "error_message": c.error_message,
        "last_update": c.last_update,
        "next_try": c.next_try,
        "active": c.active,
        "consent_expires_at": c.consent_expires_at,
    }


def register_accounts(
    session: Session,
    user_pk: int,
    connections: Sequence[PowensConnection],
    accounts: Sequence[PowensAccount],
    now: datetime,
    *,
    update_existing: bool,
) -> int:
    """Insert new connections and accounts of one Powens user (updating known ones when
    ``update_existing``). Returns how many accounts are new."""
    user = session.get(PowensUser, user_pk)
    if user is None:
        return 0
    conns = {
        c.external_id: c
        for c in session.scalars(select(BankConnection).where(BankConnection.powens_user_pk == user_pk))
    }
    known = {
        a.external_id: a
        for a in session.scalars(select(BankAccount).where(BankAccount.powens_user_pk == user_pk))
    }

    def connection(external_id: int, fields: dict[str, Any]) -> BankConnection:
        row = conns.get(external_id)
        if row is None:
            row = BankConnection(
                id=new_id("con"),
                tenant_id=user.tenant_id,
                powens_user_pk=user_pk,
                external_id=external_id,
                created_at=now,
                updated_at=now,
                state_since=now if fields.get("state") else None,
                **{"active": True, **fields},
            )
            session.add(row)
            session.flush()  # its accounts reference it (no ORM relationship orders the inserts)
            conns[external_id] = row
        elif update_existing and fields:
            for key, value in fields.items():
                if key == "state":
                    row.set_state(value, now)
                else:
                    setattr(row, key, value)
            row.updated_at = now
        return row

    for c in connections:
        connection(c.id, connection_fields(c))
    created = 0
    for a in accounts:
        conn = connection(a.id_connection, {} if a.id_connection in conns else {"state": a.error})
        row = known.get(a.id)
        if row is None:
            session.add(
                BankAccount(
                    id=new_id("acc"),
                    tenant_id=user.tenant_id,
                    powens_user_pk=user_pk,
                    connection_id=conn.id,
                    external_id=a.id,
                    last_synced_at=now,
                    status_at=now,
                    created_at=now,
                    updated_at=now,
                    **account_fields(a),
                )
            )
            created += 1
        elif update_existing:
            # An explicit discovery: the row follows the list, a deleted account listed again included.
            row.connection_id = conn.id
            for key, value in descriptive_fields(a).items():
                setattr(row, key, value)
            if a.is_news_against(row.powens_last_update, now):  # never back to an older answer
                row.powens_last_update = a.last_update_against(row.powens_last_update, now)
                if a.balance is not None and a.currency is not None:  # no balance yet: keep the last
                    row.currency, row.balance, row.coming = a.currency, a.balance, a.coming
            row.status_at = now
            row.last_synced_at = now
            row.updated_at = now
        elif row.status != AccountStatus.ACTIVE and powens_status(a) != row.status:
            # Not in tonight's run (not active): it follows Powens' word, by the one status rule (a
            # disabled account listed again comes back; a deleted one stays deleted).
            moved = next_account_status(row.status, row.status_at, powens_status(a), now)
            if moved is not None:
                row.status, row.status_at = moved
                row.updated_at = now
    return created
