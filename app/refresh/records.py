"""Canonical records: Powens payloads and stored rows mapped to the contract's models, in one place.

- ``map_balances``: a Powens account to the balance drafts a refresh stores (docs/design.md
  "Mapping Powens to canonical records"): ``current`` from ``balance`` (``availableBalance`` =
  ``balance + coming`` when Powens sends ``coming``), ``uncleared`` from ``coming``.
- ``to_record`` / ``to_account_record``: stored rows to ``AccountBalanceRecord`` / ``BankAccountRecord``.
- ``get_balances``: the ``openbanking.balances.get`` query over the store (no Powens call).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from app.config import Settings
from app.contract import AccountBalanceRecord, BankAccountRecord, OpenBankingGetBalancesOutput
from app.errors import InvalidInput
from app.money import exact_sum, money_text
from app.powens.models import PowensAccount
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, BankConnection, PowensUser
from app.store.writes import Stored

# The balance types ``map_balances`` gives: what a refresh can store and a reader can ask for.
BALANCE_TYPES = ("current", "uncleared")


def check_balance_types(types: Sequence[str] | None) -> None:
    """A balance type this service never records is a typo to refuse before anything is spent on it
    (a dispatch, a forced sync out of four a day), not an empty answer."""
    unknown = [t for t in types or () if t not in BALANCE_TYPES]
    if unknown:
        raise InvalidInput(
            f"unknown balance type {unknown[0][:40]!r}: balances are recorded as {', '.join(BALANCE_TYPES)}"
        )


def map_balances(pacc: PowensAccount, refreshed_at: datetime) -> list[repo.BalanceDraft]:
    """Powens ``balance``/``coming`` to canonical balance types; provider ids go in ``metadata``.
    An account with no balance or no currency yet has no record to give."""
    if pacc.balance is None or pacc.currency is None:
        return []
    last = pacc.last_update or refreshed_at
    meta = {
        "provider": "powens",
        "powensAccountId": pacc.id,
        "powensConnectionId": pacc.id_connection,
        "powensAccountType": pacc.type,
    }
    if pacc.currency_precision is not None:
        meta["currencyPrecision"] = pacc.currency_precision
    if pacc.id_user is not None:
        meta["powensUserId"] = pacc.id_user
    drafts = [
        repo.BalanceDraft(
            balance_type="current",
            current_balance=pacc.balance,
            available_balance=exact_sum(pacc.balance, pacc.coming) if pacc.coming is not None else None,
            currency=pacc.currency,
            last_updated_at=last,
            metadata={**meta, "source": "balance"},
        )
    ]
    if pacc.coming is not None:
        drafts.append(
            repo.BalanceDraft(
                balance_type="uncleared",
                current_balance=pacc.coming,
                available_balance=None,
                currency=pacc.currency,
                last_updated_at=last,
                metadata={**meta, "source": "coming"},
            )
        )
    return drafts


def to_record(row: AccountBalance | Stored) -> AccountBalanceRecord:
    return AccountBalanceRecord(
        id=row.id,
        account_id=row.account_id,
        tenant_id=row.tenant_id,
        connection_id=row.connection_id,
        balance_type=row.balance_type,
        current_balance=row.current_balance,
        available_balance=row.available_balance,
        currency=row.currency,
        last_updated_at=row.last_updated_at,
        created_at=row.created_at,
        metadata=row.metadata_,
    )


def to_account_record(a: BankAccount, c: BankConnection, u: PowensUser) -> BankAccountRecord:
    masked = a.number_masked or a.iban_masked
    return BankAccountRecord(
        id=a.id,
        tenant_id=a.tenant_id,
        user_id=str(u.powens_user_id),
        connection_id=c.id,
        external_id=str(a.external_id),
        institution_id=str(c.id_connector) if c.id_connector is not None else f"connection-{c.external_id}",
        institution_name=f"Powens connector {c.id_connector}" if c.id_connector is not None else "Powens",
        account_type=a.account_type or "unknown",
        display_name=a.name,
        currency=a.currency,
        last_synced_at=a.last_synced_at,
        created_at=a.created_at,
        updated_at=a.updated_at,
        iban=None,  # never stored in full
        bic=a.bic,
        account_number_masked=masked,
        balance=a.balance,
        available_balance=exact_sum(a.balance, a.coming)
        if a.balance is not None and a.coming is not None
        else None,
        metadata={
            "status": a.status,
            "connectionState": c.state,
            "powensConnectionId": c.external_id,
            "lastRefreshedAt": a.last_refreshed_at,
            # Staleness is the bank's: when it last answered Powens, not when we last asked.
            "powensLastUpdate": a.powens_last_update,
            "pushedAt": a.pushed_at,
            "consentExpiresAt": c.consent_expires_at,
        },
    )


def get_balances(
    settings: Settings,
    tenant_id: str,
    account_id: str | None = None,
    balance_types: Sequence[str] | None = None,
) -> OpenBankingGetBalancesOutput:
    check_balance_types(balance_types)
    with session_scope(settings) as session:
        if account_id is None:
            repo.require_tenant(session, tenant_id)
        else:
            repo.require_account(session, tenant_id, account_id)
        rows = repo.latest_balances(session, tenant_id, account_id, balance_types)
        return OpenBankingGetBalancesOutput(
            balances=[to_record(r) for r in rows],
            as_of=max((r.refreshed_at for r in rows), default=None),
        )


def account_records(settings: Settings, tenant_id: str) -> list[BankAccountRecord]:
    with session_scope(settings) as session:
        repo.require_tenant(session, tenant_id)
        return [to_account_record(a, c, u) for a, c, u in repo.list_accounts(session, tenant_id)]


def balance_history(
    settings: Settings,
    tenant_id: str,
    account_id: str,
    days: int = 30,
    balance_types: Sequence[str] | None = None,
) -> dict[str, Any]:
    """An account's daily snapshots over its last ``days`` business days, newest first: what the
    forecast reads and `balances accounts history` shows (amounts as strings at the currency's scale)."""
    check_balance_types(balance_types)
    today = settings.business_day()
    since = today - timedelta(days=days - 1)
    with session_scope(settings) as session:
        ctx = repo.require_account(session, tenant_id, account_id)
        stmt = (
            select(BalanceSnapshot)
            .where(BalanceSnapshot.account_id == ctx.account.id, BalanceSnapshot.day >= since)
            .order_by(BalanceSnapshot.day.desc(), BalanceSnapshot.balance_type)
        )
        if balance_types:
            stmt = stmt.where(BalanceSnapshot.balance_type.in_(list(balance_types)))
        snapshots = [
            {
                "day": snap.day,
                "balanceType": snap.balance_type,
                "currentBalance": money_text(snap.current_balance, snap.currency),
                "availableBalance": None
                if snap.available_balance is None
                else money_text(snap.available_balance, snap.currency),
                "currency": snap.currency,
                "lastUpdatedAt": snap.last_updated_at,
                # Not read that night: carried from the latest record (a push or a refresh had kept it
                # fresh, or Powens had nothing newer).
                "carried": snap.carried,
            }
            for snap in session.scalars(stmt)
        ]
        return {
            "tenantId": tenant_id,
            "accountId": ctx.account.id,
            "name": ctx.account.name,
            "from": since,
            "to": today,
            "snapshots": snapshots,
        }
