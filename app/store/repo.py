"""Queries and writes. Plain functions over a Session; the caller owns the transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, delete, func, select, text, update
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
from app.store.states import AccountStatus

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


@dataclass(frozen=True)
class Linked:
    user: PowensUser
    created: bool  # a new row (else its token was replaced, or an unlinked user linked again)
    was_unlinked: bool
    restored: int  # accounts of an unlinked user back in the refreshes


def link_powens_user(
    session: Session, tenant_id: str, powens_user_id: int, token_encrypted: bytes, now: datetime
) -> Linked:
    """Store the user's token (the row of a user linked before, unlinked or not, is taken back: its
    accounts and their history are still there, and its unlinked accounts are active again)."""
    row = session.scalar(
        select(PowensUser).where(PowensUser.powens_user_id == powens_user_id).with_for_update()
    )
    if row is not None:
        if row.tenant_id != tenant_id:
            raise ValueError(
                f"Powens user {powens_user_id} is linked to another tenant (or was, and it keeps it)"
            )
        was_unlinked = row.token_encrypted is None
        restored = move_user_accounts(session, row.id, AccountStatus.UNLINKED, AccountStatus.ACTIVE, now)
        row.token_encrypted = token_encrypted
        row.unlinked_at = None
        row.updated_at = now
        return Linked(row, False, was_unlinked, restored)
    row = PowensUser(
        tenant_id=tenant_id,
        powens_user_id=powens_user_id,
        token_encrypted=token_encrypted,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return Linked(row, True, False, 0)


def unlink_powens_user(session: Session, user: PowensUser, now: datetime) -> int:
    """Delete the user's token and take its active accounts out of every refresh (``unlinked``; their
    records and snapshots stay). Returns how many accounts left the refreshes."""
    excluded = move_user_accounts(session, user.id, AccountStatus.ACTIVE, AccountStatus.UNLINKED, now)
    user.token_encrypted = None
    user.unlinked_at = user.unlinked_at or now
    user.updated_at = now
    return excluded


def move_user_accounts(
    session: Session, user_pk: int, frm: AccountStatus, to: AccountStatus, now: datetime
) -> int:
    """Move the user's accounts in status ``frm`` to ``to`` (ours to say: linking and unlinking),
    locking the rows first in id order, as every writer of accounts does. Returns how many moved."""
    ids = session.scalars(
        select(BankAccount.id)
        .where(BankAccount.powens_user_pk == user_pk, BankAccount.status == frm)
        .order_by(BankAccount.id)
        .with_for_update()
    ).all()
    if ids:
        session.execute(
            update(BankAccount)
            .where(BankAccount.id.in_(ids), BankAccount.status == frm)
            .values(status=to, status_at=now, updated_at=now)
        )
    return len(ids)


def powens_user(
    session: Session, tenant_id: str, powens_user_id: int, *, lock: bool = False
) -> PowensUser | None:
    """The tenant's Powens user (linked or not); another tenant's is not found."""
    stmt = select(PowensUser).where(
        PowensUser.tenant_id == tenant_id, PowensUser.powens_user_id == powens_user_id
    )
    return session.scalar(stmt.with_for_update() if lock else stmt)


def powens_users(session: Session, tenant_id: str, *, unlinked_too: bool = False) -> Sequence[PowensUser]:
    """The tenant's linked Powens users (with ``unlinked_too``, every one it ever linked)."""
    stmt = select(PowensUser).where(PowensUser.tenant_id == tenant_id)
    if not unlinked_too:
        stmt = stmt.where(PowensUser.token_encrypted.is_not(None))
    return session.scalars(stmt.order_by(PowensUser.powens_user_id)).all()


def linked_user_pks() -> Select[int]:
    """The pks of Powens users still linked (a subquery): an unlinked user's connections are nobody's
    to fix, its accounts nobody's to refresh."""
    return select(PowensUser.id).where(PowensUser.token_encrypted.is_not(None))


@dataclass(frozen=True)
class UserAccounts:
    accounts: int
    by_status: dict[str, int]
    last_refreshed_at: datetime | None


def user_accounts(session: Session, tenant_id: str) -> dict[int, UserAccounts]:
    """Per Powens user pk of the tenant: its accounts, by status, and the last refresh of any."""
    rows = session.execute(
        select(
            BankAccount.powens_user_pk,
            BankAccount.status,
            func.count(),
            func.max(BankAccount.last_refreshed_at),
        )
        .where(BankAccount.tenant_id == tenant_id)
        .group_by(BankAccount.powens_user_pk, BankAccount.status)
    ).all()
    out: dict[int, UserAccounts] = {}
    for user_pk, status, n, last in rows:
        held = out.get(user_pk) or UserAccounts(0, {}, None)
        latest = max((t for t in (held.last_refreshed_at, last) if t is not None), default=None)
        out[user_pk] = UserAccounts(held.accounts + n, {**held.by_status, status: n}, latest)
    return out


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
