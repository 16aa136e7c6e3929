"""The nightly pipeline: a run row, planning and fan-out in batches, completion in the database, sweeping.

Completion is tracked in the database, not with Celery chords (a failed header task breaks a chord on
Redis: celery#4207, #5229). Each refresh of a run, on its terminal outcome and in the same transaction
as its audit row, marks its ``run_items`` row and decrements its tenant's ``remaining``. The move of a
tenant out of ``refreshing`` is one conditional UPDATE, so exactly one caller wins it and enqueues the
summary; the summary's and the forecast's own transitions make them exactly-once in effect. A sweeper
re-dispatches what was lost (once) and then finalises tenants with the missing accounts marked stale.

Functions here take a ``publish`` callback instead of importing Celery: tasks own the broker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import String, delete, func, insert, literal, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.store.db import rowcount, session_scope
from app.store.models import BankAccount, RefreshRun, RunItem, RunTenant, Tenant

log = logging.getLogger(__name__)

# publish(run_id, items) sends refresh tasks for [(task_id, tenant_id, account_id)] in one connection.
Publish = Callable[[str, Sequence[tuple[str, str, str]]], None]
# enqueue(run_id, tenant_id) sends the tenant's summary task.
EnqueueSummary = Callable[[str, str], None]


def _now() -> datetime:
    return datetime.now(UTC)


# -- starting and planning -------------------------------------------------------------------------


def start_run(settings: Settings, *, trigger: str, actor: str, tick: str | None = None) -> tuple[str, bool]:
    """Create the run row. A scheduled tick already seen returns the existing run (created=False)."""
    with session_scope(settings) as session:
        if tick is not None:
            existing = session.scalar(select(RefreshRun.id).where(RefreshRun.tick == tick))
            if existing is not None:
                return existing, False
        run_id = f"run_{_now().strftime('%Y%m%dT%H%M%S')}_{uuid.uuid4().hex[:8]}"
        session.add(
            RefreshRun(
                id=run_id,
                kind="nightly",
                trigger=trigger,
                tick=tick,
                status="pending",
                actor=actor,
                created_at=_now(),
            )
        )
    return run_id, True


def plan_run(settings: Settings, run_id: str, publish: Publish, enqueue_summary: EnqueueSummary) -> int:
    """Enumerate active accounts per active tenant and fan out one refresh per account.

    Three passes, none holding every account in memory: the database writes the run items
    (INSERT ... SELECT), per-tenant counters are derived from them, then the items are published in
    batches of ``plan_batch_size`` (one fan-out message per batch; workers publish its refreshes).
    Publishing comes last, so an early finisher always finds its tenant's counter. Returns the number
    of accounts planned.
    """
    batch = settings.plan_batch_size
    with session_scope(settings) as session:
        claimed = rowcount(
            session.execute(
                update(RefreshRun)
                .where(RefreshRun.id == run_id, RefreshRun.status == "pending")
                .values(status="planning")
            )
        )
    if not claimed:
        log.info("run %s is not pending; planning skipped", run_id, extra={"run_id": run_id})
        return 0

    # Pass 1: the run items, computed and written by the database in one statement (no account
    # passes through this process). A planner that died before pass 2 committed published nothing,
    # so a re-plan (the sweeper sends one) starts these items over.
    with session_scope(settings) as session:
        session.execute(delete(RunItem).where(RunItem.run_id == run_id))
        run_lit = literal(run_id, String)
        session.execute(
            insert(RunItem).from_select(
                ["run_id", "tenant_id", "account_id", "task_id", "status"],
                select(
                    run_lit,
                    BankAccount.tenant_id,
                    BankAccount.id,
                    (run_lit + literal(":", String) + BankAccount.id),
                    literal("pending", String),
                )
                .join(Tenant, Tenant.id == BankAccount.tenant_id)
                .where(Tenant.active.is_(True), BankAccount.status == "active"),
            )
        )

    # Pass 2: tenants and their counters (tenants without accounts still get a summary).
    with session_scope(settings) as session:
        counts = dict(
            session.execute(
                select(RunItem.tenant_id, func.count())
                .where(RunItem.run_id == run_id)
                .group_by(RunItem.tenant_id)
            ).all()
        )
        tenants = session.scalars(select(Tenant.id).where(Tenant.active.is_(True)).order_by(Tenant.id)).all()
        if tenants:
            session.execute(
                insert(RunTenant),
                [
                    {
                        "run_id": run_id,
                        "tenant_id": t,
                        "status": "refreshing",
                        "expected": counts.get(t, 0),
                        "remaining": counts.get(t, 0),
                        "stale": 0,
                    }
                    for t in tenants
                ],
            )
        run = session.get(RefreshRun, run_id)
        assert run is not None
        run.total_tenants = len(tenants)
        run.total_accounts = sum(counts.values())
        run.status = "running"
        run.planned_at = _now()
        total = run.total_accounts

    # Pass 3: publish, batch by batch, from the items (the source of truth).
    last_key = ""
    while True:
        with session_scope(settings) as session:
            page = session.execute(
                select(RunItem.task_id, RunItem.tenant_id, RunItem.account_id)
                .where(RunItem.run_id == run_id, RunItem.account_id > last_key)
                .order_by(RunItem.account_id)
                .limit(batch)
            ).all()
        if not page:
            break
        publish(run_id, [(p[0], p[1], p[2]) for p in page])
        last_key = page[-1][2]

    for tenant_id in [t for t in tenants if counts.get(t, 0) == 0]:
        claim_summary_and_enqueue(settings, run_id, tenant_id, enqueue_summary)
    log.info("run %s planned: %d accounts, %d tenants", run_id, total, len(tenants), extra={"run_id": run_id})
    return total


# -- completion ------------------------------------------------------------------------------------


def record_item(session: Session, run_id: str, account_id: str, status: str, reason: str | None) -> bool:
    """Inside the refresh's terminal transaction: the item's outcome and its tenant's counter.

    Only the first terminal outcome of an item counts (a redelivered or re-dispatched task finds it
    no longer pending). Returns True when this call recorded it.
    """
    changed = rowcount(
        session.execute(
            update(RunItem)
            .where(RunItem.run_id == run_id, RunItem.account_id == account_id, RunItem.status == "pending")
            .values(status=status, reason=reason, finished_at=_now())
        )
    )
    if not changed:
        return False
    item_tenant = (
        select(RunItem.tenant_id)
        .where(RunItem.run_id == run_id, RunItem.account_id == account_id)
        .scalar_subquery()
    )
    session.execute(
        update(RunTenant)
        .where(RunTenant.run_id == run_id, RunTenant.tenant_id == item_tenant)
        .values(remaining=RunTenant.remaining - 1)
    )
    return True


def claim_summary(settings: Settings, run_id: str, tenant_id: str) -> bool:
    """One conditional UPDATE: exactly one caller moves the tenant from refreshing to summarising."""
    with session_scope(settings) as session:
        return bool(
            rowcount(
                session.execute(
                    update(RunTenant)
                    .where(
                        RunTenant.run_id == run_id,
                        RunTenant.tenant_id == tenant_id,
                        RunTenant.status == "refreshing",
                        RunTenant.remaining <= 0,
                    )
                    .values(status="summarising", summary_enqueued_at=_now())
                )
            )
        )


def claim_summary_and_enqueue(
    settings: Settings, run_id: str, tenant_id: str, enqueue: EnqueueSummary
) -> bool:
    if claim_summary(settings, run_id, tenant_id):
        enqueue(run_id, tenant_id)
        return True
    return False


def advance_tenant(session: Session, run_id: str, tenant_id: str, frm: str, to: str) -> bool:
    """A tenant's step (summarising → forecasting → done), in the caller's transaction."""
    values: dict[str, Any] = {"status": to}
    if to == "done":
        values["finished_at"] = _now()
    return bool(
        rowcount(
            session.execute(
                update(RunTenant)
                .where(RunTenant.run_id == run_id, RunTenant.tenant_id == tenant_id, RunTenant.status == frm)
                .values(**values)
            )
        )
    )


def finish_run_if_complete(settings: Settings, run_id: str) -> datetime | None:
    """Mark the run completed once every tenant is done; returns the finish time for the one caller."""
    with session_scope(settings) as session:
        open_tenants = session.scalar(
            select(func.count())
            .select_from(RunTenant)
            .where(RunTenant.run_id == run_id, RunTenant.status != "done")
        )
        if open_tenants:
            return None
        now = _now()
        done = rowcount(
            session.execute(
                update(RefreshRun)
                .where(RefreshRun.id == run_id, RefreshRun.status.in_(("running", "sweeping")))
                .values(status="completed", finished_at=now)
            )
        )
        return now if done else None


def last_success(settings: Settings) -> datetime | None:
    with session_scope(settings) as session:
        return session.scalar(
            select(func.max(RefreshRun.finished_at)).where(RefreshRun.status == "completed")
        )


# -- the sweeper -------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    redispatched: int = 0
    stale: int = 0
    summaries_reenqueued: int = 0
    plans_reenqueued: int = 0
    runs_marked_stale: list[str] = field(default_factory=list)
    finished_at: list[datetime] = field(default_factory=list)


def sweep(
    settings: Settings,
    publish: Publish,
    enqueue_summary: EnqueueSummary,
    enqueue_plan: Callable[[str], None],
    enqueue_forecast: Callable[[str, str], None],
    now: datetime | None = None,
) -> SweepReport:
    """Find runs whose tasks were lost (worker killed, broker flushed) and finish them.

    After ``run_deadline_seconds`` the pending items are published again, once (same task ids, so
    anything that did run is not refreshed twice). ``run_grace_seconds`` later, items still pending
    are marked stale and their tenants finalised, so no summary waits forever. A run still open after
    deadline + 3 x grace (its reports could not run either) is marked stale.
    """
    now = now or _now()
    deadline = timedelta(seconds=settings.run_deadline_seconds)
    grace = timedelta(seconds=settings.run_grace_seconds)
    report = SweepReport()
    with session_scope(settings) as session:
        runs = session.execute(
            select(RefreshRun.id, RefreshRun.status, RefreshRun.created_at, RefreshRun.redispatched_at).where(
                RefreshRun.status.in_(("pending", "planning", "running"))
            )
        ).all()
    for run_id, status, created_at, redispatched_at in runs:
        age = now - created_at
        if status in ("pending", "planning") and age > grace:
            # The plan task was lost, or its planner died before the run was running (planning takes
            # seconds): plan again.
            with session_scope(settings) as session:
                session.execute(
                    update(RefreshRun)
                    .where(RefreshRun.id == run_id, RefreshRun.status == status)
                    .values(status="pending")
                )
            enqueue_plan(run_id)
            report.plans_reenqueued += 1
            continue
        if status == "running" and age > deadline:
            if redispatched_at is None:
                report.redispatched += _redispatch(settings, run_id, publish, now)
            elif now - redispatched_at > grace:
                report.stale += _mark_stale(settings, run_id, now)
            # Tenants whose counter reached zero but whose claim or summary/forecast task was lost.
            report.summaries_reenqueued += _resume_reports(
                settings, run_id, now - grace, enqueue_summary, enqueue_forecast
            )
            finished = finish_run_if_complete(settings, run_id)
            if finished is not None:
                report.finished_at.append(finished)
                continue
        if age > deadline + 3 * grace:
            # Even the reports could not finish (no reports worker?): say so, where operators look.
            with session_scope(settings) as session:
                rowcount(
                    session.execute(
                        update(RefreshRun)
                        .where(RefreshRun.id == run_id, RefreshRun.status == status)
                        .values(
                            status="stale",
                            finished_at=now,
                            error="incomplete after the sweeper's last deadline",
                        )
                    )
                )
            report.runs_marked_stale.append(run_id)
            log.error("run %s marked stale", run_id, extra={"run_id": run_id})
    return report


def _redispatch(settings: Settings, run_id: str, publish: Publish, now: datetime) -> int:
    count = 0
    last_key = ""
    while True:
        with session_scope(settings) as session:
            page = session.execute(
                select(RunItem.task_id, RunItem.tenant_id, RunItem.account_id)
                .where(RunItem.run_id == run_id, RunItem.status == "pending", RunItem.account_id > last_key)
                .order_by(RunItem.account_id)
                .limit(settings.plan_batch_size)
            ).all()
        if not page:
            break
        publish(run_id, [(p[0], p[1], p[2]) for p in page])
        count += len(page)
        last_key = page[-1][2]
    with session_scope(settings) as session:
        session.execute(update(RefreshRun).where(RefreshRun.id == run_id).values(redispatched_at=now))
    log.warning("run %s: re-dispatched %d lost refreshes", run_id, count, extra={"run_id": run_id})
    return count


def _mark_stale(settings: Settings, run_id: str, now: datetime) -> int:
    with session_scope(settings) as session:
        per_tenant = dict(
            session.execute(
                select(RunItem.tenant_id, func.count())
                .where(RunItem.run_id == run_id, RunItem.status == "pending")
                .group_by(RunItem.tenant_id)
            ).all()
        )
        if not per_tenant:
            return 0
        session.execute(
            update(RunItem)
            .where(RunItem.run_id == run_id, RunItem.status == "pending")
            .values(status="stale", reason="lost", finished_at=now)
        )
        for tenant_id, n in per_tenant.items():
            session.execute(
                update(RunTenant)
                .where(RunTenant.run_id == run_id, RunTenant.tenant_id == tenant_id)
                .values(remaining=RunTenant.remaining - n, stale=RunTenant.stale + n)
            )
    total = sum(per_tenant.values())
    log.warning("run %s: %d accounts marked stale", run_id, total, extra={"run_id": run_id})
    return total


def _resume_reports(
    settings: Settings,
    run_id: str,
    older_than: datetime,
    enqueue_summary: EnqueueSummary,
    enqueue_forecast: Callable[[str, str], None],
) -> int:
    n = 0
    with session_scope(settings) as session:
        ready = session.scalars(
            select(RunTenant.tenant_id).where(
                RunTenant.run_id == run_id, RunTenant.status == "refreshing", RunTenant.remaining <= 0
            )
        ).all()
        stuck = session.execute(
            select(RunTenant.tenant_id, RunTenant.status).where(
                RunTenant.run_id == run_id,
                RunTenant.status.in_(("summarising", "forecasting")),
                RunTenant.summary_enqueued_at < older_than,
            )
        ).all()
    for tenant_id in ready:
        n += claim_summary_and_enqueue(settings, run_id, tenant_id, enqueue_summary)
    for tenant_id, status in stuck:
        (enqueue_summary if status == "summarising" else enqueue_forecast)(run_id, tenant_id)
        n += 1
    return n


# -- status --------------------------------------------------------------------------------------------


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
        by_status = dict(
            session.execute(
                select(RunItem.status, func.count()).where(RunItem.run_id == run_id).group_by(RunItem.status)
            ).all()
        )
        by_reason = dict(
            session.execute(
                select(RunItem.reason, func.count())
                .where(RunItem.run_id == run_id, RunItem.status == "failed")
                .group_by(RunItem.reason)
            ).all()
        )
        stale = session.execute(
            select(RunItem.tenant_id, RunItem.account_id)
            .where(RunItem.run_id == run_id, RunItem.status == "stale")
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
            "tenants": {"total": run.total_tenants, **{k: v for k, v in tenants.items()}},
            "accounts": {
                "total": run.total_accounts,
                "succeeded": by_status.get("succeeded", 0),
                "failed": by_status.get("failed", 0),
                "stale": by_status.get("stale", 0),
                "pending": by_status.get("pending", 0),
            },
            "failuresByReason": {str(k): v for k, v in by_reason.items()},
            "staleAccounts": [{"tenantId": t, "accountId": a} for t, a in stale],
            "error": run.error,
        }
