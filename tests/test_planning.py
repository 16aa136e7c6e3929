"""Planning that scales out: a nightly run is planned in short, bounded steps (a page of accounts each,
each a task well inside its own time limit, each idempotent), so no planner outgrows its time limit
however many accounts there are; the sweeper tells a live planner (its lease renewed by every step)
from a dead one, and resumes a dead one where it stopped instead of starting over."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.nightly import pipeline
from app.store import runs
from app.store.db import get_engine, session_scope
from app.store.models import RefreshRun, RunItem, TenantSummary
from app.store.states import RunStatus, Trigger
from tests.support.data import seed_tenant
from tests.support.polling import wait_until
from tests.support.processes import log_tail, run_cli, run_worker, service_env

SLOW_ITEMS = """
CREATE OR REPLACE FUNCTION test_slow_run_item() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
CREATE TRIGGER test_slow_run_items BEFORE INSERT ON run_items FOR EACH ROW
EXECUTE FUNCTION test_slow_run_item();
"""


@pytest.fixture
def slow_items(settings: Settings) -> Iterator[None]:
    """Every run item row costs PostgreSQL 1 ms to write: 2,000 accounts then take as long to plan as
    about 80,000 do on a fast database (24 µs each, measured) — the planner's clock scaled down."""
    with get_engine(settings).begin() as conn:
        conn.execute(text(SLOW_ITEMS))
    yield
    with get_engine(settings).begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS test_slow_run_items ON run_items"))
        conn.execute(text("DROP FUNCTION IF EXISTS test_slow_run_item()"))


@pytest.mark.e2e
def test_a_run_too_big_to_plan_within_one_time_limit_is_planned_in_steps_and_completes(
    settings: Settings, sandbox: Sandbox, tmp_path: Path, slow_items: None
) -> None:
    """Planning as one task wrote every item in one statement: past its time limit the soft limit broke
    the query, the run stayed `planning` and every re-plan was killed the same way (reproduced: 2,000
    items at 1 ms each against a 1 s soft limit). In steps of a page each it completes."""
    for n in range(2):
        seed_tenant(settings, sandbox, f"big-{n}", users=25, accounts=40)  # 2,000 accounts in all
    env = service_env(
        settings.database_url,
        settings.celery_broker_url,
        sandbox,
        # The time limits scaled down with the clock: every task, planning included, 1 s soft, 2 s hard.
        BALANCES_TASK_SOFT_TIME_LIMIT="1",
        BALANCES_TASK_TIME_LIMIT="2",
        BALANCES_PLAN_SOFT_TIME_LIMIT="1",
        BALANCES_PLAN_TIME_LIMIT="2",
        BALANCES_PLAN_PAGE_ACCOUNTS="200",  # a step writes 200 items: 0.2 s at 1 ms each
    )
    log = tmp_path / "worker.log"
    with run_worker(env, log):
        started = run_cli(env, "--as", "alice", "run", "nightly", "--no-wait", "--json")
        assert started.returncode == 0, started.stderr
        run_id = json.loads(started.stdout)["runId"]

        def done() -> bool:
            status = runs.run_status(settings, run_id)
            return status is not None and not RunStatus(status["status"]).open

        try:
            wait_until(done, "the run to finish", 180)
        except AssertionError:
            raise AssertionError(str(runs.run_status(settings, run_id)) + log_tail(log)) from None
    status = runs.run_status(settings, run_id)
    assert status is not None and status["status"] == RunStatus.COMPLETED, status
    assert status["accounts"]["total"] == 2000 and status["accounts"]["succeeded"] == 2000
    with session_scope(settings) as s:
        assert (
            s.scalar(select(func.count()).select_from(TenantSummary).where(TenantSummary.run_id == run_id))
            == 2
        )


