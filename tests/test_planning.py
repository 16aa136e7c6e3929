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
    steps: list[tuple[int, str] | None] = []

    def step() -> bool:
        return pipeline.plan_step(
            quick,
            run_id,
            steps.pop(),
            publish=lambda _r, items: published.append(list(items)),
            enqueue_step=lambda _r, after, _c: steps.append(after),
            enqueue_summary=lambda *_: None,
            queued=lambda: 0,
        )

    assert pipeline.begin_planning(quick, run_id, lambda _r, after, _c: steps.append(after))
    assert steps == [None]
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
    assert not step()  # the dead planner's own next step, delivered late: superseded, does nothing
    assert len(published) == 1
    steps.clear()
    assert pipeline.begin_planning(quick, run_id, lambda _r, after, _c: steps.append(after))
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
    sent: list[tuple[tuple[int, str] | None, float | None]] = []
    pipeline.begin_planning(s, run_id, lambda _r, after, countdown: sent.append((after, countdown)))
    depth = [s.plan_queue_accounts // s.refresh_batch_accounts]  # messages: the budget, exactly
    published: list[runs.Item] = []

    def step() -> bool:
        after, _ = sent[-1]
        return pipeline.plan_step(
            s,
            run_id,
            after,
            publish=lambda _r, items: published.extend(items),
            enqueue_step=lambda _r, a, c: sent.append((a, c)),
            enqueue_summary=lambda *_: None,
            queued=lambda: depth[0],
        )

    assert step()
    assert sent[-1] == (None, s.plan_wait_seconds) and published == []  # waited, wrote nothing
    with session_scope(s) as db:
        run = db.get(RefreshRun, run_id)
        assert run is not None and run.planner_lease_until is not None
        assert run.planner_lease_until > datetime.now(UTC) + timedelta(seconds=s.plan_lease_seconds - 60)
        assert db.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id)) == 0
    depth[0] -= 1  # workers took one message
    assert step() and len(published) == 3 and sent[-1][1] is None


def test_a_tenant_is_summarised_only_once_its_whole_plan_is_written(
    settings: Settings, sandbox: Sandbox
) -> None:
    """A page may end in the middle of a tenant: the refreshes of its first page can all finish before
    the next page adds more of its accounts. Its summary waits for the run to be running."""
    seed_tenant(settings, sandbox, "split", users=2, accounts=2)  # two pages of one user each
    s = settings.model_copy(update={"plan_page_accounts": 2})
    run_id, _ = runs.create_run(s, trigger=Trigger.ON_DEMAND, actor="alice")
    sent: list[tuple[int, str] | None] = []
    summaries: list[str] = []
    pipeline.begin_planning(s, run_id, lambda _r, after, _c: sent.append(after))

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

    assert step()  # the first user's two accounts
    with session_scope(s) as db:  # ...both refreshed already: the tenant's counter is at 0
        db.execute(text("UPDATE run_tenants SET remaining = 0 WHERE run_id = :r"), {"r": run_id})
    assert not runs.claim_summary(s, run_id, "split")  # not yet: the run is still planning
    assert step()  # the second user's accounts: the counter is 2 again
    assert not step()  # nothing left: the run is running
    assert summaries == []  # the tenant still has 2 accounts to refresh
    with session_scope(s) as db:
        db.execute(text("UPDATE run_tenants SET remaining = 0 WHERE run_id = :r"), {"r": run_id})
    assert runs.claim_summary(s, run_id, "split")
