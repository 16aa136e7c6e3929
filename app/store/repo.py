"""Queries and writes. Plain functions over a Session; the caller owns the transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from app.contract import check_id
from app.errors import NotFound
from app.store.models import (
    AccountBalance,
    Actor,
    AuditEvent,
    BalanceSnapshot,
    BankAccount,
    BankConnection,
    ForcedSync,
    PowensUser,
    RefreshAttempt,
    Tenant,
)

RECORD_NAMESPACE = uuid.UUID("6f1c1a52-94f3-4c44-9d4e-0b1d2c1f7a10")
ADMIN_LOCK = 0x62616C61  # pg_advisory_xact_lock key of role changes ("bala")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def record_id(account_id: str, balance_type: str) -> str:
    """The latest record of (account, type) keeps one id across refreshes."""
    return f"bal_{uuid.uuid5(RECORD_NAMESPACE, f'{account_id}/{balance_type}').hex}"


# -- tenants and actors ---------------------------------------------------------------------------


def get_tenant(session: Session, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def require_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant a command names, or ``invalid_input`` (not an id) / ``not_found`` (no such tenant):
    an unknown tenant is an error, never an empty listing."""
    tenant = session.get(Tenant, check_id(tenant_id, "tenant id"))
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r} (balances tenant list shows them)")
    return tenant


def require_account(session: Session, tenant_id: str, account_id: str) -> AccountContext:
    """The tenant's account a command names; another tenant's account is not found, as a missing one."""
    require_tenant(session, tenant_id)
    ctx = find_account(session, tenant_id, check_id(account_id, "account id"))
    if ctx is None:
        raise NotFound(f"account {account_id!r} not found for tenant {tenant_id!r}")
    return ctx


def add_tenant(session: Session, tenant_id: str, name: str, now: datetime) -> tuple[Tenant, bool]:
    tenant = session.get(Tenant, tenant_id)
    if tenant is not None:
        return tenant, False
    tenant = Tenant(id=tenant_id, name=name, active=True, created_at=now)
    session.add(tenant)
    session.flush()
    return tenant, True


def list_tenants(session: Session, *, active_only: bool = True) -> Sequence[Tenant]:
    stmt = select(Tenant).order_by(Tenant.id)
    if active_only:
        stmt = stmt.where(Tenant.active.is_(True))
    return session.scalars(stmt).all()


def actor_roles(session: Session, name: str) -> frozenset[str]:
    row = session.get(Actor, name)
    return frozenset(row.roles) if row else frozenset()


def grant_role(session: Session, name: str, role: str, now: datetime) -> bool:
    row = session.get(Actor, name, with_for_update=True)
    if row is None:
        session.add(Actor(name=name, roles=[role], created_at=now, updated_at=now))
        return True
    if role in row.roles:
        return False
    row.roles = sorted({*row.roles, role})
    row.updated_at = now
    return True


def revoke_role(session: Session, name: str, role: str, now: datetime) -> bool:
    row = session.get(Actor, name, with_for_update=True)
    if row is None or role not in row.roles:
        return False
    row.roles = sorted(set(row.roles) - {role})
    row.updated_at = now
    return True


def lock_roles(session: Session) -> None:
    """Serialise role changes (PostgreSQL: a transaction-scoped advisory lock; SQLite: one writer)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(73452001)"))


def admins(session: Session) -> list[str]:
    """Actors holding ``admin``, read under a lock that serialises bootstraps (PostgreSQL: an advisory
    lock, as there may be no row to lock yet; SQLite serialises writers anyway)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(ADMIN_LOCK)))
    return [a.name for a in session.scalars(select(Actor)) if "admin" in a.roles]


def audit(
    session: Session,
    now: datetime,
    actor: str,
    operation: str,
    subject: str | None,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(at=now, actor=actor, operation=operation, subject=subject, outcome=outcome, detail=detail)
    )


def audit_events(session: Session, operation: str | None = None) -> Sequence[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.id)
    if operation is not None:
        stmt = stmt.where(AuditEvent.operation == operation)
    return session.scalars(stmt).all()


def list_actors(session: Session) -> Sequence[Actor]:
    return session.scalars(select(Actor).order_by(Actor.name)).all()


# -- Powens users, connections, accounts ----------------------------------------------------------


