"""Set-based writes of a nightly refresh batch: a handful of statements for a whole batch of accounts.

The single refresh (``app.refresh.write_path.store``, ``app.refresh.outcomes.record``) writes one
account in about a dozen statements; a batch of a hundred accounts would pay that a hundred times.
Here each kind of row is written once per batch: the run items claimed in one conditional UPDATE
(RETURNING the ones this batch won: a redelivered batch wins none), the latest records and the day's
snapshots in one multi-row ``INSERT ... ON CONFLICT DO UPDATE ... WHERE older`` each, the balance
types Powens stopped sending in one DELETE, the audit rows in one multi-row INSERT, the tenants'
counters by tenant.
The rules are the single refresh's, unchanged: a record is never replaced by an older one, only the
first terminal outcome of an item counts, and everything commits in the transaction of its audit row.
See docs/performance.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from app.jsonio import dumps
from app.store.models import (
    AccountBalance,
    BalanceSnapshot,
    BankAccount,
    BankConnection,
    RefreshAttempt,
    RunItem,
    RunTenant,
)
from app.store.repo import BalanceDraft, _insert, keep_newer_latest, keep_newer_snapshot, record_id
from app.store.states import ITEM_MOVES, AccountStatus, ItemStatus, check_move


# On PostgreSQL each set-based write is one statement of fixed text whose one parameter is the batch's
# rows as a JSON document (``INSERT ... SELECT FROM json_to_recordset(:rows)``): prepared once per
# connection, the same cost to build for 10 rows or 1,000, and written by the C JSON encoder (money
# as exact JSON numbers, ``app.jsonio``). Measured against the alternatives: a multi-row VALUES list
# is new SQL text for every batch size (SQLAlchemy compiled it afresh: 5 ms of CPU per account); one
# array parameter per column spent 12 % of a worker's CPU in psycopg's array encoding.
# SQLite (the demo) takes the same rows as an executemany.
def _recordset(*columns: str) -> str:
    """``json_to_recordset(CAST(:rows AS json)) AS v(a t, ...)`` for columns given as ``"a t"``."""
    return f"json_to_recordset(CAST(:rows AS json)) AS v({', '.join(columns)})"


_BALANCE = ("current_balance numeric", "available_balance numeric", "currency text")
_TIMES = ("last_updated_at timestamptz", "refreshed_at timestamptz")
_PG_LATEST = f"""
INSERT INTO account_balances (id, account_id, tenant_id, connection_id, balance_type, current_balance,
    available_balance, currency, last_updated_at, refreshed_at, created_at, metadata)
SELECT id, account_id, tenant_id, connection_id, balance_type, current_balance, available_balance,
    currency, last_updated_at, refreshed_at, created_at, metadata
FROM {
    _recordset(
        "id text",
        "account_id text",
        "tenant_id text",
        "connection_id text",
        "balance_type text",
        *_BALANCE,
        *_TIMES,
        "created_at timestamptz",
        "metadata json",
    )
}
ON CONFLICT (account_id, balance_type) DO UPDATE SET
    connection_id = excluded.connection_id, current_balance = excluded.current_balance,
    available_balance = excluded.available_balance, currency = excluded.currency,
    last_updated_at = excluded.last_updated_at, refreshed_at = excluded.refreshed_at,
    metadata = excluded.metadata
WHERE account_balances.last_updated_at <= excluded.last_updated_at
"""  # noqa: S608 - built from this module's constant column names only
_PG_SNAPSHOT = f"""
INSERT INTO balance_snapshots (account_id, tenant_id, balance_type, day, current_balance,
    available_balance, currency, last_updated_at, refreshed_at)
SELECT * FROM {
    _recordset("account_id text", "tenant_id text", "balance_type text", "day date", *_BALANCE, *_TIMES)
}
ON CONFLICT (account_id, balance_type, day) DO UPDATE SET
    current_balance = excluded.current_balance, available_balance = excluded.available_balance,
    currency = excluded.currency, last_updated_at = excluded.last_updated_at,
    refreshed_at = excluded.refreshed_at
WHERE balance_snapshots.last_updated_at <= excluded.last_updated_at
"""  # noqa: S608 - built from this module's constant column names only
_PG_DROP_UNSENT = f"""
DELETE FROM account_balances b
USING {_recordset("account_id text", "keep text", "not_newer_than timestamptz")}
WHERE b.account_id = v.account_id
  AND NOT (b.balance_type = ANY (string_to_array(v.keep, ',')))
  AND b.last_updated_at <= v.not_newer_than
