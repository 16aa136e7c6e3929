"""The nightly pipeline's orchestration: starting a run, planning and fan-out in batches, sweeping.

The run's state and every move of it live in ``app.store.runs``; this module decides *when* to move
and what to publish. Functions here take callbacks (``publish``, ``enqueue_summary``, ...) instead
of importing Celery: the tasks own the broker, and these functions are tested as plain code.
See docs/design.md "The nightly pipeline".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from app.config import Settings
from app.store import runs
from app.store.states import RunStatus, TenantStatus, Trigger

log = logging.getLogger(__name__)

# publish(run_id, items) sends refresh tasks for [(task_id, tenant_id, account_id)] in one connection.
Publish = Callable[[str, Sequence[runs.Item]], None]
# enqueue(run_id, tenant_id) sends the tenant's summary (or forecast) task.
EnqueueReport = Callable[[str, str], None]


def current_tick(settings: Settings, now: datetime | None = None) -> str:
    """The key of a scheduled run: the cron minute, or the interval slot when an interval is set."""
    now = now or datetime.now(UTC)
    if settings.nightly_interval_seconds:
        slot = int(now.timestamp()) // settings.nightly_interval_seconds
        return f"every{settings.nightly_interval_seconds}s:{slot}"
    return "cron:" + now.strftime("%Y-%m-%dT%H:%M")


def start_run(
    settings: Settings, *, trigger: Trigger, actor: str, tick: str | None = None
) -> tuple[str, bool]:
    """Create the run row. A scheduled tick already seen returns the existing run (created=False)."""
    return runs.create_run(settings, trigger=trigger, actor=actor, tick=tick)


def plan_run(settings: Settings, run_id: str, publish: Publish, enqueue_summary: EnqueueReport) -> int:
    """Enumerate active accounts per active tenant and fan out one refresh per account.

    Three passes, none holding every account in memory: the database writes the run items
    (INSERT ... SELECT), per-tenant counters are derived from them, then the items are published in
    batches of ``plan_batch_size`` (one fan-out message per batch; workers publish its refreshes).
    Publishing comes last, so an early finisher always finds its tenant's counter. Returns the number
    of accounts planned.
    """
    if not runs.claim_planning(settings, run_id):
        log.info("run %s is not pending; planning skipped", run_id, extra={"run_id": run_id})
        return 0
    runs.write_items(settings, run_id)
    total, empty_tenants = runs.open_tenants(settings, run_id)
    publish_items(settings, run_id, publish, pending_only=False)
    for tenant_id in empty_tenants:
        claim_summary_and_enqueue(settings, run_id, tenant_id, enqueue_summary)
    log.info("run %s planned: %d accounts", run_id, total, extra={"run_id": run_id})
    return total


def publish_items(settings: Settings, run_id: str, publish: Publish, *, pending_only: bool) -> int:
    """Publish the run's items page by page, from the items table (the source of truth)."""
    count = 0
    for page in runs.item_pages(settings, run_id, settings.plan_batch_size, pending_only=pending_only):
        publish(run_id, page)
        count += len(page)
    return count


def claim_summary_and_enqueue(
    settings: Settings, run_id: str, tenant_id: str, enqueue: EnqueueReport
) -> bool:
    """The last refresh of a tenant to finish moves it on to its summary (one winner, in the DB)."""
    if runs.claim_summary(settings, run_id, tenant_id):
        enqueue(run_id, tenant_id)
        return True
    return False


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
    enqueue_summary: EnqueueReport,
    enqueue_plan: Callable[[str], None],
    enqueue_forecast: EnqueueReport,
    now: datetime | None = None,
) -> SweepReport:
    """Find runs whose tasks were lost (worker killed, broker flushed) and finish them.

    After ``run_deadline_seconds`` the pending items are published again, once (same task ids, so
    anything that did run is not refreshed twice). ``run_grace_seconds`` later, items still pending
    are marked stale and their tenants finalised, so no summary waits forever. A run still open after
    deadline + 3 x grace (its reports could not run either) is marked stale.
    """
    now = now or datetime.now(UTC)
    deadline = timedelta(seconds=settings.run_deadline_seconds)
    grace = timedelta(seconds=settings.run_grace_seconds)
    report = SweepReport()
    for run_id, status, created_at, redispatched_at in runs.open_runs(settings):
        age = now - created_at
        if status in (RunStatus.PENDING, RunStatus.PLANNING) and age > grace:
            # The plan task was lost, or its planner died before the run was running (planning takes
            # seconds): plan again.
            if runs.replan(settings, run_id, status):
                enqueue_plan(run_id)
                report.plans_reenqueued += 1
            continue
        if status is RunStatus.RUNNING and age > deadline:
            if redispatched_at is None:
                report.redispatched += _redispatch(settings, run_id, publish, now)
            elif now - redispatched_at > grace:
                report.stale += runs.mark_items_stale(settings, run_id, now)
            # Tenants whose counter reached zero but whose claim or summary/forecast task was lost.
            report.summaries_reenqueued += _resume_reports(
                settings, run_id, now - grace, enqueue_summary, enqueue_forecast
            )
            finished = runs.finish_if_complete(settings, run_id)
            if finished is not None:
                report.finished_at.append(finished)
                continue
        if age > deadline + 3 * grace:
            # Even the reports could not finish (no reports worker?): say so, where operators look.
            runs.give_up(settings, run_id, status, now, "incomplete after the sweeper's last deadline")
            report.runs_marked_stale.append(run_id)
            log.error("run %s marked stale", run_id, extra={"run_id": run_id})
    return report


def _redispatch(settings: Settings, run_id: str, publish: Publish, now: datetime) -> int:
    count = publish_items(settings, run_id, publish, pending_only=True)
    runs.mark_redispatched(settings, run_id, now)
    log.warning("run %s: re-dispatched %d lost refreshes", run_id, count, extra={"run_id": run_id})
    return count


def _resume_reports(
    settings: Settings,
    run_id: str,
    older_than: datetime,
    enqueue_summary: EnqueueReport,
    enqueue_forecast: EnqueueReport,
) -> int:
    n = 0
    ready, stuck = runs.tenants_to_resume(settings, run_id, older_than)
    for tenant_id in ready:
        n += claim_summary_and_enqueue(settings, run_id, tenant_id, enqueue_summary)
    for tenant_id, status in stuck:
        (enqueue_summary if status is TenantStatus.SUMMARISING else enqueue_forecast)(run_id, tenant_id)
        n += 1
    return n
