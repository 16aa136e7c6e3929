"""The sweeper and planning as plain functions on real PostgreSQL (time passed in, outputs recorded)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.nightly import pipeline
from app.reports import jobs
from app.store import recovery, runs, writes
from app.store.db import session_scope
from app.store.models import RefreshRun, RunItem, RunTenant
from app.store.states import ItemStatus, Trigger
from tests.support.data import seed_tenant


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, str]] = []
        self.summaries: list[tuple[str, str]] = []
        self.plans: list[str] = []
        self.forecasts: list[tuple[str, str]] = []

    def publish(self, run_id: str, items: object) -> None:
        self.published.extend(items)  # type: ignore[arg-type]

    def summary(self, run_id: str, tenant_id: str) -> None:
        self.summaries.append((run_id, tenant_id))

    def sweep(self, settings: Settings, now: datetime) -> pipeline.SweepReport:
        return pipeline.sweep(
            settings,
            self.publish,
            self.summary,
            self.plans.append,
            lambda r, t: self.forecasts.append((r, t)),
            now=now,
        )


def finish_item(session: Session, run_id: str, account_id: str) -> bool:
    """What a refresh's terminal transaction does to its run item and tenant counter."""
    won = writes.claim_items(session, run_id, {account_id: (ItemStatus.SUCCEEDED, None)}, datetime.now(UTC))
    writes.count_down_tenants(session, run_id, won)
    return bool(won)


def test_planning_writes_each_item_once_and_tenants_without_accounts_go_straight_to_summary(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "s-1", accounts=3)
    seed_tenant(settings, sandbox, "s-2", accounts=2)
    with session_scope(settings) as s:
        s.add(
            __import__("app.store.models", fromlist=["Tenant"]).Tenant(
                id="s-empty", name="empty", active=True, created_at=datetime.now(UTC)
            )
        )
    rec = Recorder()
    run_id, created = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    assert created
    assert pipeline.plan_run(settings, run_id, rec.publish, rec.summary) == 5
    assert len(rec.published) == len({p[0] for p in rec.published}) == 5
    assert rec.summaries == [(run_id, "s-empty")]
    # A second delivery of the plan task plans nothing.
    assert pipeline.plan_run(settings, run_id, rec.publish, rec.summary) == 0
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id)) == 5
        counters = dict(
            (t, n)
            for t, n in s.execute(
                select(RunTenant.tenant_id, RunTenant.remaining).where(RunTenant.run_id == run_id)
            )
        )
        assert counters == {"s-1": 3, "s-2": 2, "s-empty": 0}


def test_a_scheduled_tick_seen_twice_is_one_run(settings: Settings) -> None:
    a, created_a = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor="system:scheduler", tick="cron:x"
    )
    b, created_b = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor="system:scheduler", tick="cron:x"
    )
    assert (a, created_a, created_b) == (b, True, False)


def test_a_planner_that_died_is_replanned_without_duplicate_items(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "s-3", accounts=2)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    with session_scope(settings) as s:  # the planner claimed the run, then died
        s.execute(update(RefreshRun).where(RefreshRun.id == run_id).values(status="planning"))
    now = datetime.now(UTC) + timedelta(seconds=settings.run_grace_seconds + 1)
    report = rec.sweep(settings, now)
    assert report.plans_reenqueued == 1 and rec.plans == [run_id]
    assert pipeline.plan_run(settings, run_id, rec.publish, rec.summary) == 2
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id)) == 2


