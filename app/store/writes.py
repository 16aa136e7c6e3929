"""The set-based statements of the write path: each kind of row written once per batch, whatever its
size, by one statement of fixed text (``app.store.recordset`` turns the rows into a relation).

A single refresh is a batch of one, a nightly batch a few dozen accounts, a push the accounts of one
event: all of them call these functions, inside the caller's one transaction, in this order (the
locks every writer takes, in the same order, so two writers never wait on each other in a cycle):
accounts (``lock_accounts``), run items (``claim_items``), latest records, snapshots, connections,
audit rows, tenant counters.

One rule lives here because it is SQL: a stored record is never replaced by an older one
(``keep_newer``, the guard of both upserts). Every other decision about what is written is made
before, in Python, by ``app.refresh.verdict.settle``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    Dialect,
    Integer,
    String,
    delete,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.models import (
    AccountBalance,
    BalanceSnapshot,
    BankAccount,
    BankConnection,
    Money,
    RefreshAttempt,
    RefreshRun,
    RunItem,
    RunTenant,
    UTCDateTime,
)
from app.store.recordset import Recordset
from app.store.states import ITEM_MOVES, ItemStatus, check_move


def _dialect(session: Session) -> Dialect:
    return session.get_bind().dialect


def _insert(dialect: Dialect) -> Any:
    if dialect.name == "postgresql":
        return postgresql.insert
    if dialect.name == "sqlite":
        return sqlite.insert
    raise RuntimeError(f"unsupported database dialect {dialect.name}")


def keyed_only(session: Session) -> None:
    """Every statement of a write (and of a tenant's summary or forecast) finds its rows by a key or
    an index. On a young table — the first night, or one that grew by a night of rows since
    autovacuum last analyzed it — the planner lacks statistics and scans the whole table instead
    (measured: the latest-records read went from under 1 ms to 25-50 ms per batch as the table grew,
    every batch of the run paying for the table so far). For this transaction only, a scan is the
    planner's last resort."""
    if _dialect(session).name == "postgresql":
        session.execute(text("SET LOCAL enable_seqscan = off"))


def keep_newer(stmt: Any, table: Any, keys: Sequence[str], columns: Sequence[str]) -> Any:
    """An INSERT made an upsert that never replaces a stored row by one whose ``last_updated_at`` is
    older: a late or redelivered answer cannot move money backwards. Ties take the new answer."""
    excluded = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: excluded[c] for c in columns},
        where=table.c.last_updated_at <= excluded.last_updated_at,
    )


# -- accounts ------------------------------------------------------------------------------------------

HELD = (
    "id",
    "tenant_id",
    "connection_id",
    "status",
    "status_at",
    "powens_last_update",
    "name",
    "currency",
    "balance",
    "coming",
    "last_refreshed_at",
    "pushed_at",
    "updated_at",
)


class Held(NamedTuple):
    """An account row as the writing transaction locked it: what a refresh may change, as it was."""

    id: str
    tenant_id: str
    connection_id: str
    status: str
    status_at: datetime | None
    powens_last_update: datetime | None
    name: str
    currency: str | None
    balance: Decimal | None
    coming: Decimal | None
    last_refreshed_at: datetime | None
    pushed_at: datetime | None
    updated_at: datetime


def lock_accounts(session: Session, account_ids: Sequence[str]) -> dict[str, Held]:
    """The accounts, locked in id order (every writer locks them first, in this order)."""
    if not account_ids:
        return {}
    rows = session.execute(
        select(*(getattr(BankAccount, c) for c in HELD))
        .where(BankAccount.id.in_(sorted(set(account_ids))))
        .order_by(BankAccount.id)
        .with_for_update()
    )
    return {r[0]: Held(*r) for r in rows}


ACCOUNTS = Recordset(
    ("id", String()),
    ("status", String()),
    ("status_at", UTCDateTime()),
    ("powens_last_update", UTCDateTime()),
    ("name", String()),
    ("currency", String()),
    ("balance", Money()),
    ("coming", Money()),
    ("last_refreshed_at", UTCDateTime()),
    ("pushed_at", UTCDateTime()),
    ("updated_at", UTCDateTime()),
)


_ACCOUNTS_TABLE: Any = BankAccount.__table__


@cache
def _update_accounts(dialect: Dialect) -> Any:
    v = ACCOUNTS.relation(dialect)
    return (
        update(_ACCOUNTS_TABLE)
        .where(_ACCOUNTS_TABLE.c.id == v.c.id)
        .values({name: v.c[name] for name, _ in ACCOUNTS.columns if name != "id"})
    )


