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
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple

from app.config import Settings
from app.schedule import previous_fire
from app.store import planning, recovery, run_reports, runs
from app.store.states import RunStatus, TenantStatus, Trigger

log = logging.getLogger(__name__)

# publish(run_id, items) sends refresh tasks for [(task_id, tenant_id, account_id)] in one connection.
Publish = Callable[[str, Sequence[runs.Item]], None]
# enqueue(run_id, tenant_id) sends the tenant's summary (or forecast) task.
EnqueueReport = Callable[[str, str], None]
# A finished run's report (the notification hook) is re-sent at most this long after the run ended.
REPORT_RESEND_HORIZON = timedelta(days=1)


def schedule_slot(settings: Settings, now: datetime | None = None) -> tuple[str, date]:
    """The key and business day of the scheduled run due at ``now``: the latest slot of the schedule
    at or before ``now`` — never the moment a worker happens to execute the task, so a redelivered
    tick or a standby beat firing the same slot later makes the same run."""
    now = now or datetime.now(UTC)
    if settings.nightly_interval_seconds:
        slot = int(now.timestamp()) // settings.nightly_interval_seconds
        return f"every{settings.nightly_interval_seconds}s:{slot}", settings.business_day(now)
    at = previous_fire(settings.nightly_cron, now.astimezone(settings.business_zone))
    return "cron:" + at.strftime("%Y-%m-%dT%H:%M"), at.date()


def start_run(
    settings: Settings,
    *,
    trigger: Trigger,
    actor: str,
    tick: str | None = None,
    business_day: date | None = None,
) -> tuple[str, bool]:
    """Create the run row. A scheduled slot already seen returns the existing run (created=False)."""
    return runs.create_run(settings, trigger=trigger, actor=actor, tick=tick, business_day=business_day)


class Step(NamedTuple):
    """A planning step as a message carries it: the cursor it plans from, the planner it belongs to."""

    after: planning.Cursor | None
    generation: int


# enqueue_step(run_id, step, countdown) sends the run's next planning step (countdown: seconds to wait
# first, or None).
EnqueueStep = Callable[[str, Step, float | None], None]
# Summaries one planning step claims and sends at most (tenants passed, or every tenant at the end):
# a step stays short; the next step, or the sweeper, takes the rest.
READY_PER_STEP = 500
READY_PER_SWEEP = 5000


def begin_planning(settings: Settings, run_id: str, enqueue_step: EnqueueStep) -> bool:
    """Claim a pending run for planning (a fresh one, or one whose planner died: it resumes where its
    cursor stands), give every active tenant its counter, and send the first step."""
    generation = planning.claim(settings, run_id)
    if generation is None:
        log.info("run %s is not pending; planning skipped", run_id, extra={"run_id": run_id})
        return False
    tenants = planning.open_tenants(settings, run_id)
    st = planning.state(settings, run_id)
    enqueue_step(run_id, Step(st.cursor if st else None, generation), None)
    log.info(
        "run %s planning (%d tenants, generation %d)", run_id, tenants, generation, extra={"run_id": run_id}
    )
    return True


def plan_step(
    settings: Settings,
    run_id: str,
    step: Step,
    *,
    publish: Publish,
    enqueue_step: EnqueueStep,
    enqueue_summary: EnqueueReport,
    queued: Callable[[], int],
) -> bool:
    """One bounded step of planning ``run_id``: publish a page a step before wrote but did not publish,
    or wait (renewing the lease) while the refresh queue already holds ``plan_queue_accounts``, or
    write and publish the next page and send the summaries of the tenants it left behind whole; the
    last step moves the run to running. Returns whether another step was sent. A step that is not the
    run's planner's any more (a duplicate delivery, a superseded planner) does nothing."""
    st = planning.state(settings, run_id)
    if st is None or st.status is not RunStatus.PLANNING or (st.cursor, st.generation) != step:
        log.info("planning step of run %s superseded; nothing done", run_id, extra={"run_id": run_id})
        return False
    more = True
    try:
        if st.cursor is not None and st.published != st.cursor:
            publish(run_id, planning.unpublished(settings, run_id, st.published, st.cursor))
            planning.mark_published(settings, run_id, step.generation, st.cursor)
        if queued() * settings.refresh_batch_accounts >= settings.plan_queue_accounts:
            # Backpressure: the broker holds minutes of work, not the night; the planner stays alive.
            if not planning.hold(settings, run_id, step.generation):
                return False
            enqueue_step(run_id, step, settings.plan_wait_seconds)
            return True
        page = planning.write_page(settings, run_id, step.generation, step.after)
        if page is not None:
            publish(run_id, page.items)
            planning.mark_published(settings, run_id, step.generation, page.upto)
            enqueue_step(run_id, Step(page.upto, step.generation), None)
        else:
            planning.finish(settings, run_id, step.generation, step.after)
            more = False
            log.info("run %s planned: %d accounts", run_id, st.planned, extra={"run_id": run_id})
    except planning.Superseded:
        log.info("planning step of run %s superseded; nothing done", run_id, extra={"run_id": run_id})
        return False
    send_ready(settings, run_id, enqueue_summary, READY_PER_STEP)
    return more