def test_a_stalled_run_is_redriven_within_minutes_then_given_up_at_the_deadline(
    settings: Settings, sandbox: Sandbox
) -> None:
    settings = settings.model_copy(update={"max_redrives": 2})
    seed_tenant(settings, sandbox, "s-4", accounts=2)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    first = list(rec.published)
    rec.published.clear()  # ... and every message was lost

    start = datetime.now(UTC)
    stall = timedelta(seconds=settings.run_stall_seconds)
    assert settings.run_stall_seconds <= 300  # back on track in minutes, not after the 2 h deadline
    early = rec.sweep(settings, start + timedelta(seconds=1))
    assert early.redispatched == 0 and rec.published == []
    stalled = start + stall + timedelta(seconds=1)
    assert rec.sweep(settings, stalled).redispatched == 2
    assert rec.published == first  # same task ids: anything that did run is not refreshed twice
    assert rec.sweep(settings, stalled + timedelta(seconds=1)).redispatched == 0  # a re-drive is progress
    assert rec.sweep(settings, stalled + stall + timedelta(seconds=2)).redispatched == 2
    assert rec.sweep(settings, stalled + 2 * stall + timedelta(seconds=3)).redispatched == 0  # bounded

    after_deadline = start + timedelta(seconds=settings.run_deadline_seconds + 1)
    report = rec.sweep(settings, after_deadline)
    assert report.stale == 2
    assert rec.summaries == [(run_id, "s-4")]
    assert jobs.summarize_tenant(settings, run_id, "s-4")
    assert not jobs.summarize_tenant(settings, run_id, "s-4")  # exactly once
    assert jobs.forecast_tenant(settings, run_id, "s-4")
    assert runs.finish_if_complete(settings, run_id) is not None
    status = runs.run_status(settings, run_id)
    assert status is not None and status["status"] == "completed"
    assert status["accounts"]["stale"] == 2 and len(status["staleAccounts"]) == 2


def test_marking_items_stale_never_counts_an_item_a_refresh_finished_meanwhile(
    settings: Settings, sandbox: Sandbox
) -> None:
    """The old sweeper counted pending items, updated them, then subtracted the count: an item whose
    refresh committed in between was subtracted twice and ``remaining`` went negative."""
    import threading

    from app.store.db import session_factory

    t = seed_tenant(settings, sandbox, "s-race", accounts=2)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    refresh = session_factory(settings)()
    refresh.begin()
    assert finish_item(refresh, run_id, t.account_ids[0])  # not committed
    marked: list[int] = []
    sweeper = threading.Thread(
        target=lambda: marked.append(recovery.mark_items_stale(settings, run_id, datetime.now(UTC)))
    )
    sweeper.start()
    sweeper.join(1.0)
    assert sweeper.is_alive()  # waiting for the refresh's row lock
    refresh.commit()
    refresh.close()
    sweeper.join(10)
    assert marked == [1]
    with session_scope(settings) as s:
        remaining, stale = s.execute(
            select(RunTenant.remaining, RunTenant.stale).where(
                RunTenant.run_id == run_id, RunTenant.tenant_id == "s-race"
            )
        ).one()
    assert (remaining, stale) == (0, 1)


def test_a_lost_summary_is_resent_a_bounded_number_of_times(settings: Settings, sandbox: Sandbox) -> None:
    settings = settings.model_copy(update={"max_redrives": 2})
    with session_scope(settings) as s:
        s.add(
            __import__("app.store.models", fromlist=["Tenant"]).Tenant(
                id="s-lost", name="no accounts", active=True, created_at=datetime.now(UTC)
            )
        )
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    assert rec.summaries == [(run_id, "s-lost")]  # ... and that message was lost, every time
    stall = timedelta(seconds=settings.run_stall_seconds + 1)
    now = datetime.now(UTC)
    for i in range(1, 5):
        rec.sweep(settings, now + i * stall)
    assert rec.summaries == [(run_id, "s-lost")] * 3  # the first send, then 2 re-sends, no more


