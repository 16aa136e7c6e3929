"""Planning a run in steps: what each step reads and writes, one short transaction each.

A run is planned a page of accounts at a time (``BALANCES_PLAN_PAGE_ACCOUNTS``), in (tenant, Powens
user, account id) order, so each step's work is bounded whatever the size of the service (10 M
accounts are 5,000 steps, not one statement that outgrows every time limit). The run row holds where
planning is:

- ``plan_*`` (the cursor): the last account written as an item. A step writes the next page only if
  the cursor is still the one it was sent for (``after``) and the run is still its planner's
  (``generation``), under the run row's lock: a step delivered twice writes nothing twice, a step of a
  planner superseded by a re-plan stops, and a re-planned run resumes where it stopped.
- ``published_*``: the last account published. A step that died between writing its page and
  publishing it leaves the gap, which the next planner publishes first.
- ``planner_lease_until``: the live planner's lease, renewed by every step. The sweeper re-plans a
  planning run only once its lease ran out (a slow planner is alive; a dead one stops renewing).
- ``replans``: the planner's generation.

Tenants get their counter row when planning begins (``expected`` and ``remaining`` 0), and each page
adds its accounts to its tenants' counters in the transaction that writes its items, so an account
refreshed before planning ends always finds its counter. Pages go in tenant order, so once the cursor
is past a tenant, that tenant's plan is whole: its summary may be claimed then (``runs.claim_summary``,
``runs.claim_ready``), and summaries spread over the night instead of waiting for the last page.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, String, and_, func, insert, literal, select, text, tuple_, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.store.db import session_scope
from app.store.models import BankAccount, RefreshRun, RunItem, RunTenant, Tenant
from app.store.runs import Item, move_run
from app.store.states import RUN_MOVES, AccountStatus, ItemStatus, RunStatus, TenantStatus, check_move

Cursor = tuple[str, int, str]  # (tenant id, Powens user pk, account id): the keyset planning pages through

# The keyset, on accounts and on items. A Powens user belongs to one tenant: a tenant's accounts, and a
# user's, are contiguous in it.
ACCOUNT_KEY = tuple_(BankAccount.tenant_id, BankAccount.powens_user_pk, BankAccount.id)
ITEM_KEY = tuple_(RunItem.tenant_id, RunItem.powens_user_pk, RunItem.account_id)


def _between(key: Any, after: Cursor | None, upto: Cursor | None) -> list[ColumnElement[bool]]:
    """``after < key <= upto``, either bound open when None."""
    return [
        *((key > after,) if after is not None else ()),
        *((key <= upto,) if upto is not None else ()),
    ]


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
        tenants = int(
            session.scalar(select(func.count()).select_from(RunTenant).where(RunTenant.run_id == run_id)) or 0
        )
    if not settings.is_sqlite:
        # Its new rows have no statistics: the query planner would take this run's tenants for a few
        # and drive every page from them (every account of every tenant, then a sort: measured 33 ms
        # a page at 100,000 accounts) instead of reading the page off the keyset index.
        with session_scope(settings) as session:
            session.execute(text("ANALYZE run_tenants"))
    return tenants


def state(settings: Settings, run_id: str) -> PlanState | None:
    with session_scope(settings) as session:
        run = session.get(RefreshRun, run_id)
        if run is None:
            return None
        return PlanState(
            RunStatus(run.status),
            run.replans,
            _cursor(run.plan_tenant_id, run.plan_user_pk, run.plan_account_id),
            _cursor(run.published_tenant_id, run.published_user_pk, run.published_account_id),
            run.total_accounts,
        )


def _cursor(tenant_id: str | None, user_pk: int | None, account_id: str | None) -> Cursor | None:
    if tenant_id is None or user_pk is None or account_id is None:
        return None
    return (tenant_id, int(user_pk), account_id)


def _planner(run_id: str, generation: int) -> ColumnElement[bool]:
    """The run while it is planning under this planner (its generation)."""
    return and_(
        RefreshRun.id == run_id,
        RefreshRun.status == RunStatus.PLANNING,
        RefreshRun.replans == generation,
    )


def _own(session: Session, run_id: str, generation: int, after: Cursor | None) -> RefreshRun:
    """The run row, locked, while it is this planner's and its cursor is still ``after``."""
    run = session.scalar(select(RefreshRun).where(_planner(run_id, generation)).with_for_update())
    if run is None or _cursor(run.plan_tenant_id, run.plan_user_pk, run.plan_account_id) != after:
        raise Superseded(run_id)
    return run


@dataclass(frozen=True)
class Page:
    items: list[Item]  # written now (an account gone meanwhile is not in it)
    upto: Cursor  # the new cursor: the next step plans after it