def test_a_live_planner_is_not_replanned_and_a_dead_one_resumes_where_it_stopped(
    settings: Settings, sandbox: Sandbox
) -> None:
    """The sweeper used to re-plan a run `planning` for longer than the stall window, whether its
    planner was alive or not (a planner slower than 300 s was cancelled and restarted every time)."""
    seed_tenant(settings, sandbox, "lease", users=3, accounts=4)
    quick = settings.model_copy(update={"run_stall_seconds": 1.0, "plan_page_accounts": 4})
    run_id, _ = runs.create_run(quick, trigger=Trigger.ON_DEMAND, actor="alice")
    published: list[list[runs.Item]] = []
    steps: list[pipeline.Step] = []

    def step() -> bool:
        return pipeline.plan_step(
            quick,
            run_id,
            steps.pop(),
            publish=lambda _r, items: published.append(list(items)),
            enqueue_step=lambda _r, next_step, _c: steps.append(next_step),
            enqueue_summary=lambda *_: None,
            queued=lambda: 0,
        )

    assert pipeline.begin_planning(quick, run_id, lambda _r, first, _c: steps.append(first))
    assert steps == [pipeline.Step(None, 0)]
    assert step()  # one page of three: one Powens user's 4 accounts written and published
    assert len(published) == 1 and len(published[0]) == 4 and len(steps) == 1
    replans: list[str] = []

    def sweep(at: datetime) -> pipeline.SweepReport:
        return pipeline.sweep(
            quick, lambda *_: None, lambda *_: None, replans.append, lambda *_: None, now=at
        )

    now = datetime.now(UTC)
    # Past the stall window, within the planner's lease: alive (a slow step, or waiting), left alone.
    assert sweep(now + timedelta(seconds=5)).plans_reenqueued == 0
    # Its lease ran out with no step renewing it: the planner died (its next message lost).
    assert sweep(now + timedelta(seconds=quick.plan_lease_seconds + 5)).plans_reenqueued == 1
    assert replans == [run_id]
    with session_scope(quick) as s:
        run = s.get(RefreshRun, run_id)
        assert run is not None and run.status == RunStatus.PENDING
        kept = s.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id))
    assert kept == 4  # what the dead planner wrote and published stays
    late = steps.pop()  # the dead planner's own next step, delivered late...
    steps.clear()
    assert pipeline.begin_planning(quick, run_id, lambda _r, first, _c: steps.append(first))
    assert steps == [pipeline.Step(late.after, 1)]  # the new planner resumes from the cursor
    steps.append(late)
    assert not step()  # ...superseded by the re-plan (generation 0 of 1): does nothing
    assert len(published) == 1
    while steps:
        step()
    with session_scope(quick) as s:
        run = s.get(RefreshRun, run_id)
        assert run is not None and run.status == RunStatus.RUNNING and run.total_accounts == 12
        items = s.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id))
    assert items == 12 and [len(p) for p in published] == [4, 4, 4]  # resumed: each page once


def test_the_fan_out_waits_while_the_refresh_queue_holds_its_budget(
    settings: Settings, sandbox: Sandbox
) -> None:
    """Backpressure: a step that finds the refresh queue already holding ``plan_queue_accounts`` writes
    nothing, renews its lease and comes back ``plan_wait_seconds`` later; the broker holds minutes of
    work, not the night."""
    seed_tenant(settings, sandbox, "waves", users=2, accounts=3)
    s = settings.model_copy(update={"plan_page_accounts": 3, "plan_queue_accounts": 100})
    run_id, _ = runs.create_run(s, trigger=Trigger.ON_DEMAND, actor="alice")
    sent: list[tuple[pipeline.Step, float | None]] = []
    pipeline.begin_planning(s, run_id, lambda _r, first, countdown: sent.append((first, countdown)))
    depth = [s.plan_queue_accounts // s.refresh_batch_accounts]  # messages: the budget, exactly
    published: list[runs.Item] = []

    def step() -> bool:
        next_step, _ = sent[-1]
        return pipeline.plan_step(
            s,
            run_id,
            next_step,
            publish=lambda _r, items: published.extend(items),
            enqueue_step=lambda _r, a, c: sent.append((a, c)),
            enqueue_summary=lambda *_: None,
            queued=lambda: depth[0],
        )

    assert step()
    assert sent[-1] == (pipeline.Step(None, 0), s.plan_wait_seconds) and published == []  # waited
    with session_scope(s) as db:
        run = db.get(RefreshRun, run_id)
        assert run is not None and run.planner_lease_until is not None
        assert run.planner_lease_until > datetime.now(UTC) + timedelta(seconds=s.plan_lease_seconds - 60)
        assert db.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id)) == 0
    depth[0] -= 1  # workers took one message
    assert step() and len(published) == 3 and sent[-1][1] is None