def test_a_lost_plan_is_sent_again_a_bounded_number_of_times(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_redrives": 2})
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")  # plan message lost
    stall = timedelta(seconds=settings.run_stall_seconds + 1)
    now = datetime.now(UTC)
    for i in range(1, 6):
        rec.sweep(settings, now + i * stall)
    assert rec.plans == [run_id, run_id]


def test_a_run_that_keeps_progressing_is_never_given_up(settings: Settings, sandbox: Sandbox) -> None:

    t = seed_tenant(settings, sandbox, "s-long", accounts=3)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    long_after = datetime.now(UTC) + timedelta(seconds=settings.run_deadline_seconds * 2)
    with session_scope(settings) as s:  # a slow but healthy run: an item finished a minute ago
        finish_item(s, run_id, t.account_ids[0])
        s.execute(
            update(RunItem)
            .where(RunItem.run_id == run_id, RunItem.account_id == t.account_ids[0])
            .values(finished_at=long_after - timedelta(minutes=1))
        )
    report = rec.sweep(settings, long_after)
    assert report.stale == 0 and report.runs_marked_stale == []
    assert runs.run_status(settings, run_id)["accounts"]["pending"] == 2  # type: ignore[index]


def test_a_stalled_run_whose_refreshes_are_all_still_queued_is_not_redriven(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "s-queued", accounts=2)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    rec.published.clear()
    stalled = datetime.now(UTC) + timedelta(seconds=settings.run_stall_seconds + 1)
    waiting = pipeline.sweep(
        settings, rec.publish, rec.summary, rec.plans.append, lambda r, t: None, now=stalled, queued=lambda: 2
    )
    assert waiting.redispatched == 0 and rec.published == []  # every worker down: nothing to re-send
    lost = pipeline.sweep(
        settings, rec.publish, rec.summary, rec.plans.append, lambda r, t: None, now=stalled, queued=lambda: 0
    )
    assert lost.redispatched == 2


def test_a_broker_that_lost_its_messages_gets_the_run_again_at_once_not_after_the_stall_window(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "s-lost", accounts=2)
    seed_tenant(settings, sandbox, "s-lost-done", accounts=1)
    rec = Recorder()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, rec.publish, rec.summary)
    done = next(i.account_id for i in rec.published if i.tenant_id == "s-lost-done")  # type: ignore[attr-defined]
    with session_scope(settings) as s:  # one tenant's refresh finished; its summary message is sent
        assert finish_item(s, run_id, done)
    assert runs.claim_summary(settings, run_id, "s-lost-done")
    rec.published.clear()
    soon = datetime.now(UTC) + timedelta(seconds=1)  # well inside the stall window

    def sweep(lost: bool) -> pipeline.SweepReport:
        return pipeline.sweep(
            settings,
            rec.publish,
            rec.summary,
            rec.plans.append,
            lambda r, t: None,
            now=soon,
            queued=lambda: 10,  # depth is no evidence after a loss: what was queued is gone
            lost_messages=lost,
        )

    quiet = sweep(lost=False)
    assert (quiet.redispatched, quiet.summaries_reenqueued, rec.published) == (0, 0, [])
    lost = sweep(lost=True)
    assert lost.redispatched == 2 and {i[1] for i in rec.published} == {"s-lost"}
    assert lost.summaries_reenqueued == 1 and rec.summaries[-1] == (run_id, "s-lost-done")


def test_a_nightly_tick_is_keyed_by_the_beats_clock_not_the_workers(settings: Settings) -> None:
    from app.store.models import RefreshRun
    from app.worker import tasks

    use = settings.model_copy(update={"nightly_cron": "0 4 * * *", "timezone": "Europe/Paris"})
    from app.config import use_settings

    use_settings(use)
    # The beat fired 04:00:00.05 Paris; a worker whose clock is behind would have seen 03:59:59.
    run_id = tasks.start_nightly_run.run(fired_at="2026-11-24T03:00:00.050000+00:00")
    again = tasks.start_nightly_run.run(fired_at="2026-11-24T03:07:00+00:00")  # a redelivery, later
    with session_scope(settings) as s:
        run = s.get(RefreshRun, run_id)
        assert run is not None and run.tick == "cron:2026-11-24T04:00"
        assert str(run.business_day) == "2026-11-24"
    assert again == run_id