def write_page(settings: Settings, run_id: str, generation: int, after: Cursor | None) -> Page | None:
    """The next page of active accounts after ``after``, written as pending items with their task
    ids, added to their tenants' counters, the cursor and the lease moved on: one transaction of a few
    set-based statements (the database writes the items, ``INSERT … SELECT``; one row per statement
    cost 1 statement per account, measured: 3,400 accounts/s). None: nothing left to plan. A page ends
    at a Powens user's boundary (a user with more accounts than a page is split), so one refresh message
    never carries part of a user whose other part another message reads again."""
    size = settings.plan_page_accounts
    with session_scope(settings) as session:
        run = _own(session, run_id, generation, after)
        planned = and_(
            BankAccount.status == AccountStatus.ACTIVE,
            select(RunTenant.tenant_id)
            .where(RunTenant.run_id == run_id, RunTenant.tenant_id == BankAccount.tenant_id)
            .exists(),
            *_between(ACCOUNT_KEY, after, None),
        )
        keys = [
            (str(t), int(u), str(a))
            for t, u, a in session.execute(
                select(BankAccount.tenant_id, BankAccount.powens_user_pk, BankAccount.id)
                .where(planned)
                .order_by(BankAccount.tenant_id, BankAccount.powens_user_pk, BankAccount.id)
                .limit(size + 1)
            )
        ]
        page = keys[:size]
        if len(keys) > size and keys[size][:2] == page[-1][:2]:
            page = [k for k in page if k[:2] != page[-1][:2]] or page
        if not page:
            return None
        upto = page[-1]
        run_lit = literal(run_id, String)
        written = session.execute(
            insert(RunItem)
            .from_select(
                ["run_id", "tenant_id", "account_id", "task_id", "status", "powens_user_pk"],
                select(
                    run_lit,
                    BankAccount.tenant_id,
                    BankAccount.id,
                    run_lit + literal(":", String) + BankAccount.id,
                    literal(ItemStatus.PENDING.value, String),
                    BankAccount.powens_user_pk,
                ).where(planned, upto >= ACCOUNT_KEY),
            )
            .returning(RunItem.task_id, RunItem.tenant_id, RunItem.account_id, RunItem.powens_user_pk)
        ).all()
        items = sorted(
            (Item(str(t), str(tn), str(a), int(u)) for t, tn, a, u in written),
            key=lambda i: (i.tenant_id, i.powens_user_pk, i.account_id),
        )
        # One lock order everywhere tenants' counters change: by tenant id (then one UPDATE … FROM).
        session.execute(
            select(RunTenant.tenant_id)
            .where(RunTenant.run_id == run_id, RunTenant.tenant_id.in_(sorted({i.tenant_id for i in items})))
            .order_by(RunTenant.tenant_id)
            .with_for_update()
        ).all()
        added = (
            select(RunItem.tenant_id, func.count().label("n"))
            .where(RunItem.run_id == run_id, *_between(ITEM_KEY, after, upto))
            .group_by(RunItem.tenant_id)
            .subquery()
        )
        session.execute(
            update(RunTenant)
            .where(RunTenant.run_id == run_id, RunTenant.tenant_id == added.c.tenant_id)
            .values(expected=RunTenant.expected + added.c.n, remaining=RunTenant.remaining + added.c.n)
            .execution_options(synchronize_session=False)
        )
        now = _now()
        run.plan_tenant_id, run.plan_user_pk, run.plan_account_id = upto
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
    return Page(items, upto)


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
                *_between(ITEM_KEY, published, cursor),
            )
            .order_by(RunItem.tenant_id, RunItem.powens_user_pk, RunItem.account_id)
        )
        return [Item(str(t), str(tn), str(a), int(u)) for t, tn, a, u in session.execute(stmt)]


def mark_published(settings: Settings, run_id: str, generation: int, upto: Cursor) -> None:
    with session_scope(settings) as session:
        session.execute(
            update(RefreshRun)
            .where(_planner(run_id, generation))
            .values(published_tenant_id=upto[0], published_user_pk=upto[1], published_account_id=upto[2])
        )


def hold(settings: Settings, run_id: str, generation: int) -> bool:
    """Renew the lease of a planner waiting for the queue to drain (alive, not progressing)."""
    with session_scope(settings) as session:
        changed = session.execute(
            update(RefreshRun)
            .where(_planner(run_id, generation))
            .values(planner_lease_until=_lease(settings, _now()))
        )
        return bool(getattr(changed, "rowcount", 0))


def finish(settings: Settings, run_id: str, generation: int, after: Cursor | None) -> None:
    """Every page written: the run moves to running (its tenants' summaries are claimed by the caller,
    ``runs.claim_ready``, in bounded pieces)."""
    with session_scope(settings) as session:
        _own(session, run_id, generation, after)
        _to_running(session, run_id, error=None)


def abandon(settings: Settings, run_id: str, planned: int) -> bool:
    """A run whose planning could not be finished (its planner died again and again, or never came
    back before the deadline): it runs with what was planned, so its accounts are refreshed or given up
    and its tenants summarised, as a run's always are. Its error says how far planning went."""
    with session_scope(settings) as session:
        run = session.scalar(
            select(RefreshRun)
            .where(RefreshRun.id == run_id, RefreshRun.status == RunStatus.PLANNING)
            .with_for_update()
        )
        if run is None:
            return False
        _to_running(
            session, run_id, error=f"planning stopped after {planned} accounts: the rest not refreshed"
        )
        return True


def _to_running(session: Session, run_id: str, error: str | None) -> None:
    tenants = session.scalar(select(func.count()).select_from(RunTenant).where(RunTenant.run_id == run_id))
    move_run(
        session,
        run_id,
        RunStatus.PLANNING,
        RunStatus.RUNNING,
        total_tenants=int(tenants or 0),
        planned_at=_now(),
        planner_lease_until=None,
        **({"error": error} if error else {}),
    )