def test_a_tenant_is_summarised_once_its_whole_plan_is_written_during_planning(
    settings: Settings, sandbox: Sandbox
) -> None:
    """Pages go in tenant order. A page may end in the middle of a tenant, whose first refreshes may
    all finish before its next page: its summary waits until the planner is past it — then it is sent
    during planning, not in one burst after the last page."""
    seed_tenant(settings, sandbox, "a-split", users=2, accounts=2)  # two pages of one user each
    seed_tenant(settings, sandbox, "b-next", users=1, accounts=2)  # a third page
    s = settings.model_copy(update={"plan_page_accounts": 2})
    run_id, _ = runs.create_run(s, trigger=Trigger.ON_DEMAND, actor="alice")
    sent: list[pipeline.Step] = []
    summaries: list[str] = []
    pipeline.begin_planning(s, run_id, lambda _r, first, _c: sent.append(first))

    def step() -> bool:
        return pipeline.plan_step(
            s,
            run_id,
            sent.pop(),
            publish=lambda *_: None,
            enqueue_step=lambda _r, a, _c: sent.append(a),
            enqueue_summary=lambda _r, tenant: summaries.append(tenant),
            queued=lambda: 0,
        )

    def refreshed(tenant: str) -> None:  # its refreshes so far all ended
        with session_scope(s) as db:
            db.execute(
                text("UPDATE run_tenants SET remaining = 0 WHERE run_id = :r AND tenant_id = :t"),
                {"r": run_id, "t": tenant},
            )

    assert step()  # a-split's first user
    refreshed("a-split")
    assert not runs.claim_summary(s, run_id, "a-split")  # not yet: more of it may come
    assert step()  # a-split's second user: its counter is 2 again
    assert summaries == []
    refreshed("a-split")
    assert not runs.claim_summary(s, run_id, "a-split")  # the cursor is still in a-split
    assert step()  # b-next's page: the planner is past a-split, whose summary goes now
    assert summaries == ["a-split"]
    with session_scope(s) as db:
        assert db.get(RefreshRun, run_id).status == RunStatus.PLANNING  # type: ignore[union-attr]
    assert not step()  # nothing left: the run is running
    assert summaries == ["a-split"]  # b-next still has 2 accounts to refresh
    refreshed("b-next")
    assert runs.claim_summary(s, run_id, "b-next")


def _planning_run(settings: Settings, sandbox: Sandbox, **knobs: object) -> tuple[Settings, str]:
    seed_tenant(settings, sandbox, "sweep-plan", users=2, accounts=2)
    s = settings.model_copy(update={"plan_page_accounts": 2, "run_stall_seconds": 1.0, **knobs})
    run_id, _ = runs.create_run(s, trigger=Trigger.ON_DEMAND, actor="alice")
    first: list[pipeline.Step] = []
    pipeline.begin_planning(s, run_id, lambda _r, step, _c: first.append(step))
    pipeline.plan_step(  # one page written and published; the next step's message then lost
        s,
        run_id,
        first[0],
        publish=lambda *_: None,
        enqueue_step=lambda *_: None,
        enqueue_summary=lambda *_: None,
        queued=lambda: 0,
    )
    return s, run_id