def update_accounts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """The account rows take the values decided for them (``verdict.settle``), in one statement."""
    if rows:
        dialect = _dialect(session)
        session.execute(_update_accounts(dialect), ACCOUNTS.params(dialect, rows))


# -- run items and tenant counters ---------------------------------------------------------------------


def claim_items(
    session: Session, run_id: str, outcomes: dict[str, tuple[ItemStatus, str | None]], now: datetime
) -> dict[str, str]:
    """Move the still-pending items of ``outcomes`` (account id → status, reason) to their terminal
    status; returns {account_id: tenant_id} of the items this call moved (the rows stay locked until
    the commit, so a concurrent delivery of the same items waits, then moves none)."""
    groups: dict[tuple[ItemStatus, str | None], list[str]] = {}
    for account_id, key in outcomes.items():
        groups.setdefault(key, []).append(account_id)
    won: dict[str, str] = {}
    for (status, reason), account_ids in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or "")):
        check_move(ITEM_MOVES, ItemStatus.PENDING, status)
        rows = session.execute(
            update(RunItem)
            .where(
                RunItem.run_id == run_id,
                RunItem.account_id.in_(sorted(account_ids)),
                RunItem.status == ItemStatus.PENDING,
            )
            .values(status=status, reason=reason, finished_at=now)
            .returning(RunItem.account_id, RunItem.tenant_id)
        ).all()
        won.update({a: t for a, t in rows})
    return won


def run_day(session: Session, run_id: str) -> date | None:
    """The business day a nightly run fixed when it started."""
    return session.scalar(select(RefreshRun.business_day).where(RefreshRun.id == run_id))


def count_down_tenants(session: Session, run_id: str, won: dict[str, str]) -> list[str]:
    """Each tenant's counter goes down by the items this write finished; returns the tenants now at
    zero (their summary is claimed after the commit, one winner)."""
    emptied: list[str] = []
    for tenant_id, n in sorted(Counter(won.values()).items()):
        remaining = session.scalar(
            update(RunTenant)
            .where(RunTenant.run_id == run_id, RunTenant.tenant_id == tenant_id)
            .values(remaining=RunTenant.remaining - n)
            .returning(RunTenant.remaining)
        )
        if remaining is not None and remaining <= 0:
            emptied.append(tenant_id)
    return emptied


# -- latest records and snapshots ----------------------------------------------------------------------

_AMOUNTS = (("current_balance", Money()), ("available_balance", Money()), ("currency", String()))
_TIMES = (("last_updated_at", UTCDateTime()), ("refreshed_at", UTCDateTime()))
LATEST = Recordset(
    ("id", String()),
    ("account_id", String()),
    ("tenant_id", String()),
    ("connection_id", String()),
    ("balance_type", String()),
    *_AMOUNTS,
    *_TIMES,
    ("created_at", UTCDateTime()),
    ("metadata", JSON()),
)
_LATEST_SET = (
    "connection_id",
    "current_balance",
    "available_balance",
    "currency",
    "last_updated_at",
    "refreshed_at",
    "metadata",
)
SNAPSHOTS = Recordset(
    ("account_id", String()),
    ("tenant_id", String()),
    ("balance_type", String()),
    ("day", Date()),
    *_AMOUNTS,
    *_TIMES,
    ("carried", Boolean()),
)
_SNAPSHOT_SET = (
    "current_balance",
    "available_balance",
    "currency",
    "last_updated_at",
    "refreshed_at",
    "carried",
)


def _upsert(
    dialect: Dialect, table: Any, rows: Recordset, keys: Sequence[str], columns: Sequence[str]
) -> Any:
    v = rows.relation(dialect)
    names = [n for n, _ in rows.columns]
    # ``WHERE true``: SQLite needs a WHERE before ON CONFLICT in an INSERT ... SELECT (its parser).
    stmt = _insert(dialect)(table).from_select(names, select(*(v.c[n] for n in names)).where(true()))
    return keep_newer(stmt, table, keys, columns)


@cache
def _upsert_latest(dialect: Dialect) -> Any:
    table = AccountBalance.__table__
    return _upsert(dialect, table, LATEST, ("account_id", "balance_type"), _LATEST_SET)


@cache
def _upsert_snapshots(dialect: Dialect) -> Any:
    table = BalanceSnapshot.__table__
    return _upsert(dialect, table, SNAPSHOTS, ("account_id", "balance_type", "day"), _SNAPSHOT_SET)


