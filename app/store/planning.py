"""Planning a run in steps: what each step reads and writes, one short transaction each.

A run is planned a page of accounts at a time (``BALANCES_PLAN_PAGE_ACCOUNTS``), in (Powens user,
account id) order, so each step's work is bounded whatever the size of the service (10 M accounts are
5,000 steps, not one statement that outgrows every time limit). The run row holds where planning is:

- ``plan_user_pk``/``plan_account_id``: the last account written as an item. A step writes the next
  page only if that cursor is still the one it was sent for (``after``), under the run row's lock, so
  a step delivered twice writes nothing twice, and a re-planned run resumes where it stopped.
- ``published_*``: the last account published. A step that died between writing its page and
  publishing it leaves the gap, which the next planner publishes first.
- ``planner_lease_until``: the live planner's lease, renewed by every step. The sweeper re-plans a
  planning run only once its lease ran out (a slow planner is alive; a dead one stops renewing).
- ``replans``: the planner's generation; a re-plan fences off the messages of the planner before.

Tenants get their counter row when planning begins (``expected`` and ``remaining`` 0), and each page
adds its accounts to its tenants' counters in the transaction that writes its items, so an account
refreshed before planning ends always finds its counter. A tenant is summarised only once the run is
running (``runs.claim_summary``): before, its counter may reach 0 with more of its accounts to come.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Table, and_, bindparam, func, insert, literal, select, text, tuple_, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.store.db import session_scope
from app.store.models import BankAccount, RefreshRun, RunItem, RunTenant, Tenant
from app.store.runs import Item, move_run
from app.store.states import RUN_MOVES, AccountStatus, ItemStatus, RunStatus, TenantStatus, check_move

Cursor = tuple[int, str]  # (Powens user pk, account id): the keyset planning pages through


class Superseded(Exception):
    """This step is not the run's planner any more: another step advanced it, or it was re-planned."""


@dataclass(frozen=True)
class PlanState:
    status: RunStatus
    generation: int
    cursor: Cursor | None  # the last account written as an item
    published: Cursor | None  # the last account published
    planned: int  # accounts written so far


def _now() -> datetime:
    return datetime.now(UTC)


def _lease(settings: Settings, now: datetime) -> datetime:
    return now + timedelta(seconds=settings.plan_lease_seconds)


def claim(settings: Settings, run_id: str) -> int | None:
    """Move a pending run to planning, with a fresh lease. Returns the planner's generation (the
    run's re-plan count), or None when the run was not pending."""
    check_move(RUN_MOVES, RunStatus.PENDING, RunStatus.PLANNING)
    now = _now()
    with session_scope(settings) as session:
        return session.scalar(
            update(RefreshRun)
            .where(RefreshRun.id == run_id, RefreshRun.status == RunStatus.PENDING)
            .values(status=RunStatus.PLANNING, planned_at=now, planner_lease_until=_lease(settings, now))
            .returning(RefreshRun.replans)
        )


def open_tenants(settings: Settings, run_id: str) -> int:
    """One counter row per active tenant, once per run (a resumed planner keeps the rows it has:
    their counters hold what was planned). Returns the run's tenants."""
    with session_scope(settings) as session:
        if not session.scalar(select(func.count()).select_from(RunTenant).where(RunTenant.run_id == run_id)):
            session.execute(
                insert(RunTenant).from_select(
                    ["run_id", "tenant_id", "status", "expected", "remaining", "stale", "resends"],
                    select(
                        literal(run_id),
                        Tenant.id,
                        literal(TenantStatus.REFRESHING.value),
                        literal(0),
                        literal(0),
                        literal(0),
                        literal(0),
                    ).where(Tenant.active.is_(True)),
                )
            )
        return int(
            session.scalar(select(func.count()).select_from(RunTenant).where(RunTenant.run_id == run_id)) or 0
        )


def state(settings: Settings, run_id: str) -> PlanState | None:
    with session_scope(settings) as session:
        run = session.get(RefreshRun, run_id)
        if run is None:
            return None
        return PlanState(
            RunStatus(run.status),
            run.replans,
            _cursor(run.plan_user_pk, run.plan_account_id),
            _cursor(run.published_user_pk, run.published_account_id),
            run.total_accounts,
        )


def _cursor(user_pk: int | None, account_id: str | None) -> Cursor | None:
    return None if user_pk is None or account_id is None else (int(user_pk), account_id)


def _own(session: Session, run_id: str, generation: int, after: Cursor | None) -> RefreshRun:
    """The run row, locked, while it is this planner's and its cursor is still ``after``."""
    run = session.scalar(
        select(RefreshRun)
        .where(
            RefreshRun.id == run_id,
            RefreshRun.status == RunStatus.PLANNING,
            RefreshRun.replans == generation,
        )
        .with_for_update()
    )
    if run is None or _cursor(run.plan_user_pk, run.plan_account_id) != after:
        raise Superseded(run_id)
    return run