def send_ready(settings: Settings, run_id: str, enqueue_summary: EnqueueReport, limit: int) -> int:
    """Claim (one statement) and send the summaries of up to ``limit`` tenants that are ready."""
    ready = runs.claim_ready(settings, run_id, limit)
    for tenant_id in ready:
        enqueue_summary(run_id, tenant_id)
    return len(ready)


def plan_run(
    settings: Settings,
    run_id: str,
    publish: Publish,
    enqueue_summary: EnqueueReport,
    queued: Callable[[], int] = lambda: 0,
) -> int:
    """The whole plan in this process, one step after the other: the steps the workers run, without a
    broker between them (the benchmark's planning measurement; tests). Returns the accounts planned
    (0: the run was not pending)."""
    steps: list[Step] = []

    def enqueue_step(_run: str, step: Step, _countdown: float | None) -> None:
        steps.append(step)

    if not begin_planning(settings, run_id, enqueue_step):
        return 0
    while steps:
        plan_step(
            settings,
            run_id,
            steps.pop(),
            publish=publish,
            enqueue_step=enqueue_step,
            enqueue_summary=enqueue_summary,
            queued=queued,
        )
    st = planning.state(settings, run_id)
    return st.planned if st else 0


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
    run_reports_sent: int = 0
    runs_marked_stale: list[str] = field(default_factory=list)
    finished_at: list[datetime] = field(default_factory=list)