"""  # noqa: S608 - built from this module's constant column names only
_ATTEMPT_COLUMNS = (
    "task_id text", "run_id text", "operation text", "tenant_id text", "account_id text", "actor text",
    "trigger text", "outcome text", "reason text", "message text", "attempts int", "balance_count int",
    "force_refresh bool", "powens_request_id text", "errors json", "next_attempt_at timestamptz",
    "started_at timestamptz", "finished_at timestamptz",
)  # fmt: skip
_ATTEMPT_NAMES = ", ".join(c.split()[0] for c in _ATTEMPT_COLUMNS)
_PG_ATTEMPTS = f"""
INSERT INTO refresh_attempts ({_ATTEMPT_NAMES})
SELECT {_ATTEMPT_NAMES}
FROM {_recordset(*_ATTEMPT_COLUMNS)}
ON CONFLICT (task_id) DO NOTHING
"""  # noqa: S608 - built from this module's constant column names only


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _pg_upsert(session: Session, sql: str, rows: Sequence[dict[str, Any]]) -> None:
    """One statement for all ``rows``: one JSON document."""
    if rows:
        session.execute(text(sql), {"rows": dumps(rows)})


def keyed_only(session: Session) -> None:
    """Every statement of a batch (and of a tenant's summary or forecast) finds its rows by a key or
    an index. On a young table — the first night, or one that grew by a night of rows since
    autovacuum last analyzed it —
    the planner lacks statistics and scans the whole table instead (measured: the latest-records read
    went from under 1 ms to 25-50 ms per batch as the table grew, every batch of the run paying for
    the table so far). For this transaction only, a scan is the planner's last resort."""
    if _postgresql(session):
        session.execute(text("SET LOCAL enable_seqscan = off"))


def claim_items(
    session: Session,
    run_id: str,
    outcomes: dict[str, tuple[ItemStatus, str | None]],
    now: datetime,
) -> dict[str, str]:
    """Move the still-pending items of ``outcomes`` (account id → status, reason) to their terminal
    status; returns {account_id: tenant_id} of the items this call moved (the rows stay locked until
    the commit, so a concurrent delivery of the same items waits, then moves none)."""
    groups: dict[tuple[ItemStatus, str | None], list[str]] = {}
    for account_id, key in outcomes.items():
        groups.setdefault(key, []).append(account_id)
    won: dict[str, str] = {}
    for (status, reason), account_ids in groups.items():
        check_move(ITEM_MOVES, ItemStatus.PENDING, status)
        rows = session.execute(
            update(RunItem)
            .where(
                RunItem.run_id == run_id,
                RunItem.account_id.in_(account_ids),
                RunItem.status == ItemStatus.PENDING,
            )
            .values(status=status, reason=reason, finished_at=now)
            .returning(RunItem.account_id, RunItem.tenant_id)
        ).all()
        won.update({a: t for a, t in rows})
    return won


def lock_connections(session: Session, connection_ids: set[str]) -> dict[str, BankConnection]:
    """The connections, locked in id order (two batches never wait on each other in a cycle)."""
    if not connection_ids:
        return {}
    rows = session.scalars(
        select(BankConnection)
        .where(BankConnection.id.in_(sorted(connection_ids)))
        .order_by(BankConnection.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return {c.id: c for c in rows}


@dataclass(frozen=True)
class AccountAnswer:
    """What an account row takes from one Powens answer (``write_path.update_account``'s fields)."""

    name: str
    currency: str | None
    balance: Decimal | None
    coming: Decimal | None
    last_update: datetime | None
    refreshed_at: datetime


_PG_UPDATE_ACCOUNTS = f"""
WITH v AS (
    SELECT * FROM {
    _recordset(
        "id text",
        "name text",
        "currency text",
        "balance numeric",
        "coming numeric",
        "last_update timestamptz",
        "at timestamptz",
    )
}
), held AS (
    SELECT a.id, (a.powens_last_update IS NULL
                  OR (v.last_update IS NOT NULL AND v.last_update >= a.powens_last_update)) AS newer
    FROM bank_accounts a JOIN v ON v.id = a.id
    FOR UPDATE OF a
)
UPDATE bank_accounts a SET
    name = CASE WHEN held.newer THEN v.name ELSE a.name END,
    currency = CASE WHEN held.newer AND v.balance IS NOT NULL AND v.currency IS NOT NULL
                    THEN v.currency ELSE a.currency END,
    balance = CASE WHEN held.newer AND v.balance IS NOT NULL AND v.currency IS NOT NULL
                   THEN v.balance ELSE a.balance END,
    coming = CASE WHEN held.newer AND v.balance IS NOT NULL AND v.currency IS NOT NULL
                  THEN v.coming ELSE a.coming END,
    powens_last_update = CASE WHEN held.newer AND v.last_update IS NOT NULL
                              THEN v.last_update ELSE a.powens_last_update END,
    -- deleted meanwhile (a push, or Powens' word on the account itself): stays deleted
    status = CASE WHEN a.status = 'deleted' THEN a.status ELSE 'active' END,
    last_refreshed_at = v.at, updated_at = v.at
FROM v JOIN held ON held.id = v.id
WHERE a.id = v.id
RETURNING a.id, held.newer
"""  # noqa: S608 - built from this module's constant column names only


def update_accounts(session: Session, answers: dict[str, AccountAnswer]) -> set[str]:
    """The account rows follow Powens, never back to an older answer than the one they hold (the
    rule of ``write_path.update_account``, in one statement). Returns the accounts whose answer was
    at least as new as the one held."""
    if not answers:
        return set()
    if _postgresql(session):
        rows = session.execute(
            text(_PG_UPDATE_ACCOUNTS),
            {
                "rows": dumps(
                    [
                        {
                            "id": account_id,
                            "name": a.name,
                            "currency": a.currency,
                            "balance": a.balance,
                            "coming": a.coming,
                            "last_update": a.last_update,
                            "at": a.refreshed_at,
                        }
                        for account_id, a in answers.items()
                    ]
                )
            },
        ).all()
        return {account_id for account_id, newer in rows if newer}
    accounts = session.scalars(
        select(BankAccount).where(BankAccount.id.in_(list(answers))).with_for_update()
    ).all()
    newer = set()
    for account in accounts:
        a = answers[account.id]
        if account.powens_last_update is None or (
            a.last_update is not None and a.last_update >= account.powens_last_update
        ):
            newer.add(account.id)
            account.name = a.name
            if a.balance is not None and a.currency is not None:
                account.currency, account.balance, account.coming = a.currency, a.balance, a.coming
            if a.last_update is not None:
                account.powens_last_update = a.last_update
        if account.status != AccountStatus.DELETED:
            account.status = AccountStatus.ACTIVE
        account.last_refreshed_at = a.refreshed_at
        account.updated_at = a.refreshed_at
    session.flush()
    return newer


def upsert_balances(
    session: Session,
    accounts: dict[str, tuple[str, str]],
    drafts: dict[str, list[BalanceDraft]],
    refreshed_at: dict[str, datetime],
    days: dict[str, date],
) -> None:
    """Latest record per (account, type) and the day's snapshot for every account of the batch, never
    replacing a stored record by an older one (the same conditional upsert as the single refresh)."""
    latest: list[dict[str, Any]] = []
    snaps: list[dict[str, Any]] = []
    for account_id, items in drafts.items():
        tenant_id, connection_id = accounts[account_id]
        at = refreshed_at[account_id]
        for d in items:
            common = {
                "account_id": account_id,
                "tenant_id": tenant_id,
                "balance_type": d.balance_type,
                "current_balance": d.current_balance,
                "available_balance": d.available_balance,
                "currency": d.currency,
                "last_updated_at": d.last_updated_at,
                "refreshed_at": at,
            }
            latest.append(
                {
                    **common,
                    "id": record_id(account_id, d.balance_type),
                    "connection_id": connection_id,
                    "created_at": at,
                    "metadata": d.metadata,
                }
            )
            snaps.append({**common, "day": days[account_id]})
    if _postgresql(session):
        _pg_upsert(session, _PG_LATEST, latest)
        _pg_upsert(session, _PG_SNAPSHOT, snaps)
        return
    insert = _insert(session)
    if latest:
        latest = [{("metadata_" if k == "metadata" else k): v for k, v in row.items()} for row in latest]
        session.execute(keep_newer_latest(insert(AccountBalance)), latest)
    if snaps:
        session.execute(keep_newer_snapshot(insert(BalanceSnapshot)), snaps)


def drop_unsent_types(session: Session, keep: dict[str, tuple[list[str], datetime]]) -> None:
    """For each account: latest records of types Powens no longer sends leave the canonical view,
    unless what is stored is newer than this answer (``repo.drop_unsent_types``, one statement)."""
    if not keep:
        return
    if _postgresql(session):
        session.execute(
            text(_PG_DROP_UNSENT),
            {
                "rows": dumps(
                    [
                        {"account_id": a, "keep": ",".join(types), "not_newer_than": at}
                        for a, (types, at) in keep.items()
                    ]
                )
            },
        )
        return
    for account_id, (types, not_newer_than) in keep.items():
        session.execute(
            delete(AccountBalance).where(
                AccountBalance.account_id == account_id,
                AccountBalance.balance_type.not_in(types),
                AccountBalance.last_updated_at <= not_newer_than,
            )
        )


def latest(session: Session, account_ids: Sequence[str]) -> dict[str, dict[str, datetime]]:
    """{account: {balance type: last_updated_at}} of the latest records after the batch's writes: what
    its audit rows count and its "older than stored" notes compare."""
    out: dict[str, dict[str, datetime]] = {a: {} for a in account_ids}
    if not account_ids:
        return out
    rows = session.execute(
        select(AccountBalance.account_id, AccountBalance.balance_type, AccountBalance.last_updated_at).where(
            AccountBalance.account_id.in_(list(account_ids))
        )
    )
    for account_id, balance_type, last_updated_at in rows:
        out[account_id][balance_type] = last_updated_at
    return out


def add_attempts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """The batch's audit rows in one statement (a task id already recorded keeps its row)."""
    if not rows:
        return
    if _postgresql(session):
        _pg_upsert(session, _PG_ATTEMPTS, rows)
        return
    insert = _insert(session)
    session.execute(insert(RefreshAttempt).on_conflict_do_nothing(index_elements=["task_id"]), list(rows))


def count_down_tenants(session: Session, run_id: str, won: dict[str, str]) -> list[str]:
    """Each tenant's counter goes down by the items this batch finished; returns the tenants now at
    zero (their summary is claimed after the commit, one winner, as for a single refresh)."""
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