def write_page(settings: Settings, run_id: str, generation: int, after: Cursor | None) -> list[Item]:
    """The next page of active accounts after ``after``, written as pending items with their task
    ids, added to their tenants' counters, the cursor and the lease moved on: one transaction. A page
    ends at a Powens user's boundary (a user with more accounts than a page is split), so one refresh
    message never carries part of a user whose other part another message reads again."""
    size = settings.plan_page_accounts
    with session_scope(settings) as session:
        run = _own(session, run_id, generation, after)
        stmt = (
            select(BankAccount.powens_user_pk, BankAccount.id, BankAccount.tenant_id)
            .join(RunTenant, and_(RunTenant.run_id == run_id, RunTenant.tenant_id == BankAccount.tenant_id))
            .where(BankAccount.status == AccountStatus.ACTIVE)
            .order_by(BankAccount.powens_user_pk, BankAccount.id)
            .limit(size + 1)
        )
        if after is not None:
            stmt = stmt.where(tuple_(BankAccount.powens_user_pk, BankAccount.id) > after)
        rows = [(int(u), str(a), str(t)) for u, a, t in session.execute(stmt)]
        page = rows[:size]
        if len(rows) > size and rows[size][0] == page[-1][0]:
            page = [r for r in page if r[0] != page[-1][0]] or page
        if not page:
            return []
        items = [Item(f"{run_id}:{acc}", tenant, acc, user) for user, acc, tenant in page]
        session.execute(
            insert(RunItem),
            [
                {
                    "run_id": run_id,
                    "tenant_id": i.tenant_id,
                    "account_id": i.account_id,
                    "task_id": i.task_id,
                    "status": ItemStatus.PENDING,
                    "powens_user_pk": i.powens_user_pk,
                }
                for i in items
            ],
        )
        per_tenant = Counter(i.tenant_id for i in items)
        # One lock order everywhere tenants' counters change: by tenant id.
        table = RunTenant.__table__
        assert isinstance(table, Table)
        counters = table.c
        session.connection().execute(  # Core: one statement, executed for each tenant of the page
            update(table)
            .where(counters.run_id == run_id, counters.tenant_id == bindparam("tenant"))
            .values(
                expected=counters.expected + bindparam("n"), remaining=counters.remaining + bindparam("n")
            ),
            [{"tenant": t, "n": n} for t, n in sorted(per_tenant.items())],
        )
        now = _now()
        run.plan_user_pk, run.plan_account_id = page[-1][0], page[-1][1]
        run.total_accounts += len(items)
        run.planned_at = now  # progress, for the sweeper
        run.planner_lease_until = _lease(settings, now)
        analyze = _should_analyze(run.total_accounts, len(items))
    if analyze and not settings.is_sqlite:
        # The table grew by rows the query planner has no statistics for: refreshes look items up by
        # run and account, and a run id it has never seen is estimated at one row whatever it holds
        # (measured: scans of every pending item per batch, 135-300 ms at 100,000). Statistics after
        # the first page and whenever the run doubled: a logarithmic number of ANALYZEs a night.
        with session_scope(settings) as session:
            session.execute(text("ANALYZE run_items"))
    return items


def _should_analyze(planned: int, page: int) -> bool:
    before = planned - page
    return before == 0 or before.bit_length() != planned.bit_length()


def unpublished(settings: Settings, run_id: str, published: Cursor | None, cursor: Cursor) -> list[Item]:
    """The pending items written after ``published`` up to ``cursor``: a page whose step died before
    it was published."""
    with session_scope(settings) as session:
        stmt = (
            select(RunItem.task_id, RunItem.tenant_id, RunItem.account_id, RunItem.powens_user_pk)
            .where(
                RunItem.run_id == run_id,
                RunItem.status == ItemStatus.PENDING,
                tuple_(RunItem.powens_user_pk, RunItem.account_id) <= cursor,
            )
            .order_by(RunItem.powens_user_pk, RunItem.account_id)
        )
        if published is not None:
            stmt = stmt.where(tuple_(RunItem.powens_user_pk, RunItem.account_id) > published)
        return [Item(str(t), str(tn), str(a), int(u)) for t, tn, a, u in session.execute(stmt)]


def mark_published(settings: Settings, run_id: str, generation: int, upto: Cursor) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(RefreshRun)
            .where(RefreshRun.id == run_id, RefreshRun.replans == generation)
            .values(published_user_pk=upto[0], published_account_id=upto[1])
        )


def hold(settings: Settings, run_id: str, generation: int) -> bool:
    """Renew the lease of a planner waiting for the queue to drain (alive, not progressing)."""
    with session_scope(settings) as session:
        changed = session.execute(
            update(RefreshRun)
            .where(
                RefreshRun.id == run_id,
                RefreshRun.status == RunStatus.PLANNING,
                RefreshRun.replans == generation,
            )
            .values(planner_lease_until=_lease(settings, _now()))
        )
        return bool(getattr(changed, "rowcount", 0))


def finish(settings: Settings, run_id: str, generation: int, after: Cursor | None) -> list[str]:
    """Every page written: the run moves to running. Returns the tenants with nothing left to refresh
    (none planned, or all refreshed already), whose summaries the caller claims now."""
    with session_scope(settings) as session:
        _own(session, run_id, generation, after)
        tenants = session.scalar(
            select(func.count()).select_from(RunTenant).where(RunTenant.run_id == run_id)
        )
        move_run(
            session,
            run_id,
            RunStatus.PLANNING,
            RunStatus.RUNNING,
            total_tenants=int(tenants or 0),
            planned_at=_now(),
            planner_lease_until=None,
        )
        return list(
            session.scalars(
                select(RunTenant.tenant_id).where(
                    RunTenant.run_id == run_id,
                    RunTenant.status == TenantStatus.REFRESHING,
                    RunTenant.remaining <= 0,
                )
            )
        )
