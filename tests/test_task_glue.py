"""The Celery glue as plain functions (no broker): backoff, tick, outcome → action, routing, the base task."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from app.config import Settings, load_settings
from app.contract import AccountBalanceRecord, OpenBankingRefreshBalancesOutput
from app.errors import Reason, RefreshError
from app.nightly.pipeline import schedule_slot
from app.refresh.outcomes import Attempt, Failed, Requeue, Retry, Succeeded
from app.retry import backoff_seconds
from app.worker.queues import Queue, queue_for
from app.worker.taskbase import Again, Finish, action_for
from tests.support.metrics import metric
from tests.support.processes import ROOT


def _settings(**extra: object) -> Settings:
    return load_settings(retry_base_seconds=1, retry_cap_seconds=30, **extra)


def test_backoff_is_full_jitter_under_an_exponential_ceiling_and_capped() -> None:
    s = _settings()
    rng = random.Random(7)
    for attempt in range(1, 10):
        ceiling = min(30, 2 ** (attempt - 1))
        delays = [backoff_seconds(attempt, s, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # jitter spreads over the whole range
    assert backoff_seconds(1, s, 12.0, rng) == 12.0  # Retry-After is a floor
    assert backoff_seconds(1, s, 500.0, rng) == 30  # ... but never past the cap


def test_a_scheduled_run_is_keyed_by_its_slot_not_by_when_a_worker_runs_the_tick() -> None:
    from datetime import date
    from zoneinfo import ZoneInfo

    s = _settings(nightly_cron="0 4 * * *", timezone="Europe/Paris")
    paris = ZoneInfo("Europe/Paris")
    fired = datetime(2026, 11, 24, 4, 0, 3, tzinfo=paris)
    # The beat's own tick, a redelivery 40 minutes later, a standby beat firing at 05:59: one run.
    keys = {schedule_slot(s, fired + timedelta(minutes=m)) for m in (0, 40, 119)}
    assert keys == {("cron:2026-11-24T04:00", date(2026, 11, 24))}
    # Before the next day's slot it is still that slot; after it, the next one.
    assert schedule_slot(s, datetime(2026, 11, 25, 3, 59, tzinfo=paris))[0] == "cron:2026-11-24T04:00"
    assert schedule_slot(s, datetime(2026, 11, 25, 4, 0, tzinfo=paris))[0] == "cron:2026-11-25T04:00"
    every = _settings(nightly_interval_seconds=60)
    at = datetime(2026, 11, 24, 4, 0, 12, tzinfo=UTC)
    assert schedule_slot(every, at) == schedule_slot(every, at.replace(second=59))
    assert schedule_slot(every, at) != schedule_slot(every, at.replace(minute=1))


def test_the_default_schedule_exists_once_every_day_and_a_dst_hour_is_refused() -> None:
    from app.config import ConfigError

    assert load_settings().nightly_cron == "0 4 * * *"
    with pytest.raises(ConfigError, match=r"BALANCES_NIGHTLY_CRON: 02:00 does not exist on \d{4}-03-\d{2}"):
        load_settings(nightly_cron="0 2 * * *", timezone="Europe/Paris")
    with pytest.raises(ConfigError, match=r"02:30 happens twice on \d{4}-10-\d{2}"):
        load_settings(nightly_cron="30 2 * 10 0", timezone="Europe/Paris")  # October's Sundays


def _output() -> OpenBankingRefreshBalancesOutput:
    at = datetime(2026, 11, 24, tzinfo=UTC)
    record = AccountBalanceRecord(
        id="b",
        account_id="a",
        tenant_id="t",
        connection_id="c",
        balance_type="current",
        current_balance=Decimal("12345678901234567.89"),
        currency="EUR",
        last_updated_at=at,
        created_at=at,
    )
    return OpenBankingRefreshBalancesOutput(balances=[record], refreshed_at=at)


def test_outcomes_become_celery_actions() -> None:
    s, rng = _settings(), random.Random(1)
    attempt = Attempt(number=2, max_attempts=3, task_id="t")

    done = action_for(Succeeded(_output()), attempt, s, rng)
    assert isinstance(done, Finish) and done.result["ok"] is True
    # Money goes to a result backend as exact text, never through float.
    assert done.result["output"]["balances"][0]["currentBalance"] == "12345678901234567.89"

    failed = action_for(Failed(RefreshError(Reason.NOT_FOUND, "gone")), attempt, s, rng)
    assert failed == Finish({"ok": False, "error": {"reason": "not_found", "message": "gone"}})

    retry = action_for(Retry(RefreshError(Reason.RATE_LIMITED, "429", retry_after=5)), attempt, s, rng)
    assert isinstance(retry, Again) and retry.counts_attempt and 5 <= retry.countdown <= 30

    requeue = action_for(Requeue(1.5, "limiter"), attempt, s, rng)
    assert isinstance(requeue, Again) and not requeue.counts_attempt and 1.5 <= requeue.countdown <= 2.0


@pytest.mark.parametrize(
    ("name", "args", "queue"),
    [
        ("balances.refresh_account", ({}, "alice", "on_demand"), Queue.INTERACTIVE),
        ("balances.refresh_account", ({}, "system:scheduler", "scheduled"), Queue.REFRESH),
        ("balances.fanout_batch", ("run", []), Queue.REFRESH),
        ("balances.plan_nightly_run", ("run",), Queue.REPORTS),
        ("balances.summarize_tenant", ("run", "t"), Queue.REPORTS),
        ("balances.sweep_runs", (), Queue.REPORTS),
        ("balances.send_run_report", ("run",), Queue.REPORTS),
        ("balances.apply_push", ("{}", "2026-11-24T04:00:00+00:00"), Queue.PUSH),
    ],
)
def test_one_router_places_every_task(name: str, args: tuple[object, ...], queue: Queue) -> None:
    assert queue_for(name, args, {}) is queue


def test_the_base_task_retries_its_declared_exceptions_and_counts_each_execution(settings: Settings) -> None:
    from app.celery import app
    from app.worker.taskbase import BalancesTask

    calls: list[int] = []

    class Hiccup(Exception):
        pass

    class Flaky(BalancesTask):
        retry_on = (Hiccup,)

    @app.task(base=Flaky, bind=True, name="balances.test_flaky")
    def flaky(self: Flaky) -> str:
        calls.append(self.request.retries)
        if len(calls) < 2:
            raise Hiccup("broker hiccup")
        return "done"

    def count(outcome: str) -> float:
        return metric("balances_task_executions_total", task="balances.test_flaky", outcome=outcome)

    before = {o: count(o) for o in ("succeeded", "retried", "failed")}
    assert flaky.apply().get() == "done"  # eager: the retry runs at once
    assert calls == [0, 1]
    assert count("retried") == before["retried"] + 1
    assert count("succeeded") == before["succeeded"] + 1
    assert count("failed") == before["failed"]

    runs_of_undeclared: list[int] = []

    @app.task(base=BalancesTask, name="balances.test_undeclared")
    def undeclared() -> None:
        runs_of_undeclared.append(1)
        raise ValueError("a bug, not an outage: not retried")

    failed = metric("balances_task_executions_total", task="balances.test_undeclared", outcome="failed")
    with pytest.raises(ValueError):
        undeclared.apply().get()
    assert runs_of_undeclared == [1]
    assert (
        metric("balances_task_executions_total", task="balances.test_undeclared", outcome="failed")
        == failed + 1
    )


@pytest.mark.parametrize("terminal", [True, False])
def test_json_output_keeps_money_exact_on_a_terminal_too(terminal: bool) -> None:
    import io

    from rich.console import Console

    from app.cli.shell import print_json

    buffer = io.StringIO()
    print_json(
        {"currentBalance": Decimal("12345678901234567.89")}, Console(file=buffer, force_terminal=terminal)
    )
    text = buffer.getvalue()
    assert "12345678901234567.89" in text and "e+16" not in text


def test_workers_drain_pushes_and_reports_before_the_nightly_flood() -> None:
    import celeryconfig

    assert [q.name for q in celeryconfig.task_queues] == ["interactive", "push", "reports", "refresh"]
    assert celeryconfig.broker_transport_options["queue_order_strategy"] == "priority"


def test_every_task_of_the_service_retries_infrastructure_errors() -> None:
    import kombu.exceptions
    import sqlalchemy.exc

    from app.worker import tasks
    from app.worker.queues import REFRESH_TASK, ROUTES

    for name in [REFRESH_TASK, *ROUTES]:
        task = tasks.app.tasks[name]
        assert sqlalchemy.exc.OperationalError in task.retry_on, name
        assert kombu.exceptions.OperationalError in task.retry_on, name  # a fan-out cut half-way


def test_a_denial_that_cannot_be_recorded_is_ignored_and_never_republished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A forged message whose denial hits a database error must not go down the retry path: a retry is
    # published (and signed) by this worker, which would make the forgery authentic.
    from celery.exceptions import Ignore
    from sqlalchemy.exc import OperationalError

    from app.worker.tasks import sweep_runs

    published: list[object] = []
    task_type = type(sweep_runs._get_current_object())

    def unrecordable(self: object, *args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT INTO audit_events ...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(task_type, "retry", lambda self, *a, **k: published.append(k))
    monkeypatch.setattr(task_type, "deny", unrecordable)
    with pytest.raises(Ignore):
        sweep_runs._get_current_object()._refuse()
    with pytest.raises(Ignore):  # nor may anything re-publish a message that was not verified
        sweep_runs._get_current_object().again(1.0)
    assert published == []


def _production_import_path() -> dict[str, Any]:
    """What a worker process loads of the project (a fresh interpreter: no test's own tasks)."""
    probe = (
        "import json, sys, app.celery, app.worker.tasks, app.push.receiver, app.cli; print(json.dumps({"
        "'tasks': sorted(n for n in app.celery.app.tasks if n.startswith('balances.')), "
        "'modules': sorted(m for m in sys.modules if m.startswith(('app.devtools', 'bench', 'tests')))}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    return dict(json.loads(out.stdout))


def test_every_task_of_the_service_has_a_queue_and_a_forgotten_one_is_refused() -> None:
    from app.worker.queues import REFRESH_TASK, ROUTES, Unrouted, queue_for

    assert set(_production_import_path()["tasks"]) == {REFRESH_TASK, *ROUTES}  # each with its route
    with pytest.raises(Unrouted, match=r"balances\.forgotten"):
        queue_for("balances.forgotten")  # it would have landed on interactive, beside operators


def test_the_sandbox_and_the_benchmarks_task_stay_out_of_the_production_import_path() -> None:
    loaded = _production_import_path()
    assert loaded["modules"] == [] and "balances.noop" not in loaded["tasks"]
