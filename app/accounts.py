"""Account discovery (the ``openbanking.accounts.sync`` sibling) and Powens user linking.

Discovery reads each of the tenant's Powens users' connections and accounts (``?all``, so disabled
ones are seen too) and registers them; accounts Powens no longer lists are marked deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from app import telemetry
from app.config import Settings
from app.contract import ACCOUNTS_SYNC_OPERATION_KEY, BankAccountRecord, OperationMeta, TelemetryEvents
from app.errors import NotFound, RefreshError
from app.policy import Actor, authorize
from app.powens.models import PowensAccount, PowensConnection
from app.refresh import Deps
from app.store import repo
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection, PowensUser
from app.store.registry import account_fields
from app.store.secrets import TokenCipher

log = logging.getLogger(__name__)

ACCOUNTS_SYNC_OPERATION = OperationMeta(
    key=ACCOUNTS_SYNC_OPERATION_KEY,
    version="1.0.0",
    kind="command",
    description="Discover and refresh the list of bank accounts of a tenant's Powens users.",
    goal="Keep the canonical account list aligned with Powens.",
    context="Run by an operator after linking a Powens user, and by the nightly planner.",
    owners=("@platform.finance",),
    tags=("open-banking", "powens", "accounts"),
    stability="experimental",
    policy_auth="admin",
)


@dataclass
class SyncResult:
    synced: int = 0
    failed: int = 0
    created: int = 0
    errors: list[str] = field(default_factory=list)

    def as_contract(self) -> dict[str, object]:
        out: dict[str, object] = {"synced": self.synced, "failed": self.failed}
        if self.errors:
            out["errors"] = self.errors
        return out


def link_powens_user(
    settings: Settings, tenant_id: str, powens_user_id: int, token: str, now: datetime
) -> bool:
    """Store (or replace) a Powens user's permanent token, encrypted. Returns True when new."""
    if not token.strip():
        raise ValueError("the Powens token read from stdin is empty")
    cipher = TokenCipher.from_settings(settings)
    with session_scope(settings) as session:
        if repo.get_tenant(session, tenant_id) is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist (add it with `balances tenant add`)")
        _, created = repo.link_powens_user(
            session, tenant_id, powens_user_id, cipher.encrypt(token.strip()), now
        )
    return created


def sync_accounts(tenant_id: str, actor: Actor, deps: Deps) -> SyncResult:
    authorize(ACCOUNTS_SYNC_OPERATION, actor)
    settings = deps.settings
    cipher = TokenCipher.from_settings(settings)
    with session_scope(settings) as session:
        if repo.get_tenant(session, tenant_id) is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist")
        users = [
            (u.id, u.powens_user_id, cipher.decrypt(u.token_encrypted))
            for u in repo.powens_users(session, tenant_id)
        ]
    result = SyncResult()
    for user_pk, powens_user_id, token in users:
        try:
            conns = deps.client.list_connections(token, powens_user_id).value
            accounts = deps.client.list_accounts(token, powens_user_id).value
        except RefreshError as err:
            result.failed += 1
            result.errors.append(f"Powens user {powens_user_id}: {err.reason.value}: {err.message}")
            telemetry.emit(
                TelemetryEvents.ACCOUNTS_SYNC_FAILED,
                {"tenantId": tenant_id, "userId": str(powens_user_id), "error": err.message},
                actor=actor.name,
                reason=err.reason.value,
            )
            continue
        created = register(settings, user_pk, conns, accounts, deps.clock())
        result.synced += len(accounts)
        result.created += created
        telemetry.emit(
            TelemetryEvents.ACCOUNTS_SYNCED,
            {"tenantId": tenant_id, "userId": str(powens_user_id), "synced": len(accounts)},
            actor=actor.name,
        )
    return result


def register(
    settings: Settings,
    user_pk: int,
    connections: Sequence[PowensConnection],
    accounts: Sequence[PowensAccount],
    now: datetime,
    *,
    complete: bool = True,
) -> int:
    """Upsert connections and accounts of one Powens user; returns how many accounts are new.

    With ``complete`` (the list is everything Powens has), known accounts missing from it are
    marked deleted.
    """
    created_count = 0
    with session_scope(settings) as session:
        user = session.get(PowensUser, user_pk)
        assert user is not None
        by_ext: dict[int, BankConnection] = {}
        for c in connections:
            by_ext[c.id] = repo.upsert_connection(
                session,
                user,
                c.id,
                now,
                id_connector=c.id_connector,
                state=c.state,
                error_message=c.error_message,
                last_update=c.last_update,
                next_try=c.next_try,
                active=c.active,
            )
        seen: set[int] = set()
        for a in accounts:
            conn = by_ext.get(a.id_connection) or repo.upsert_connection(session, user, a.id_connection, now)
            by_ext[a.id_connection] = conn
            _, created = repo.upsert_account(session, user, conn, a.id, now, **account_fields(a))
            created_count += int(created)
            seen.add(a.id)
        if complete:
            for acc in session.scalars(
                select(BankAccount).where(
                    BankAccount.powens_user_pk == user_pk, BankAccount.status != "deleted"
                )
            ):
                if acc.external_id not in seen:
                    acc.status = "deleted"
                    acc.updated_at = now
    return created_count


def account_records(settings: Settings, tenant_id: str) -> list[BankAccountRecord]:
    with session_scope(settings) as session:
        rows = repo.list_accounts(session, tenant_id)
        return [to_account_record(a, c, u) for a, c, u in rows]


def to_account_record(a: BankAccount, c: BankConnection, u: PowensUser) -> BankAccountRecord:
    masked = telemetry.mask_value(a.number or a.iban) if (a.number or a.iban) else None
    return BankAccountRecord(
        id=a.id,
        tenantId=a.tenant_id,
        userId=str(u.powens_user_id),
        connectionId=c.id,
        externalId=str(a.external_id),
        institutionId=str(c.id_connector) if c.id_connector is not None else f"connection-{c.external_id}",
        institutionName=f"Powens connector {c.id_connector}" if c.id_connector is not None else "Powens",
        accountType=a.account_type or "unknown",
        displayName=a.name,
        currency=a.currency,
        lastSyncedAt=a.last_synced_at,
        createdAt=a.created_at,
        updatedAt=a.updated_at,
        iban=a.iban,
        bic=a.bic,
        accountNumberMasked=masked,
        balance=a.balance,
        availableBalance=(a.balance + a.coming) if a.balance is not None and a.coming is not None else None,
        metadata={
            "status": a.status,
            "connectionState": c.state,
            "powensConnectionId": c.external_id,
            "lastRefreshedAt": a.last_refreshed_at,
        },
    )
