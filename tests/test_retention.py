"""Retention (docs/retention.md): what is deleted, what never is, in batches of short transactions, found
by indexes — on PostgreSQL and on the embedded SQLite; and ``balances db prune``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.store import repo, retention
from app.store.db import get_engine, session_scope
from app.store.migrate import upgrade
from app.store.models import (
    AuditEvent,
    CashflowForecast,
    RefreshAttempt,
    RefreshRun,
    RunItem,
    RunTenant,
    TenantSummary,
)
from app.store.states import RunStatus, Trigger
from tests.conftest import make_settings
from tests.support.metrics import metric
from tests.support.processes import run_cli, service_env

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, sandbox: Sandbox) -> Iterator[Settings]:
    """Settings on an empty, migrated database of either backend."""
    if request.param == "postgresql":
        yield request.getfixturevalue("settings")
        return
    s = make_settings(f"sqlite:///{tmp_path / 'retention.db'}", sandbox)
    upgrade(s)
    yield s


def add_run(
    s: Settings, run_id: str, status: RunStatus, ended_days_ago: float, *, accounts: int = 4, tenants: int = 2
) -> None:
    """A run that ended (or, open, was created) that many days ago, with its items, tenants, summaries,
    forecasts (two currencies) and the audit rows of its refreshes, written when it ended."""
    at = NOW - timedelta(days=ended_days_ago)
    with session_scope(s) as session:
        session.add(
            RefreshRun(
                id=run_id,
                trigger=Trigger.SCHEDULED,
                status=status,
                actor="system:scheduler",
                total_accounts=accounts,
                created_at=at - timedelta(hours=1),
                finished_at=None if status.open else at,
            )
        )
        session.flush()
        for n in range(tenants):
            tenant = f"t{n}"
            session.add(RunTenant(run_id=run_id, tenant_id=tenant, status="done", expected=0, remaining=0))
            session.add(TenantSummary(run_id=run_id, tenant_id=tenant, created_at=at, payload={"n": n}))
            for ccy in ("EUR", "USD"):
                session.add(
                    CashflowForecast(
                        run_id=run_id, tenant_id=tenant, currency=ccy, method="m", created_at=at, payload={}
                    )
                )
        for n in range(accounts):
            account = f"acc{n:04d}"
            session.add(
                RunItem(
                    run_id=run_id,
                    account_id=account,
                    tenant_id=f"t{n % tenants}",
                    task_id=f"{run_id}:{account}",
                    status="pending" if status.open else "succeeded",
                    finished_at=None if status.open else at,
                )
            )
            add_attempt(session, f"{run_id}:{account}", Trigger.SCHEDULED, at, run_id=run_id)


def add_attempt(
    session: Any, task_id: str, trigger: Trigger, at: datetime, run_id: str | None = None
) -> None:
    session.add(
        RefreshAttempt(
            task_id=task_id,
            run_id=run_id,
            operation="openbanking.balances.refresh",
            tenant_id="t0",
            account_id="acc0000",
            actor="alice" if trigger is Trigger.ON_DEMAND else "system:scheduler",
            trigger=trigger,
            outcome="succeeded",
            attempts=1,
            force_refresh=False,
            started_at=at,
            finished_at=at,
        )
    )


def rows(s: Settings) -> dict[str, set[Any]]:
    def keys(*cols: Any) -> set[Any]:
        return {tuple(r) for r in session.execute(select(*cols))}

    with session_scope(s) as session:
        return {
            "run_items": keys(RunItem.run_id, RunItem.account_id),
            "run_tenants": keys(RunTenant.run_id, RunTenant.tenant_id),
            "tenant_summaries": keys(TenantSummary.run_id, TenantSummary.tenant_id),
            "cashflow_forecasts": keys(
                CashflowForecast.run_id, CashflowForecast.tenant_id, CashflowForecast.currency
            ),
            "refresh_attempts": set(session.scalars(select(RefreshAttempt.task_id))),
            "runs": set(session.scalars(select(RefreshRun.id))),
        }


def of_runs(found: set[Any], *run_ids: str) -> set[Any]:
    return {r for r in found if r[0] in run_ids}


def test_retention_deletes_exactly_what_is_older_than_its_window_and_never_an_open_runs(
    store: Settings,
) -> None:
    s = store
    add_run(s, "old-completed", RunStatus.COMPLETED, 36)  # items: past 35 days; reports: within 90
    add_run(s, "old-stale", RunStatus.STALE, 401)  # everything past its window
    add_run(s, "recent", RunStatus.COMPLETED, 34)  # within every window
    add_run(s, "open-for-ages", RunStatus.RUNNING, 500)  # open: never touched, however old
    with session_scope(s) as session:
        add_attempt(session, "push-old", Trigger.WEBHOOK, NOW - timedelta(days=36))
        add_attempt(session, "push-recent", Trigger.WEBHOOK, NOW - timedelta(days=34))
        add_attempt(session, "operator-old", Trigger.ON_DEMAND, NOW - timedelta(days=900))  # an operator's
    before = rows(s)

    report = retention.prune(s, NOW)

    after = rows(s)
    kept_runs = ("recent", "open-for-ages")
    assert after["run_items"] == of_runs(before["run_items"], *kept_runs)
    assert after["run_tenants"] == of_runs(before["run_tenants"], *kept_runs)
    assert after["tenant_summaries"] == of_runs(before["tenant_summaries"], "old-completed", *kept_runs)
    assert after["cashflow_forecasts"] == of_runs(before["cashflow_forecasts"], "old-completed", *kept_runs)
    assert after["refresh_attempts"] == {
        *(a for a in before["refresh_attempts"] if a.startswith(kept_runs)),
        "push-recent",
        "operator-old",
    }
    assert after["runs"] == before["runs"]  # a run's own row stays: `run list` still shows it
    assert report.deleted == {
        "run_items": 8,
        "run_tenants": 4,
        "tenant_summaries": 2,
        "cashflow_forecasts": 4,
        "refresh_attempts": 9,
    }
    assert not report.more and not report.resume and report.stopped is None
    # Nothing is left to do: a second invocation deletes nothing.
    assert sum(retention.prune(s, NOW).deleted.values()) == 0


def test_a_dry_run_counts_what_would_go_and_changes_nothing(store: Settings) -> None:
    add_run(store, "old", RunStatus.COMPLETED, 500, accounts=3)
    add_run(store, "open", RunStatus.PENDING, 500, accounts=3)
    before = rows(store)
    report = retention.prune(store, NOW, dry_run=True)
    assert rows(store) == before
    assert report.dry_run and report.batches == 0
    assert report.deleted == {
        "run_items": 3,
        "run_tenants": 2,
        "tenant_summaries": 2,
        "cashflow_forecasts": 4,
        "refresh_attempts": 3,
    }
    assert report.deleted == retention.prune(store, NOW).deleted  # what it said is what goes


class Statements:
    """Every statement the engine sends and every commit, in order (what a batch is, seen from the
    database)."""

    def __init__(self, s: Settings) -> None:
        self.engine = get_engine(s)
        self.log: list[tuple[str, int]] = []

    def __enter__(self) -> Statements:
        event.listen(self.engine, "after_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self.engine, "after_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)

    def _statement(self, _conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        self.log.append((statement.split(None, 1)[0].upper(), cursor.rowcount))

    def _commit(self, _conn: Any) -> None:
        self.log.append(("COMMIT", 0))

    def deletes_per_transaction(self) -> list[list[int]]:
        """Rows deleted by each DELETE, grouped by the transaction that committed them."""
        groups: list[list[int]] = [[]]
        for kind, count in self.log:
            if kind == "DELETE":
                groups[-1].append(count)
            elif kind == "COMMIT":
                groups.append([])
        return [g for g in groups if g]


def test_retention_deletes_in_batches_each_its_own_short_transaction(store: Settings) -> None:
    s = store.model_copy(update={"prune_batch_size": 3})
    add_run(s, "old-a", RunStatus.COMPLETED, 401, accounts=7, tenants=1)
    add_run(s, "old-b", RunStatus.STALE, 401, accounts=2, tenants=1)
    with Statements(s) as seen:
        report = retention.prune(s, NOW)
    per_transaction = seen.deletes_per_transaction()
    assert all(len(deletes) == 1 for deletes in per_transaction)  # one DELETE per transaction
    deleted = [d[0] for d in per_transaction]
    # Items: run a 3, 3, 1; run b 2. Tenants, summaries: 1 each per run. Forecasts: 2 per run. Audit
    # rows (9): 3, 3, 3, then the empty batch that finds the end.
    assert deleted == [3, 3, 1, 2, 1, 1, 1, 1, 2, 2, 3, 3, 3, 0]
    assert report.batches == len(deleted) and sum(report.deleted.values()) == sum(deleted)


def test_an_invocation_stops_at_its_bound_and_the_next_resumes_where_it_stopped(store: Settings) -> None:
    s = store.model_copy(update={"prune_batch_size": 2, "prune_max_rows": 5})
    add_run(s, "old", RunStatus.COMPLETED, 500, accounts=6, tenants=1)
    before = len(rows(s)["run_items"])

    first = retention.prune(s, NOW)
    assert first.deleted["run_items"] == 5 and first.batches == 3  # 2, 2, then the 1 the bound leaves
    assert first.more and first.stopped == "rows" and first.resume
    assert len(rows(s)["run_items"]) == before - 5

    add_run(s, "tonight", RunStatus.RUNNING, 0, accounts=1, tenants=1)  # a run opens: no going on now
    second = retention.prune(s, NOW)
    assert second.deleted["run_items"] == 1 and second.more and not second.resume

    totals = first.deleted["refresh_attempts"] + second.deleted["refresh_attempts"]
    while (step := retention.prune(s, NOW)).more:
        totals += step.deleted["refresh_attempts"]
    totals += step.deleted["refresh_attempts"]
    assert totals == 6 and of_runs(rows(s)["run_items"], "old") == set()


def test_an_invocation_stops_on_time_between_two_batches(store: Settings) -> None:
    s = store.model_copy(update={"prune_batch_size": 1, "task_soft_time_limit": 10})
    add_run(s, "old", RunStatus.COMPLETED, 500, accounts=3, tenants=1)
    ticks = iter(range(0, 1000, 2))  # every look at the clock: 2 s later (the budget is 5 s)
    report = retention.prune(s, NOW, clock=lambda: float(next(ticks)))
    assert report.stopped == "time" and report.more and 0 < report.batches < 4


def test_the_deleted_rows_are_counted_by_table(store: Settings) -> None:
    add_run(store, "old", RunStatus.COMPLETED, 500, accounts=2, tenants=1)
    before = {t: metric("balances_retention_deleted_rows_total", table=t) for t in rows(store) if t != "runs"}
    retention.prune(store, NOW)
    counted = {t: metric("balances_retention_deleted_rows_total", table=t) - n for t, n in before.items()}
    assert counted == {
        "run_items": 2,
        "run_tenants": 1,
        "tenant_summaries": 1,
        "cashflow_forecasts": 2,
        "refresh_attempts": 2,
    }


# -- index-driven: the plans on PostgreSQL ------------------------------------------------------------


def plans(s: Settings, call: Any) -> list[str]:
    """The plan of every SELECT, UPDATE and DELETE ``call(session)`` sends, as the hot path runs them:
    sequential scans off (``writes.keyed_only``), so a plan that still scans a table has no index to
    use. The statements are explained after the call, with their own parameters."""
    engine = get_engine(s)
    sent: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE", "WITH"):
            sent.append((statement, params))

    with session_scope(s) as session:
        session.execute(text("SET LOCAL enable_seqscan = off"))
        event.listen(engine, "before_cursor_execute", keep)
        try:
            call(session)
        finally:
            event.remove(engine, "before_cursor_execute", keep)
        found = []
        for statement, params in sent:
            lines = session.connection().exec_driver_sql("EXPLAIN " + statement, params).scalars()
            found.append("\n".join(lines))
        session.rollback()
    return found


def test_retention_and_the_hot_path_find_their_rows_by_indexes(settings: Settings) -> None:
    from app.store import writes
    from app.store.states import ItemStatus

    # Runs of a realistic shape, with statistics (the nightly planner analyzes run_items): the planner
    # then has a choice, and a range of the key must win it.
    add_run(settings, "old", RunStatus.COMPLETED, 500, accounts=2000, tenants=40)
    add_run(settings, "tonight", RunStatus.RUNNING, 0, accounts=2000, tenants=40)
    with get_engine(settings).begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    keys = {"run_items": "pk_run_items", "run_tenants": "pk_run_tenants"}
    keys |= {"tenant_summaries": "uq_tenant_summaries_run_id_tenant_id"}
    keys |= {"cashflow_forecasts": "uq_cashflow_forecasts_run_id_tenant_id_currency"}
    for spec in retention.BY_RUN:
        after = (
            ("acc0100",) if spec.table == "run_items" else ("t10",) if len(spec.keys) == 1 else ("t10", "EUR")
        )
        found = plans(
            settings, lambda session, s=spec, a=after: retention.delete_run_batch(session, s, "old", a, 20)
        )
        assert len(found) == 2 and all(keys[spec.table] in p and "Seq Scan" not in p for p in found), found
    found = plans(
        settings, lambda session: retention.delete_attempts_batch(session, NOW, ["tonight"], (NOW, 0), 20)
    )
    assert len(found) == 2 and all("ix_refresh_attempts_finished" in p for p in found), found
    # The hot path, after retention ran: the run's items claimed, the latest records and an account's
    # snapshots read (on PostgreSQL, across the snapshots' partitions).
    retention.prune(settings, NOW)
    hot = plans(
        settings,
        lambda session: (
            writes.claim_items(session, "tonight", {"acc0000": (ItemStatus.SUCCEEDED, None)}, NOW),
            writes.latest(session, ["acc0000", "acc0001"]),
            repo.snapshots(session, "acc0000"),
        ),
    )
    assert len(hot) == 3 and all("Seq Scan" not in p for p in hot), hot
    assert "pk_run_items" in hot[0], hot[0]


# -- the shell ------------------------------------------------------------------------------------------


def test_db_prune_runs_the_policy_now_for_an_admin_only_and_is_audited(
    settings: Settings, redis_url: str, sandbox: Sandbox
) -> None:
    with session_scope(settings) as session:
        repo.grant_role(session, "alice", "admin", NOW)
        repo.grant_role(session, "victor", "viewer", NOW)
    add_run(settings, "old", RunStatus.COMPLETED, 500, accounts=3, tenants=1)
    add_run(settings, "open", RunStatus.RUNNING, 500, accounts=2, tenants=1)
    env = service_env(settings.database_url, redis_url, sandbox)

    denied = run_cli(env, "--as", "victor", "db", "prune")
    assert denied.returncode == 3 and "admin" in denied.stderr

    dry = run_cli(env, "--as", "alice", "db", "prune", "--dry-run", "--format", "tsv")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "table\twould delete\tkept"
    assert "run_items\t3\t35 days after its run ended" in dry.stdout.splitlines()
    assert len(rows(settings)["run_items"]) == 5

    done = run_cli(env, "--as", "alice", "db", "prune", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["deleted"]["run_items"] == 3 and report["deleted"]["refresh_attempts"] == 3
    assert report["more"] is False and report["dryRun"] is False
    assert rows(settings)["run_items"] == {("open", "acc0000"), ("open", "acc0001")}
    with session_scope(settings) as session:
        audited = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.operation == "balances.db.prune.v1.0.0")
            .order_by(AuditEvent.id)
        ).all()
        assert [(e.actor, e.outcome) for e in audited] == [("victor", "denied"), ("alice", "done")]
    assert audited[1].detail is not None and audited[1].detail["deleted"]["run_items"] == 3


# -- the schedule and the task -------------------------------------------------------------------------


def test_the_task_runs_daily_on_reports_away_from_the_nightly_run_and_goes_on_while_rows_are_left(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import celeryconfig
    from app.config import use_settings
    from app.worker import tasks
    from app.worker.queues import PRUNE_TASK, Queue, queue_for

    entry = celeryconfig.beat_schedule["prune-history"]
    assert entry["task"] == PRUNE_TASK and queue_for(PRUNE_TASK) is Queue.REPORTS
    assert entry["schedule"].hour == {1} and entry["schedule"].minute == {30}  # the run: 04:00

    queued: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks.prune_history, "apply_async", lambda **kw: queued.append(kw))
    use_settings(settings.model_copy(update={"prune_max_rows": 2}))
    add_run(settings, "old", RunStatus.COMPLETED, 500, accounts=5, tenants=1)
    first = tasks.prune_history.run()
    assert first["total"] == 2 and first["more"] and queued == [{"countdown": tasks.RESUME_SECONDS}]
    add_run(settings, "tonight", RunStatus.PLANNING, 0, accounts=1, tenants=1)
    second = tasks.prune_history.run()
    assert second["total"] == 2 and second["more"] and len(queued) == 1  # a run is open: tomorrow's


def test_a_window_too_short_for_a_redelivered_task_is_refused_by_name() -> None:
    from app.config import ConfigError, load_settings

    for variable, field in (
        ("BALANCES_KEEP_RUN_ITEMS_DAYS", "keep_run_items_days"),
        ("BALANCES_KEEP_ATTEMPTS_DAYS", "keep_attempts_days"),
        ("BALANCES_PRUNE_BATCH_SIZE", "prune_batch_size"),
    ):
        with pytest.raises(ConfigError, match=variable):
            load_settings(**{field: 0})


def test_a_pruned_run_still_shows_its_counts(settings: Settings, sandbox: Sandbox) -> None:
    """The move that ends a run keeps its final counts on the run row: `run status` and `run list`
    show them after retention pruned its items (they showed 0 succeeded, 0 failed)."""
    from app.nightly import pipeline
    from app.store import recovery, runs
    from tests.support.data import seed_tenant

    seed_tenant(settings, sandbox, "kept", accounts=3)
    run_id, _ = runs.create_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    assert pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None) == 3
    with session_scope(settings) as session:
        first, second, _third = sorted(
            session.scalars(select(RunItem.account_id).where(RunItem.run_id == run_id))
        )
        session.execute(update(RunItem).where(RunItem.account_id == first).values(status="succeeded"))
        session.execute(
            update(RunItem).where(RunItem.account_id == second).values(status="failed", reason="unauthorized")
        )
    assert recovery.give_up(settings, run_id, RunStatus.RUNNING, datetime.now(UTC), "test")
    before = runs.run_status(settings, run_id)
    retention.prune(settings, datetime.now(UTC) + timedelta(days=settings.keep_run_items_days + 1))
    with session_scope(settings) as session:
        assert session.scalar(select(func.count()).select_from(RunItem).where(RunItem.run_id == run_id)) == 0
    after = runs.run_status(settings, run_id)
    assert before is not None and after is not None
    assert (
        after["accounts"]
        == before["accounts"]
        == {"total": 3, "pending": 1, "succeeded": 1, "failed": 1, "stale": 0}
    )
    assert after["failuresByReason"] == {"unauthorized": 1}
    [listed] = [r for r in runs.list_runs(settings) if r["runId"] == run_id]
    assert listed["accounts"] == after["accounts"]