def sweep(
    settings: Settings,
    publish: Publish,
    enqueue_summary: EnqueueReport,
    enqueue_plan: Callable[[str], None],
    enqueue_forecast: EnqueueReport,
    now: datetime | None = None,
    queued: Callable[[], int] | None = None,
    lost_messages: bool = False,
    enqueue_report: Callable[[str], None] | None = None,
) -> SweepReport:
    """Put runs whose tasks were lost (worker killed, broker restarted) back on track, in minutes.

    A run that has made no progress for ``run_stall_seconds`` is re-driven: a lost plan is sent again;
    a running run's pending items are published again under their own task ids (whatever did run is
    not refreshed twice: its audit row answers the replay), at most ``max_redrives`` times — unless
    ``queued()`` (the refresh queue's depth) shows they are all still waiting there, as when every
    worker is down. A tenant whose summary or forecast message was lost gets it again (bounded).
    ``run_deadline_seconds`` without any progress is the last resort: the items still pending are
    marked stale and their tenants finalised, so no summary waits forever; a run still open
    ``3 x run_grace_seconds`` later is marked stale. A run that keeps progressing is never given up.

    ``lost_messages`` (the broker restarted empty: ``app.worker.liveness.broker_lost_messages``) means
    every queued message is gone: each open run is re-planned, re-driven and its reports re-sent at
    once, without waiting for the stall window (still counted against ``max_redrives``).

    ``enqueue_report`` (given when a notification hook is configured) sends a finished run's report:
    for each run this sweep finishes or gives up, and again for a run finished within
    ``REPORT_RESEND_HORIZON`` whose report message was lost (``run_reports.claim_resends``: claimed,
    bounded by ``max_redrives``; a report that is delivering or ended is never sent twice).
    """
    now = now or datetime.now(UTC)
    stall = timedelta(seconds=settings.run_stall_seconds)
    deadline = timedelta(seconds=settings.run_deadline_seconds)
    grace = timedelta(seconds=settings.run_grace_seconds)
    batch = settings.refresh_batch_accounts  # the accounts one queued refresh message carries, at most
    report = SweepReport()
    for run in recovery.open_runs(settings):
        idle = now - run.last_progress
        stalled = lost_messages or now - run.last_activity > stall
        if run.status in (RunStatus.PENDING, RunStatus.PLANNING):
            # The plan message was lost, or the planner died before the run was running. A planner
            # whose lease is still running is alive (a slow step, or waiting for the queue to drain):
            # left alone, unless the broker lost every message (its next step with them).
            alive = (
                not lost_messages and run.planner_lease_until is not None and run.planner_lease_until > now
            )
            # A re-plan counts against max_redrives only when the run made no progress since the last:
            # planning a night of 10 M accounts may lose a planner more than ten times and still move.
            progressed = run.redriven_at is None or run.last_progress > run.redriven_at
            if (
                stalled
                and not alive
                and (progressed or run.replans < settings.max_redrives)
                and recovery.replan(settings, run, now, force=lost_messages)
            ):
                enqueue_plan(run.id)
                report.plans_reenqueued += 1
                if lost_messages and run.status is RunStatus.PLANNING:
                    # What the planner had published went with the broker: published again now, not
                    # when planning ends and the stall window has passed (hours at 10 M accounts).
                    report.redispatched += _redrive(settings, run.id, publish)
            elif run.status is RunStatus.PLANNING and idle > deadline and not alive:
                # Planning cannot be finished: the run goes on with what was planned, so its accounts
                # are refreshed or given up and its tenants summarised (the sweeps that follow).
                if planning.abandon(settings, run.id, run.planned):
                    log.error("run %s: planning abandoned", run.id, extra={"run_id": run.id})
                continue
            sent_before = now if lost_messages else now - stall  # summaries sent while planning, lost
            report.summaries_reenqueued += _resume_reports(
                settings, run.id, sent_before, now, enqueue_summary, enqueue_forecast
            )
        elif run.status is RunStatus.RUNNING:
            if idle > deadline:
                report.stale += recovery.mark_items_stale(settings, run.id, now)
            elif run.pending and stalled and run.redrives < settings.max_redrives:
                waiting = queued is not None and not lost_messages and queued() * batch >= run.pending
                if waiting:
                    log.warning("run %s stalled with its refreshes still queued: no worker?", run.id)
                elif recovery.claim_redrive(settings, run, now):
                    report.redispatched += _redrive(settings, run.id, publish)
            sent_before = now if lost_messages else now - stall
            report.summaries_reenqueued += _resume_reports(
                settings, run.id, sent_before, now, enqueue_summary, enqueue_forecast
            )
            finished = runs.finish_if_complete(settings, run.id)
            if finished is not None:
                report.finished_at.append(finished)
                if enqueue_report is not None:
                    enqueue_report(run.id)
                continue
        # Even the reports could not finish (no reports worker?): say so, where operators look.
        if idle > deadline + 3 * grace and recovery.give_up(
            settings, run.id, run.status, now, "no progress until the last deadline"
        ):
            report.runs_marked_stale.append(run.id)
            log.error("run %s marked stale", run.id, extra={"run_id": run.id})
            if enqueue_report is not None:
                enqueue_report(run.id)
    if enqueue_report is not None:
        for run_id in run_reports.claim_resends(
            settings,
            now,
            finished_since=now - REPORT_RESEND_HORIZON,
            unclaimed_before=now if lost_messages else now - stall,
            max_resends=settings.max_redrives,
            lease_until=now + stall,
        ):
            log.warning("run %s: its report message was lost; sent again", run_id, extra={"run_id": run_id})
            enqueue_report(run_id)
            report.run_reports_sent += 1
    return report


def _redrive(settings: Settings, run_id: str, publish: Publish) -> int:
    count = publish_items(settings, run_id, publish, pending_only=True)
    log.warning("run %s stalled: re-published %d pending refreshes", run_id, count, extra={"run_id": run_id})
    return count


def _resume_reports(
    settings: Settings,
    run_id: str,
    sent_before: datetime,
    now: datetime,
    enqueue_summary: EnqueueReport,
    enqueue_forecast: EnqueueReport,
) -> int:
    n = 0
    for tenant_id, status in recovery.claim_resends(
        settings, run_id, sent_before, now, settings.max_redrives
    ):
        (enqueue_summary if status is TenantStatus.SUMMARISING else enqueue_forecast)(run_id, tenant_id)
        n += 1
    return n + send_ready(settings, run_id, enqueue_summary, READY_PER_SWEEP)