def _sweep(s: Settings, at: datetime, *, lost: bool = False) -> tuple[pipeline.SweepReport, list[str], int]:
    replans: list[str] = []
    published: list[runs.Item] = []
    report = pipeline.sweep(
        s,
        lambda _r, items: published.extend(items),
        lambda *_: None,
        replans.append,
        lambda *_: None,
        now=at,
        lost_messages=lost,
    )
    return report, replans, len(published)


def test_a_broker_that_lost_its_messages_during_planning_gets_the_published_page_again_at_once(
    settings: Settings, sandbox: Sandbox
) -> None:
    s, run_id = _planning_run(settings, sandbox)
    _report, replans, republished = _sweep(s, datetime.now(UTC), lost=True)
    assert replans == [run_id] and republished == 2  # re-planned despite its lease, the page sent again


def test_a_planner_lost_again_and_again_still_plans_while_it_progresses_and_is_abandoned_when_it_cannot(
    settings: Settings, sandbox: Sandbox
) -> None:
    s, run_id = _planning_run(settings, sandbox, max_redrives=1)
    later = datetime.now(UTC) + timedelta(seconds=s.plan_lease_seconds + 5)
    with session_scope(s) as db:  # its one re-plan is spent already
        db.execute(
            text("UPDATE refresh_runs SET replans = 1, redispatched_at = :t WHERE id = :r"),
            {"t": later - timedelta(hours=1), "r": run_id},
        )
    _report, replans, _ = _sweep(s, later)
    assert replans == [run_id]  # it progressed since its last re-plan: re-planned anyway
    with session_scope(s) as db:
        db.execute(
            text("UPDATE refresh_runs SET status = 'planning', planner_lease_until = NULL WHERE id = :r"),
            {"r": run_id},
        )
    _report, replans, _ = _sweep(s, later + timedelta(seconds=5))
    assert replans == []  # no progress since: the limit holds
    past_deadline = later + timedelta(seconds=s.run_deadline_seconds + 5)
    _sweep(s, past_deadline)
    status = runs.run_status(s, run_id)
    assert status is not None and status["status"] == RunStatus.RUNNING
    assert status["error"] == "planning stopped after 2 accounts: the rest not refreshed"
    # From there the run ends as every run does: its pending item stale, its tenants summarised.
    _sweep(s, past_deadline + timedelta(seconds=s.run_deadline_seconds + 5))
    assert runs.run_status(s, run_id)["accounts"]["stale"] == 2  # type: ignore[index]


def test_a_lease_renewed_at_the_moment_of_the_sweep_keeps_its_run(
    settings: Settings, sandbox: Sandbox
) -> None:
    """The sweeper read an expired lease, and a step renewed it just after: the re-plan's UPDATE checks
    the lease again and takes nothing."""
    from app.store import recovery

    s, run_id = _planning_run(settings, sandbox)
    [seen] = [r for r in recovery.open_runs(s) if r.id == run_id]
    now = datetime.now(UTC)
    assert not recovery.replan(s, seen, now)  # its lease (renewed by the step) still runs
    assert recovery.replan(s, seen, now + timedelta(seconds=s.plan_lease_seconds + 1))


def test_a_run_finished_before_its_counts_were_kept_gets_them_once(
    settings: Settings, sandbox: Sandbox
) -> None:
    from app.store import recovery

    seed_tenant(settings, sandbox, "older", accounts=2)
    run_id, _ = runs.create_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None)
    assert recovery.give_up(settings, run_id, RunStatus.RUNNING, datetime.now(UTC), "test")
    with session_scope(settings) as db:  # as a run finished before the upgrade that keeps them
        db.execute(text("UPDATE refresh_runs SET outcomes = NULL WHERE id = :r"), {"r": run_id})
    assert runs.run_status(settings, run_id)["accounts"]["pending"] == 2  # type: ignore[index]
    with session_scope(settings) as db:
        kept = db.get(RefreshRun, run_id)
        assert kept is not None and kept.outcomes is not None and kept.outcomes["pending"] == 2