def upsert_latest(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """The latest record per (account, type), never replaced by an older one."""
    if rows:
        dialect = _dialect(session)
        session.execute(_upsert_latest(dialect), LATEST.params(dialect, rows))


def upsert_snapshots(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """The day's snapshot per (account, type, day), never replaced by an older one."""
    if rows:
        dialect = _dialect(session)
        session.execute(_upsert_snapshots(dialect), SNAPSHOTS.params(dialect, rows))


def delete_latest(session: Session, ids: Sequence[str]) -> None:
    """Remove latest records by id (those ``app.refresh.verdict.unsent`` chose); history stays."""
    if ids:
        session.execute(delete(AccountBalance).where(AccountBalance.id.in_(list(ids))))


class Stored(NamedTuple):
    """A latest record as stored after the write's upserts."""

    id: str
    account_id: str
    tenant_id: str
    connection_id: str
    balance_type: str
    current_balance: Decimal
    available_balance: Decimal | None
    currency: str
    last_updated_at: datetime
    refreshed_at: datetime
    created_at: datetime
    metadata_: dict[str, Any] | None


def latest(session: Session, account_ids: Sequence[str]) -> dict[str, list[Stored]]:
    """{account: its latest records} after the write: what outcomes show and count, what the day's
    snapshot copies."""
    out: dict[str, list[Stored]] = {a: [] for a in account_ids}
    if not account_ids:
        return out
    t = AccountBalance
    rows = session.execute(
        select(
            t.id,
            t.account_id,
            t.tenant_id,
            t.connection_id,
            t.balance_type,
            t.current_balance,
            t.available_balance,
            t.currency,
            t.last_updated_at,
            t.refreshed_at,
            t.created_at,
            t.metadata_,
        )
        .where(t.account_id.in_(sorted(account_ids)))
        .order_by(t.account_id, t.balance_type)
    )
    for r in rows:
        out[r[1]].append(Stored._make(r))
    return out


def snapshot_row(record: Stored, day: date, carried: bool) -> dict[str, Any]:
    return {
        "account_id": record.account_id,
        "tenant_id": record.tenant_id,
        "balance_type": record.balance_type,
        "day": day,
        "current_balance": record.current_balance,
        "available_balance": record.available_balance,
        "currency": record.currency,
        "last_updated_at": record.last_updated_at,
        "refreshed_at": record.refreshed_at,
        "carried": carried,
    }


# -- connections ---------------------------------------------------------------------------------------


def set_connection_states(session: Session, states: dict[str, str | None], now: datetime) -> None:
    """Each connection's state, read again under its lock (another write may have changed it), in id
    order; ``BankConnection.set_state`` is the one way a state changes."""
    if not states:
        return
    rows = session.scalars(
        select(BankConnection)
        .where(BankConnection.id.in_(sorted(states)))
        .order_by(BankConnection.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    for conn in rows:
        conn.set_state(states[conn.id], now)
    session.flush()


# -- audit rows ----------------------------------------------------------------------------------------

ATTEMPTS = Recordset(
    ("task_id", String()),
    ("run_id", String()),
    ("operation", String()),
    ("tenant_id", String()),
    ("account_id", String()),
    ("actor", String()),
    ("trigger", String()),
    ("outcome", String()),
    ("reason", String()),
    ("message", String()),
    ("attempts", Integer()),
    ("balance_count", Integer()),
    ("force_refresh", Boolean()),
    ("powens_request_id", String()),
    ("errors", JSON()),
    ("next_attempt_at", UTCDateTime()),
    ("started_at", UTCDateTime()),
    ("finished_at", UTCDateTime()),
)


@cache
def _add_attempts(dialect: Dialect) -> Any:
    v = ATTEMPTS.relation(dialect)
    names = [n for n, _ in ATTEMPTS.columns]
    table: Any = RefreshAttempt.__table__
    stmt = _insert(dialect)(table).from_select(names, select(*(v.c[n] for n in names)).where(true()))
    return stmt.on_conflict_do_nothing(index_elements=["task_id"]).returning(table.c.task_id)


def add_attempts(session: Session, rows: Sequence[dict[str, Any]]) -> set[str | None]:
    """The audit rows in one statement; returns the task ids written (a task id already recorded
    keeps its first row: that delivery's outcome stands)."""
    if not rows:
        return set()
    dialect = _dialect(session)
    return set(session.scalars(_add_attempts(dialect), ATTEMPTS.params(dialect, rows)))
