"""What the sweeper reads of open runs and does to them: re-plan, re-drive, give items up, re-send reports.

Every change is a conditional UPDATE checked against the moves in ``app.store.states``, like the rest
of the run's state machine (``app.store.runs``). See docs/design.md "The nightly pipeline".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update

from app.config import Settings
from app.store.db import rowcount, session_scope
from app.store.models import RefreshRun, RunItem, RunTenant
from app.store.runs import move_run
from app.store.states import (
    ITEM_MOVES,
    OPEN_RUN_STATUSES,
    RUN_MOVES,
    ItemStatus,
    RunStatus,
    TenantStatus,
    check_move,
)


@dataclass(frozen=True)
class OpenRun:
    id: str
    status: RunStatus
    created_at: datetime
    last_progress: datetime  # the latest of: created, planned, an item finished
    last_activity: datetime  # last_progress, or the sweeper's last re-drive / re-plan if later
    redriven_at: datetime | None
    redrives: int
    replans: int
    pending: int
    planner_lease_until: datetime | None = None  # a planning run's live planner holds it until then
    planned: int = 0  # accounts planned so far


def open_runs(settings: Settings) -> list[OpenRun]:
    with session_scope(settings) as session:
        rows = session.execute(
            select(
                RefreshRun.id,
                RefreshRun.status,
                RefreshRun.created_at,
                RefreshRun.planned_at,
                RefreshRun.redispatched_at,
                RefreshRun.redrives,
                RefreshRun.replans,
                RefreshRun.planner_lease_until,
                RefreshRun.total_accounts,
            ).where(RefreshRun.status.in_(OPEN_RUN_STATUSES))
        ).all()
        found = []
        for run_id, status, created, planned, redriven, redrives, replans, lease, total in rows:
            progress = session.scalar(select(func.max(RunItem.finished_at)).where(RunItem.run_id == run_id))
            pending = session.scalar(
                select(func.count())
                .select_from(RunItem)
                .where(RunItem.run_id == run_id, RunItem.status == ItemStatus.PENDING)
            )
            last_progress = max(t for t in (created, planned, progress) if t is not None)
            last_activity = max(last_progress, redriven) if redriven is not None else last_progress
            found.append(
                OpenRun(
                    run_id,
                    RunStatus(status),
                    created,
                    last_progress,
                    last_activity,
                    redriven,
                    redrives,
                    replans,
                    int(pending or 0),
                    lease,
                    int(total or 0),
                )
            )
    return found


def replan(settings: Settings, run: OpenRun, now: datetime, *, force: bool = False) -> bool:
    """A run whose planner died (or whose plan message was lost) goes back to pending, counted: the next
    planner resumes from the run's cursor (what was planned and published stays). A planning run is
    taken only while its planner's lease is still out (checked in the UPDATE: a step renewing it at
    this moment keeps its run), unless ``force`` (the broker lost the planner's next step)."""
    with session_scope(settings) as session:
        values = {"replans": RefreshRun.replans + 1, "redispatched_at": now}
        if run.status is RunStatus.PLANNING and not force:
            check_move(RUN_MOVES, RunStatus.PLANNING, RunStatus.PENDING)
            lease = RefreshRun.planner_lease_until
            return bool(
                rowcount(
                    session.execute(
                        update(RefreshRun)
                        .where(
                            RefreshRun.id == run.id,
                            RefreshRun.status == RunStatus.PLANNING,
                            or_(lease.is_(None), lease <= now),
                        )
                        .values(status=RunStatus.PENDING, **values)
                    )
                )
            )
        if run.status is RunStatus.PENDING:
            return bool(
                rowcount(
                    session.execute(
                        update(RefreshRun)
                        .where(RefreshRun.id == run.id, RefreshRun.status == RunStatus.PENDING)
                        .values(**values)
                    )
                )
            )
        return move_run(session, run.id, run.status, RunStatus.PENDING, **values)


def claim_redrive(settings: Settings, run: OpenRun, at: datetime) -> bool:
    """One sweeper wins the re-drive of a stalled run (two overlapping sweeps never both publish)."""
    with session_scope(settings) as session:
        seen = (
            RefreshRun.redispatched_at.is_(None)
            if run.redriven_at is None
            else RefreshRun.redispatched_at == run.redriven_at
        )
        return bool(
            rowcount(
                session.execute(
                    update(RefreshRun)
                    .where(RefreshRun.id == run.id, RefreshRun.status == RunStatus.RUNNING, seen)
                    .values(redispatched_at=at, redrives=RefreshRun.redrives + 1)
                )
            )
        )


def mark_items_stale(settings: Settings, run_id: str, now: datetime) -> int:
    """Items still pending are given up (``stale``, reason ``lost``) and their tenants' counters
    moved on by exactly the items this statement changed (``RETURNING``): a refresh committing at the
    same moment either finished its item first (not returned here) or finds it stale (no decrement)."""
    check_move(ITEM_MOVES, ItemStatus.PENDING, ItemStatus.STALE)
    with session_scope(settings) as session:
        changed = session.execute(
            update(RunItem)
            .where(RunItem.run_id == run_id, RunItem.status == ItemStatus.PENDING)
            .values(status=ItemStatus.STALE, reason="lost", finished_at=now)
            .returning(RunItem.tenant_id)
        ).all()
        per_tenant = Counter(row[0] for row in changed)
        for tenant_id, n in per_tenant.items():
            session.execute(
                update(RunTenant)
                .where(RunTenant.run_id == run_id, RunTenant.tenant_id == tenant_id)
                .values(remaining=RunTenant.remaining - n, stale=RunTenant.stale + n)
            )
    return len(changed)


def give_up(settings: Settings, run_id: str, status: RunStatus, now: datetime, error: str) -> bool:
    with session_scope(settings) as session:
        return move_run(session, run_id, status, RunStatus.STALE, finished_at=now, error=error)


def claim_resends(
    settings: Settings, run_id: str, sent_before: datetime, now: datetime, max_resends: int
) -> list[tuple[str, TenantStatus]]:
    """Tenants whose summary or forecast task was sent before ``sent_before`` and has not moved them on
    (its message was lost): each is claimed for one more send (counted, at most ``max_resends``)."""
    with session_scope(settings) as session:
        rows = session.execute(
            update(RunTenant)
            .where(
                RunTenant.run_id == run_id,
                RunTenant.status.in_((TenantStatus.SUMMARISING, TenantStatus.FORECASTING)),
                RunTenant.summary_enqueued_at < sent_before,
                RunTenant.resends < max_resends,
            )
            .values(summary_enqueued_at=now, resends=RunTenant.resends + 1)
            .returning(RunTenant.tenant_id, RunTenant.status)
        ).all()
    return [(t, TenantStatus(s)) for t, s in rows]