def link_powens_user(
    session: Session, tenant_id: str, powens_user_id: int, token_encrypted: bytes, now: datetime
) -> tuple[PowensUser, bool]:
    row = session.scalar(select(PowensUser).where(PowensUser.powens_user_id == powens_user_id))
    if row is not None:
        if row.tenant_id != tenant_id:
            raise ValueError(f"Powens user {powens_user_id} is already linked to another tenant")
        row.token_encrypted = token_encrypted
        row.updated_at = now
        return row, False
    row = PowensUser(
        tenant_id=tenant_id,
        powens_user_id=powens_user_id,
        token_encrypted=token_encrypted,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row, True


def powens_users(session: Session, tenant_id: str) -> Sequence[PowensUser]:
    return session.scalars(
        select(PowensUser).where(PowensUser.tenant_id == tenant_id).order_by(PowensUser.powens_user_id)
    ).all()


@dataclass(frozen=True)
class AccountContext:
    account: BankAccount
    connection: BankConnection
    user: PowensUser


def find_account(session: Session, tenant_id: str, account_id: str) -> AccountContext | None:
    """The account *within the tenant*; another tenant's account is simply not found."""
    row = session.execute(
        select(BankAccount, BankConnection, PowensUser)
        .join(BankConnection, BankConnection.id == BankAccount.connection_id)
        .join(PowensUser, PowensUser.id == BankAccount.powens_user_pk)
        .where(BankAccount.id == account_id, BankAccount.tenant_id == tenant_id)
    ).first()
    if row is None:
        return None
    return AccountContext(row[0], row[1], row[2])


def find_connection(
    session: Session, tenant_id: str, connection_id: str
) -> tuple[BankConnection, PowensUser] | None:
    """The connection *within the tenant*, with its Powens user."""
    row = session.execute(
        select(BankConnection, PowensUser)
        .join(PowensUser, PowensUser.id == BankConnection.powens_user_pk)
        .where(BankConnection.id == connection_id, BankConnection.tenant_id == tenant_id)
    ).first()
    return None if row is None else (row[0], row[1])


def list_accounts(
    session: Session, tenant_id: str
) -> Sequence[tuple[BankAccount, BankConnection, PowensUser]]:
    rows = session.execute(
        select(BankAccount, BankConnection, PowensUser)
        .join(BankConnection, BankConnection.id == BankAccount.connection_id)
        .join(PowensUser, PowensUser.id == BankAccount.powens_user_pk)
        .where(BankAccount.tenant_id == tenant_id)
        .order_by(BankAccount.name, BankAccount.id)
    ).all()
    return [(r[0], r[1], r[2]) for r in rows]


# -- forced syncs (PSD2 quota) --------------------------------------------------------------------


def lock_connection(session: Session, connection_id: str) -> BankConnection | None:
    return session.get(BankConnection, connection_id, with_for_update=True, populate_existing=True)


def forced_syncs_since(session: Session, connection_id: str, since: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(ForcedSync)
            .where(ForcedSync.connection_id == connection_id, ForcedSync.at > since)
        )
        or 0
    )


def oldest_forced_sync_since(session: Session, connection_id: str, since: datetime) -> datetime | None:
    return session.scalar(
        select(func.min(ForcedSync.at)).where(
            ForcedSync.connection_id == connection_id, ForcedSync.at >= since
        )
    )


def forced_by_task(session: Session, connection_id: str, task_id: str) -> bool:
    """Whether this refresh task already forced a sync of the connection (in an earlier attempt)."""
    return (
        session.scalar(
            select(ForcedSync.id).where(
                ForcedSync.connection_id == connection_id, ForcedSync.task_id == task_id
            )
        )
        is not None
    )


def record_forced_sync(
    session: Session, connection_id: str, at: datetime, actor: str, task_id: str | None
) -> ForcedSync:
    row = ForcedSync(connection_id=connection_id, at=at, actor=actor, task_id=task_id)
    session.add(row)
    # Rows older than the window are no longer needed for the quota.
    session.execute(
        delete(ForcedSync).where(
            ForcedSync.connection_id == connection_id, ForcedSync.at < at - timedelta(days=2)
        )
    )
    session.flush()
    return row


def release_forced_sync(session: Session, forced_sync_id: int) -> None:
    """The forced sync never left (the rate limiter re-queued the task first): give the slot back."""
    session.execute(delete(ForcedSync).where(ForcedSync.id == forced_sync_id))


# -- balances --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceDraft:
    balance_type: str
    current_balance: Decimal
    available_balance: Decimal | None
    currency: str
    last_updated_at: datetime
    metadata: dict[str, Any]


def latest_balances(
    session: Session,
    tenant_id: str,
    account_id: str | None = None,
    balance_types: Sequence[str] | None = None,
) -> Sequence[AccountBalance]:
    stmt = select(AccountBalance).where(AccountBalance.tenant_id == tenant_id)
    if account_id is not None:
        stmt = stmt.where(AccountBalance.account_id == account_id)
    if balance_types:
        stmt = stmt.where(AccountBalance.balance_type.in_(list(balance_types)))
    stmt = stmt.order_by(AccountBalance.account_id, AccountBalance.balance_type)
    # populate_existing: a row loaded earlier in this session was just changed by a Core upsert.
    return session.scalars(stmt.execution_options(populate_existing=True)).all()


def snapshots(session: Session, account_id: str) -> Sequence[BalanceSnapshot]:
    return session.scalars(
        select(BalanceSnapshot)
        .where(BalanceSnapshot.account_id == account_id)
        .order_by(BalanceSnapshot.day, BalanceSnapshot.balance_type)
    ).all()


# -- audit ------------------------------------------------------------------------------------------


def attempt_for_task(session: Session, task_id: str) -> RefreshAttempt | None:
    return session.scalar(select(RefreshAttempt).where(RefreshAttempt.task_id == task_id))


def add_attempt(session: Session, **fields: Any) -> RefreshAttempt:
    row = RefreshAttempt(**fields)
    session.add(row)
    session.flush()
    return row


def attempts(
    session: Session, tenant_id: str | None = None, account_id: str | None = None
) -> Sequence[RefreshAttempt]:
    stmt = select(RefreshAttempt).order_by(RefreshAttempt.id)
    if tenant_id is not None:
        stmt = stmt.where(RefreshAttempt.tenant_id == tenant_id)
    if account_id is not None:
        stmt = stmt.where(RefreshAttempt.account_id == account_id)
    return session.scalars(stmt).all()
