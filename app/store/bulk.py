"""Set-based writes of a nightly refresh batch: a handful of statements for a whole batch of accounts.

The single refresh (``app.write_path.store``, ``app.outcomes.record``) writes one account in about a
dozen statements; a batch of a hundred accounts would pay that a hundred times. Here each kind of
row is written once per batch: the run items claimed in one conditional UPDATE (RETURNING the ones
this batch won: a redelivered batch wins none), the latest records and the day's snapshots in one
multi-row ``INSERT ... ON CONFLICT DO UPDATE ... WHERE older`` each, the balance types Powens stopped
sending in one DELETE, the audit rows in one multi-row INSERT, the tenants' counters by tenant.
The rules are the single refresh's, unchanged: a record is never replaced by an older one, only the
first terminal outcome of an item counts, and everything commits in the transaction of its audit row.
See docs/performance.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, RefreshAttempt, RunItem, RunTenant
from app.store.repo import BalanceDraft, _insert, record_id
from app.store.states import ITEM_MOVES, ItemStatus, check_move

# PostgreSQL takes at most 65,535 bound parameters per statement: rows are sent in chunks below that.
_MAX_PARAMS = 30_000


def _chunks(rows: Sequence[dict[str, Any]]) -> Iterable[Sequence[dict[str, Any]]]:
    if not rows:
        return
    step = max(1, _MAX_PARAMS // max(1, len(rows[0])))
    for i in range(0, len(rows), step):
        yield rows[i : i + step]


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


def lock_accounts(session: Session, account_ids: Sequence[str]) -> dict[str, BankAccount]:
    if not account_ids:
        return {}
    rows = session.scalars(select(BankAccount).where(BankAccount.id.in_(account_ids)).with_for_update())
    return {a.id: a for a in rows}


def upsert_balances(
    session: Session,
    accounts: dict[str, BankAccount],
    drafts: dict[str, list[BalanceDraft]],
    refreshed_at: dict[str, datetime],
    day: date,
) -> None:
    """Latest record per (account, type) and the day's snapshot for every account of the batch, never
    replacing a stored record by an older one (the same conditional upsert as the single refresh)."""
    latest: list[dict[str, Any]] = []
    snaps: list[dict[str, Any]] = []
    for account_id, items in drafts.items():
        account = accounts[account_id]
        at = refreshed_at[account_id]
        for d in items:
            common = {
                "account_id": account_id,
                "tenant_id": account.tenant_id,
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
                    "connection_id": account.connection_id,
                    "created_at": at,
                    "metadata_": d.metadata,
                }
            )
            snaps.append({**common, "day": day})
    insert = _insert(session)
    for chunk in _chunks(latest):
        stmt = insert(AccountBalance).values(list(chunk))
        ex = stmt.excluded
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[AccountBalance.account_id, AccountBalance.balance_type],
                set_={
                    "connection_id": ex.connection_id,
                    "current_balance": ex.current_balance,
                    "available_balance": ex.available_balance,
                    "currency": ex.currency,
                    "last_updated_at": ex.last_updated_at,
                    "refreshed_at": ex.refreshed_at,
                    "metadata": ex.metadata,
                },
                where=AccountBalance.last_updated_at <= ex.last_updated_at,
            )
        )
    for chunk in _chunks(snaps):
        stmt = insert(BalanceSnapshot).values(list(chunk))
        sx = stmt.excluded
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=[
                    BalanceSnapshot.account_id,
                    BalanceSnapshot.balance_type,
                    BalanceSnapshot.day,
                ],
                set_={
                    "current_balance": sx.current_balance,
                    "available_balance": sx.available_balance,
                    "currency": sx.currency,
                    "last_updated_at": sx.last_updated_at,
                    "refreshed_at": sx.refreshed_at,
                },
                where=BalanceSnapshot.last_updated_at <= sx.last_updated_at,
            )
        )


def drop_unsent_types(session: Session, keep: dict[str, tuple[list[str], datetime]]) -> None:
    """For each account: latest records of types Powens no longer sends leave the canonical view,
    unless what is stored is newer than this answer (``repo.drop_unsent_types``, one statement)."""
    if not keep:
        return
    session.execute(
        delete(AccountBalance).where(
            or_(
                *(
                    and_(
                        AccountBalance.account_id == account_id,
                        AccountBalance.balance_type.not_in(types),
                        AccountBalance.last_updated_at <= not_newer_than,
                    )
                    for account_id, (types, not_newer_than) in keep.items()
                )
            )
        )
    )


def latest(session: Session, account_ids: Sequence[str]) -> dict[str, list[AccountBalance]]:
    """The latest records of the accounts, after the batch's writes (its outputs and audit counts)."""
    out: dict[str, list[AccountBalance]] = {a: [] for a in account_ids}
    if not account_ids:
        return out
    stmt = (
        select(AccountBalance)
        .where(AccountBalance.account_id.in_(account_ids))
        .order_by(AccountBalance.account_id, AccountBalance.balance_type)
        .execution_options(populate_existing=True)
    )
    for row in session.scalars(stmt):
        out[row.account_id].append(row)
    return out


def add_attempts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """The batch's audit rows, one multi-row INSERT (a task id already recorded keeps its row)."""
    insert = _insert(session)
    for chunk in _chunks(rows):
        session.execute(
            insert(RefreshAttempt).values(list(chunk)).on_conflict_do_nothing(index_elements=["task_id"])
        )


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
