"""The nightly run's state in the database: runs, their tenants and items, and every move between states.

A run row (``refresh_runs``) has one ``run_tenants`` row per active tenant and one ``run_items`` row
per account to refresh. Every status change is one conditional UPDATE (``... WHERE status = <from>``)
checked against the moves in ``app.store.states``: when two workers race for the same move, exactly
one row count is 1. Completion lives here, not in Celery chords (a failed header task breaks a chord
on Redis: celery#4207, #5229). See docs/design.md "Runs as a state machine".

Functions taking a ``Session`` run inside the caller's transaction; those taking ``Settings`` are one
transaction each.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, and_, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.store.db import rowcount, session_scope
from app.store.models import RefreshRun, RunItem, RunTenant
from app.store.states import (
    RUN_MOVES,
    TENANT_MOVES,
    ItemStatus,
    RunKind,
    RunStatus,
    TenantStatus,
    Trigger,
    check_move,
)


class Item(NamedTuple):
    """One account of a run, as published: what a scheduled refresh needs (a JSON list on the wire)."""

    task_id: str
    tenant_id: str
    account_id: str
    powens_user_pk: int = 0

    @classmethod
    def of(cls, raw: Sequence[Any]) -> Item:
        """An item as a message carries it (a list of 3 or 4 values)."""
        return cls(str(raw[0]), str(raw[1]), str(raw[2]), int(raw[3]) if len(raw) > 3 else 0)


def _now() -> datetime:
    return datetime.now(UTC)


# -- moves -------------------------------------------------------------------------------------------


def move_run(session: Session, run_id: str, frm: RunStatus, to: RunStatus, **values: Any) -> bool:
    check_move(RUN_MOVES, frm, to)
    if not to.open:  # the move that ends a run keeps its final counts on it (its items are pruned later)
        values.setdefault("outcomes", item_counts(session, run_id))
    return bool(
        rowcount(
            session.execute(
                update(RefreshRun)
                .where(RefreshRun.id == run_id, RefreshRun.status == frm)
                .values(status=to, **values)
            )
        )
    )


def move_tenant(
    session: Session, run_id: str, tenant_id: str, frm: TenantStatus, to: TenantStatus, **values: Any
) -> bool:
    check_move(TENANT_MOVES, frm, to)
    if to is TenantStatus.DONE:
        values.setdefault("finished_at", _now())
    return bool(
        rowcount(
            session.execute(
                update(RunTenant)
                .where(RunTenant.run_id == run_id, RunTenant.tenant_id == tenant_id, RunTenant.status == frm)
                .values(status=to, **values)
            )
        )
    )


# -- creating and planning -----------------------------------------------------------------------------


def create_run(
    settings: Settings,
    *,
    trigger: Trigger,
    actor: str,
    tick: str | None = None,
    business_day: date | None = None,
) -> tuple[str, bool]:
    """The run row. A scheduled slot already seen returns the existing run (created=False).

    ``business_day`` is fixed here, once (default: today's in BALANCES_TIMEZONE)."""
    with session_scope(settings) as session:
        if tick is not None:
            existing = session.scalar(select(RefreshRun.id).where(RefreshRun.tick == tick))
            if existing is not None:
                return existing, False
        now = _now()
        run_id = f"run_{now.strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:8]}"
        session.add(
            RefreshRun(
                id=run_id,
                kind=RunKind.NIGHTLY,
                trigger=Trigger(trigger),
                tick=tick,
                status=RunStatus.PENDING,
                actor=actor,
                business_day=business_day or settings.business_day(now),
                created_at=now,
            )
        )
    return run_id, True


def abandon_unpublished(settings: Settings, run_id: str, why: str) -> bool:
    """A run whose planning message could not be published: closed at once (stale, with why), so it
    is neither shown as the latest run waiting for nobody nor planned later by the sweeper."""
    with session_scope(settings) as session:
        return move_run(session, run_id, RunStatus.PENDING, RunStatus.STALE, error=why, finished_at=_now())


def item_pages(settings: Settings, run_id: str, size: int, *, pending_only: bool) -> Iterator[list[Item]]:
    """The run's items in pages of about ``size``, grouped by Powens user (keyset on user, account),
    each page read in its own short transaction so that publishing 100,000 items never holds one open.
    A page ends at a user boundary (a user with more than ``size`` accounts alone is split), so one
    message never carries part of a user whose other part another message reads again."""
    last: tuple[int, str] = (-1, "")
    while True:
        stmt = select(RunItem.task_id, RunItem.tenant_id, RunItem.account_id, RunItem.powens_user_pk).where(
            RunItem.run_id == run_id, tuple_(RunItem.powens_user_pk, RunItem.account_id) > last
        )
        if pending_only:
            stmt = stmt.where(RunItem.status == ItemStatus.PENDING)
        stmt = stmt.order_by(RunItem.powens_user_pk, RunItem.account_id).limit(size + 1)
        with session_scope(settings) as session:
            rows = [Item(r[0], r[1], r[2], int(r[3])) for r in session.execute(stmt).all()]
        if not rows:
            return
        page = rows[:size]
        if len(rows) > size and rows[size][3] == page[-1][3]:
            whole = [r for r in page if r[3] != page[-1][3]]
            page = whole or page  # a user larger than a page is split; else its rest waits
        yield page
        last = (page[-1][3], page[-1][2])


def business_day_of(settings: Settings, run_id: str) -> date | None:
    with session_scope(settings) as session:
        return session.scalar(select(RefreshRun.business_day).where(RefreshRun.id == run_id))


# -- completion ----------------------------------------------------------------------------------------


def _plan_whole() -> ColumnElement[bool]:
    """A run tenant's plan is whole: its run is running, or its planner's cursor is past the tenant
    (pages go in tenant order: app.store.planning). Before, its counter may reach 0 with more of its
    accounts still to plan."""
    return (
        select(RefreshRun.id)
        .where(
            RefreshRun.id == RunTenant.run_id,
            or_(
                RefreshRun.status == RunStatus.RUNNING,
                and_(
                    RefreshRun.status == RunStatus.PLANNING, RefreshRun.plan_tenant_id > RunTenant.tenant_id
                ),
            ),
        )
        .exists()
    )


def claim_summary(settings: Settings, run_id: str, tenant_id: str) -> bool:
    """Exactly one caller moves a tenant whose counter reached zero from refreshing to summarising."""
    with session_scope(settings) as session:
        check_move(TENANT_MOVES, TenantStatus.REFRESHING, TenantStatus.SUMMARISING)
        return bool(
            rowcount(
                session.execute(
                    update(RunTenant)
                    .where(
                        RunTenant.run_id == run_id,
                        RunTenant.tenant_id == tenant_id,
                        RunTenant.status == TenantStatus.REFRESHING,
                        RunTenant.remaining <= 0,
                        _plan_whole(),
                    )
                    .values(status=TenantStatus.SUMMARISING, summary_enqueued_at=_now())
                )
            )
        )


def claim_ready(settings: Settings, run_id: str, limit: int) -> list[str]:
    """Up to ``limit`` tenants whose counter is at 0 and whose plan is whole, moved to summarising by
    one statement (a tenant with nothing to refresh, or whose last refresh ended before the planner
    passed it, or whose own claim was lost): their summaries are the caller's to send. Bounded, so a
    step or a sweep stays short; the next one takes the rest."""
    check_move(TENANT_MOVES, TenantStatus.REFRESHING, TenantStatus.SUMMARISING)
    with session_scope(settings) as session:
        ready = (
            select(RunTenant.tenant_id)
            .where(
                RunTenant.run_id == run_id,
                RunTenant.status == TenantStatus.REFRESHING,
                RunTenant.remaining <= 0,
                _plan_whole(),
            )
            .order_by(RunTenant.tenant_id)
            .limit(limit)
        )
        if not settings.is_sqlite:
            ready = ready.with_for_update(skip_locked=True)
        return list(
            session.scalars(
                update(RunTenant)
                .where(
                    RunTenant.run_id == run_id,
                    RunTenant.tenant_id.in_(ready.scalar_subquery()),
                    RunTenant.status == TenantStatus.REFRESHING,
                )
                .values(status=TenantStatus.SUMMARISING, summary_enqueued_at=_now())
                .returning(RunTenant.tenant_id)
            )
        )


def finish_if_complete(settings: Settings, run_id: str) -> datetime | None:
    """Mark the run completed once every tenant is done; returns the finish time to the one caller.
    Whether a tenant is still open is asked of the index on (run, status) — every forecast asks it, and
    counting a 200,000-tenant run's open tenants each time would be quadratic over the night."""
    with session_scope(settings) as session:
        still_open = session.scalar(
            select(
                select(RunTenant.tenant_id)
                .where(
                    RunTenant.run_id == run_id,
                    RunTenant.status.in_(
                        (TenantStatus.REFRESHING, TenantStatus.SUMMARISING, TenantStatus.FORECASTING)
                    ),
                )
                .exists()
            )
        )
        if still_open:
            return None
        now = _now()
        done = move_run(session, run_id, RunStatus.RUNNING, RunStatus.COMPLETED, finished_at=now)
        return now if done else None


def last_success(settings: Settings) -> datetime | None:
    with session_scope(settings) as session:
        return session.scalar(
            select(func.max(RefreshRun.finished_at)).where(RefreshRun.status == RunStatus.COMPLETED)
        )


# -- status --------------------------------------------------------------------------------------------


def outcomes(session: Session, run: RefreshRun) -> dict[str, Any]:
    """The run's counts: kept on a finished run (written now for one that finished before they were
    kept, while its items are still there), counted from the items of an open one."""
    if run.outcomes is not None:
        return dict(run.outcomes)
    counts = item_counts(session, run.id)
    if not RunStatus(run.status).open:
        run.outcomes = counts
    return counts


def item_counts(session: Session, run_id: str) -> dict[str, Any]:
    """The run's items by status, and its failures by reason."""
    by_status = dict(
        session.execute(
            select(RunItem.status, func.count()).where(RunItem.run_id == run_id).group_by(RunItem.status)
        ).all()
    )
    by_reason = dict(
        session.execute(
            select(RunItem.reason, func.count())
            .where(RunItem.run_id == run_id, RunItem.status == ItemStatus.FAILED)
            .group_by(RunItem.reason)
        ).all()
    )
    return {
        **{s.value: int(by_status.get(s, 0)) for s in ItemStatus},
        "failuresByReason": {str(k): int(v) for k, v in by_reason.items()},
    }


def run_status(settings: Settings, run_id: str | None = None) -> dict[str, Any] | None:
    """Counts, duration, failures by reason, stale accounts: what `balances run status` shows."""
    with session_scope(settings) as session:
        if run_id is None:
            run_id = session.scalar(select(RefreshRun.id).order_by(RefreshRun.created_at.desc()).limit(1))
            if run_id is None:
                return None
        run = session.get(RefreshRun, run_id)
        if run is None:
            return None
        counts = outcomes(session, run)
        stale = session.execute(
            select(RunItem.tenant_id, RunItem.account_id)
            .where(RunItem.run_id == run_id, RunItem.status == ItemStatus.STALE)
            .order_by(RunItem.tenant_id, RunItem.account_id)
            .limit(100)
        ).all()
        tenants = dict(
            session.execute(
                select(RunTenant.status, func.count())
                .where(RunTenant.run_id == run_id)
                .group_by(RunTenant.status)
            ).all()
        )
        end = run.finished_at or _now()
        return {
            "runId": run.id,
            "status": run.status,
            "trigger": run.trigger,
            "actor": run.actor,
            "createdAt": run.created_at,
            "finishedAt": run.finished_at,
            "durationSeconds": round((end - run.created_at).total_seconds(), 3),
            "tenants": {"total": run.total_tenants, **dict(tenants.items())},
            "accounts": {"total": run.total_accounts, **{s.value: int(counts.get(s, 0)) for s in ItemStatus}},
            "failuresByReason": dict(counts.get("failuresByReason", {})),
            "staleAccounts": [{"tenantId": t, "accountId": a} for t, a in stale],
            "error": run.error,
        }


def list_runs(settings: Settings, limit: int = 20) -> list[dict[str, Any]]:
    """The latest runs, newest first, each with its status, trigger, timing and counts (one grouped
    count of their items): what `balances run list` shows, as Flower's task history does."""
    with session_scope(settings) as session:
        found = session.scalars(
            select(RefreshRun).order_by(RefreshRun.created_at.desc(), RefreshRun.id.desc()).limit(limit)
        ).all()
        # A finished run carries its final counts (one that finished before they were kept gets them
        # now, once); only open runs' items are counted, grouped, each time.
        counts: dict[str, dict[str, Any]] = {
            r.id: outcomes(session, r) if not RunStatus(r.status).open else {} for r in found
        }
        for run_id, status, n in session.execute(
            select(RunItem.run_id, RunItem.status, func.count())
            .where(RunItem.run_id.in_([r.id for r in found if RunStatus(r.status).open]))
            .group_by(RunItem.run_id, RunItem.status)
        ):
            counts[run_id][status] = int(n)
        now = _now()
        return [
            {
                "runId": r.id,
                "status": r.status,
                "trigger": r.trigger,
                "actor": r.actor,
                "businessDay": r.business_day,
                "createdAt": r.created_at,
                "finishedAt": r.finished_at,
                "durationSeconds": round(((r.finished_at or now) - r.created_at).total_seconds(), 3),
                "accounts": {
                    "total": r.total_accounts,
                    **{s.value: counts[r.id].get(s, 0) for s in ItemStatus},
                },
                "error": r.error,
            }
            for r in found
        ]
