"""The run report delivered by the notification hook: a real HTTP server on loopback as the receiving
end (it verifies each signature as a receiver would), the delivery as plain functions on real
PostgreSQL, and the whole path through real ``celery -A app worker`` processes."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select, update

from app.admin.accounts import sync_accounts
from app.config import ConfigError, Settings, load_settings
from app.devtools.sandbox import Sandbox
from app.money import money_display, money_text
from app.nightly import pipeline
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Attempt
from app.reports import jobs, notify, run_report
from app.store import recovery, repo, run_reports, runs
from app.store.db import session_scope
from app.store.migrate import upgrade
from app.store.models import RefreshRun, RunItem, RunTenant, TenantSummary
from app.store.states import ReportOutcome, RunStatus, Trigger
from tests.conftest import make_settings
from tests.support.data import ADMIN_ACTOR, nightly_run, seed_tenant
from tests.support.metrics import metric, total
from tests.support.polling import wait_until
from tests.support.processes import ROOT, free_port, log_tail, run_cli, run_worker, service_env

SECRET = "notify-test-secret-" + "5" * 24
# The path and query of a Slack-style webhook URL are a credential: they must never be logged.
SECRET_PATH = "/services/T0001/B0002/path-secret-b1946ac9"
SECRET_QUERY = "token=query-secret-81dc9bdb"


# -- the receiving end -------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: Message
    body: bytes


class Hook:
    """A webhook receiver on 127.0.0.1 (stdlib ``http.server`` on a thread): records every request and
    answers what the test scripted (then 200)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.script: deque[tuple[int, dict[str, str]]] = deque()
        self._lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook._lock:
                    hook.received.append(Received(self.path, self.headers, body))
                    status, headers = hook.script.popleft() if hook.script else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}?{SECRET_QUERY}"

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


def documented_verify() -> Any:
    """The receiver's check exactly as docs/design.md "The run report" prints it."""
    doc = (ROOT / "docs" / "design.md").read_text()
    section = doc[doc.index("## The run report") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    namespace: dict[str, Any] = {}
    exec(code[: code.index("```")], namespace)  # noqa: S102 - our own documentation
    return namespace["verify"]


verify = documented_verify()


# -- arranging a finished run with plain functions ------------------------------------------------------


def notifying(settings: Settings, sandbox: Sandbox, url: str, **extra: object) -> Settings:
    """The suite's settings with the hook configured, through the same validation as the environment."""
    return make_settings(settings.database_url, sandbox, notify_url=url, notify_secret=SECRET, **extra)


def finish_run(settings: Settings, name: str, *, finish: bool = True) -> str:
    """A nightly run planned, every account refreshed as its scheduled refresh would (one attempt),
    every tenant summarised and forecast, and the run completed (unless ``finish`` is False)."""
    run_id = nightly_run(settings, name)
    day = runs.business_day_of(settings, run_id)
    with session_scope(settings) as s:
        items = s.execute(
            select(RunItem.task_id, RunItem.tenant_id, RunItem.account_id).where(RunItem.run_id == run_id)
        ).all()
        tenants = list(s.scalars(select(RunTenant.tenant_id).where(RunTenant.run_id == run_id)))
    for task_id, tenant_id, account_id in items:
        execute(
            {"tenantId": tenant_id, "accountId": account_id},
            "system:scheduler",
            Trigger.SCHEDULED,
            attempt=Attempt(1, 1, task_id, run_id, business_day=day),
        )
    for tenant_id in tenants:
        assert pipeline.claim_summary_and_enqueue(settings, run_id, tenant_id, lambda *_: None)
        assert jobs.summarize_tenant(settings, run_id, tenant_id)
        assert jobs.forecast_tenant(settings, run_id, tenant_id)
    if finish:
        assert runs.finish_if_complete(settings, run_id) is not None
    return run_id


def arrange_tenants(settings: Settings, sandbox: Sandbox, prefix: str) -> tuple[str, str]:
    """``<prefix>-ok``: two accounts refreshed, a consent ending in 3 days; ``<prefix>-sca``: a
    connection that needs its user (SCA), so both its accounts fail."""
    ok = seed_tenant(settings, sandbox, f"{prefix}-ok", accounts=2)
    sca = seed_tenant(settings, sandbox, f"{prefix}-sca", accounts=2)
    next(iter(ok.user.connections.values())).expire = datetime.now(UTC) + timedelta(days=3)
    sync_accounts(ok.tenant_id, ADMIN_ACTOR, Deps.default(settings))
    next(iter(sca.user.connections.values())).state = "SCARequired"
    return ok.tenant_id, sca.tenant_id


def report_row(settings: Settings, run_id: str) -> RefreshRun:
    with session_scope(settings) as s:
        run = s.get(RefreshRun, run_id)
        assert run is not None
        s.expunge(run)
        return run


def reports_total(outcome: str) -> float:
    return metric("balances_run_reports_total", outcome=outcome)


# -- configuration ---------------------------------------------------------------------------------------


def test_the_hook_is_off_unless_configured_and_a_bad_configuration_names_the_variable_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings().notify_url is None
    url = "https://hooks.example.com" + SECRET_PATH + "?" + SECRET_QUERY
    monkeypatch.setenv("BALANCES_NOTIFY_URL", url)
    with pytest.raises(ConfigError, match="BALANCES_NOTIFY_SECRET must be set") as info:
        load_settings()
    assert "path-secret" not in str(info.value) and "query-secret" not in str(info.value)
    monkeypatch.setenv("BALANCES_NOTIFY_SECRET", "short")
    with pytest.raises(ConfigError, match="BALANCES_NOTIFY_SECRET: must be at least 16") as info:
        load_settings()
    assert "short" not in str(info.value).replace("must be at least", "")
    monkeypatch.setenv("BALANCES_NOTIFY_SECRET", SECRET)
    settings = load_settings()
    assert settings.notify_host == "hooks.example.com"
    assert "path-secret" not in repr(settings) and SECRET not in repr(settings)
    for bad in (
        "ftp://hooks.example.com/x",
        "hooks.example.com/path-secret",
        "https:///path-secret",
        "https://hooks.example.com:99999/path-secret",
        "https://hooks.example.com/a b",
    ):
        monkeypatch.setenv("BALANCES_NOTIFY_URL", bad)
        with pytest.raises(ConfigError, match="BALANCES_NOTIFY_URL: must be an http") as info:
            load_settings()
        assert "path-secret" not in str(info.value) and "99999" not in str(info.value)
    monkeypatch.setenv("BALANCES_NOTIFY_URL", url)
    with pytest.raises(ConfigError, match="BALANCES_NOTIFY_RETRY_CAP_SECONDS"):
        load_settings(notify_retry_cap_seconds=1000, visibility_timeout=900)


def test_money_is_written_at_its_currencys_scale_and_never_rounded() -> None:
    assert money_text(Decimal("12345.6"), "EUR") == "12345.60"
    assert money_text(Decimal(0), "EUR") == "0.00"
    assert money_text(Decimal("-1E+3"), "USD") == "-1000.00"
    assert money_text(Decimal("1234.5"), "JPY") == "1234.5"  # more places than JPY's: kept
    assert money_text(Decimal("1.005"), "EUR") == "1.005"
    assert money_text(Decimal("7.1"), "KWD") == "7.100"
    assert money_text(Decimal("123456789012345678901234.5"), "EUR") == "123456789012345678901234.50"
    assert money_display(Decimal("12345.67"), "EUR") == "12,345.67"
    line = run_report.summary_line(
        "demo-acme",
        {
            "accounts": {"refreshed": 2, "failed": 0, "stale": 0},
            "totals": [{"currency": "EUR", "current": Decimal("12345.6")}],
        },
    )
    assert line == "demo-acme: 2 refreshed, 0 failed, 0 stale; EUR current 12,345.60"


def test_the_text_cannot_ping_a_channel_and_lists_tenants_needing_attention_first() -> None:
    def tenant(tenant_id: str, failed: int, old: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "tenantId": tenant_id,
            "summarised": True,
            "line": f"{tenant_id}: line",
            "accounts": {"refreshed": 1, "failed": failed, "stale": 0, "failuresByReason": {}},
            "connectionsNeedingUser": [],
            "consentsExpiring": [],
            "oldBankData": old,
        }

    run = {
        "id": "run_x",
        "status": "completed",
        "businessDay": "2026-12-07",
        "durationSeconds": 42.0,
        "tenants": 3,
        "accounts": {"total": 3, "refreshed": 3, "failed": 0, "stale": 0},
        "failuresByReason": {},
        "error": None,
    }
    old = [{"age": "4.0 d", "name": "<!channel> & co", "accountId": "acc_1"}]
    text = run_report.render_text(run, [tenant("a-calm", 0, []), tenant("b-busy", 0, old)])
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text
    assert text.index("b-busy") < text.index("a-calm")  # attention first
    assert text.splitlines()[0] == "Nightly run `run_x` completed: business day 2026-12-07, 42 s"


# -- delivery, as plain functions ---------------------------------------------------------------------------


def test_the_report_is_signed_as_a_receiver_verifies_and_carries_the_run_and_each_tenant(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    ok, sca = arrange_tenants(settings, sandbox, "nt")
    run_id = finish_run(settings, "nt-run")
    s = notifying(settings, sandbox, hook.url)
    sent_before = reports_total("sent")

    step = notify.deliver(s, run_id, "task-1", random.Random(1))

    assert step == notify.Ended(ReportOutcome.SENT, "200")
    [got] = hook.received
    assert got.path == SECRET_PATH + "?" + SECRET_QUERY
    assert got.headers["Content-Type"] == "application/json; charset=utf-8"
    assert verify(SECRET.encode(), got.headers, got.body, time.time())
    assert not verify(SECRET.encode(), got.headers, got.body + b" ", time.time())  # a changed body
    assert not verify(b"another-secret-of-the-same-len", got.headers, got.body, time.time())
    assert not verify(SECRET.encode(), got.headers, got.body, time.time() + 3600)  # replayed an hour later
    assert reports_total("sent") == sent_before + 1
    row = report_row(s, run_id)
    assert (row.report_outcome, row.report_attempts, row.report_owner) == ("sent", 1, "task-1")

    doc = json.loads(got.body, parse_float=Decimal)
    run = doc["run"]
    assert run["id"] == run_id and run["status"] == "completed" and run["trigger"] == "scheduled"
    assert run["businessDay"] == runs.business_day_of(s, run_id).isoformat()  # type: ignore[union-attr]
    assert run["accounts"] == {"total": 4, "refreshed": 2, "failed": 2, "stale": 0, "pending": 0}
    assert run["failuresByReason"] == {"needs_user_action": 2}
    for stamp in (run["startedAt"], run["finishedAt"]):
        assert stamp.endswith("Z") and datetime.fromisoformat(stamp).tzinfo is not None
    assert run["durationSeconds"] >= 0 and run["tenants"] == 2

    tenants = {t["tenantId"]: t for t in doc["tenants"]}
    assert set(tenants) == {ok, sca}
    with session_scope(s) as session:
        records = [r for r in repo.latest_balances(session, ok) if r.balance_type == "current"]
    expected: dict[str, Decimal] = {}
    for r in records:
        expected[r.currency] = expected.get(r.currency, Decimal(0)) + r.current_balance
    good = tenants[ok]
    assert {t["currency"]: t["current"] for t in good["totals"]} == {
        ccy: money_text(v, ccy) for ccy, v in expected.items()
    }
    for t in good["totals"]:
        for key in ("current", "available", "coming"):
            assert isinstance(t[key], str) and re.fullmatch(r"-?\d+\.\d{2,}", t[key]), t
    assert good["line"] == f"{ok}: 2 refreshed, 0 failed, 0 stale" + "".join(
        f"; {ccy} current {money_display(v, ccy)}" for ccy, v in sorted(expected.items())
    )
    [consent] = good["consentsExpiring"]
    assert consent["consentExpiresAt"].endswith("Z") and 2.9 <= consent["daysLeft"] <= 3.0
    assert consent["reconnectCommand"].startswith(f"balances connections reconnect-link --tenant {ok}")

    bad = tenants[sca]
    assert bad["line"].startswith(f"{sca}: 0 refreshed, 2 failed, 0 stale")
    assert bad["accounts"]["failuresByReason"] == {"needs_user_action": 2}
    assert {f["reason"] for f in bad["failedAccounts"]} == {"needs_user_action"}
    [needing] = bad["connectionsNeedingUser"]
    assert needing["state"] == "SCARequired" and needing["why"] == "user_action"
    assert needing["since"].endswith("Z")
    command = f"balances connections reconnect-link --tenant {sca} --connection {needing['connectionId']}"
    assert needing["reconnectCommand"] == command

    text = doc["text"]
    assert text.startswith(f"Nightly run `{run_id}` completed: business day ")
    assert "2 refreshed, 2 failed, 0 stale (4 accounts, 2 tenants); failures: needs_user_action 2" in text
    assert f"- {bad['line']}" in text and f"`{command}`" in text
    assert f"- {good['line']}" in text and "consent ends" in text

    # Delivered: another message for the same run sends nothing.
    assert notify.deliver(s, run_id, "task-2", random.Random(1)).outcome is None
    assert notify.deliver(s, run_id, "task-1", random.Random(1)).outcome is None
    assert hook.count() == 1


def test_a_503_then_200_is_retried_after_retry_after_and_a_400_is_not_retried(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    seed_tenant(settings, sandbox, "nr-1", accounts=1)
    first = finish_run(settings, "nr-run-1")
    s = notifying(settings, sandbox, hook.url)
    hook.script.extend([(503, {"Retry-After": "7"}), (200, {})])

    step = notify.deliver(s, first, "task-a", random.Random(2))
    assert isinstance(step, notify.Again) and 7 <= step.countdown <= s.notify_retry_cap_seconds
    row = report_row(s, first)
    assert row.report_outcome is None and row.report_attempts == 1
    assert row.report_lease_until is not None  # held through the countdown
    assert row.report_lease_until > datetime.now(UTC) + timedelta(seconds=step.countdown)
    assert notify.deliver(s, first, "task-b", random.Random(2)).outcome is None  # held by task-a
    assert notify.deliver(s, first, "task-a", random.Random(2)) == notify.Ended(ReportOutcome.SENT, "200")
    assert hook.count() == 2
    assert all(verify(SECRET.encode(), r.headers, r.body, time.time()) for r in hook.received)
    assert report_row(s, first).report_attempts == 2

    second = finish_run(settings, "nr-run-2")
    hook.script.append((400, {}))
    refused_before = reports_total("refused")
    assert notify.deliver(s, second, "task-c", random.Random(2)) == notify.Ended(ReportOutcome.REFUSED, "400")
    assert notify.deliver(s, second, "task-c", random.Random(2)).outcome is None
    assert hook.count() == 3  # one POST: a 4xx is the receiver's answer
    assert reports_total("refused") == refused_before + 1
    assert report_row(s, second).report_outcome == "refused"


@pytest.mark.parametrize(
    ("status", "retried"), [(429, True), (500, True), (502, True), (301, False), (404, False), (408, False)]
)
def test_what_is_retried(
    settings: Settings, sandbox: Sandbox, hook: Hook, status: int, retried: bool
) -> None:
    seed_tenant(settings, sandbox, f"nw-{status}", accounts=1)
    run_id = finish_run(settings, f"nw-run-{status}")
    hook.script.append((status, {"Location": "http://127.0.0.1:1/elsewhere"} if status == 301 else {}))
    step = notify.deliver(notifying(settings, sandbox, hook.url), run_id, "task", random.Random(3))
    assert isinstance(step, notify.Again) is retried
    assert hook.count() == 1  # a redirect is not followed


def test_an_unreachable_hook_fails_after_the_last_attempt_and_logs_its_host_only(
    settings: Settings, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    seed_tenant(settings, sandbox, "nu-1", accounts=1)
    run_id = finish_run(settings, "nu-run")
    closed = f"http://127.0.0.1:{free_port()}{SECRET_PATH}?{SECRET_QUERY}"
    s = notifying(settings, sandbox, closed, notify_max_attempts=2)
    failed_before = reports_total("failed")
    with caplog.at_level(logging.DEBUG):
        step = notify.deliver(s, run_id, "task", random.Random(4))
        assert isinstance(step, notify.Again)
        assert notify.deliver(s, run_id, "task", random.Random(4)) == notify.Ended(
            ReportOutcome.FAILED, "connection error"
        )
    assert reports_total("failed") == failed_before + 1
    assert runs.run_status(s, run_id)["status"] == "completed"  # type: ignore[index]
    logged = "\n".join(r.getMessage() + json.dumps(vars(r), default=str) for r in caplog.records)
    assert "127.0.0.1" in logged and "failed after 2 attempt(s)" in logged
    for secret in ("path-secret", "query-secret", SECRET):
        assert secret not in logged


def test_the_finishing_code_running_twice_sends_one_report(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    """Four messages for one run (a redelivered finishing task, the sweeper...) racing: one POST."""
    seed_tenant(settings, sandbox, "nd-1", accounts=1)
    run_id = finish_run(settings, "nd-run")
    s = notifying(settings, sandbox, hook.url)
    barrier = threading.Barrier(4)
    results: list[notify.Ended | notify.Again] = []

    def message(owner: str) -> None:
        barrier.wait()
        results.append(notify.deliver(s, run_id, owner, random.Random(5)))

    threads = [threading.Thread(target=message, args=(f"task-{i}",)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert sorted(str(r.outcome) for r in results if isinstance(r, notify.Ended)) == [
        "None",
        "None",
        "None",
        "sent",
    ]
    assert hook.count() == 1
    assert report_row(s, run_id).report_attempts == 1


def test_the_sweeper_sends_a_lost_report_once_and_takes_over_from_a_holder_that_vanished(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    seed_tenant(settings, sandbox, "ns-1", accounts=1)
    # The sweeper finishes a run whose last forecast task died before finishing it: it sends the report.
    run_id = finish_run(settings, "ns-run", finish=False)
    s = notifying(settings, sandbox, hook.url)
    sent: list[str] = []

    def sweep(at: datetime) -> pipeline.SweepReport:
        return pipeline.sweep(
            s,
            lambda *_: None,
            lambda *_: None,
            lambda _: None,
            lambda *_: None,
            now=at,
            enqueue_report=sent.append,
        )

    now = datetime.now(UTC)
    assert sweep(now).finished_at and sent == [run_id]
    # That message was lost. Before the stall window nothing is sent again; after it, once.
    stall = timedelta(seconds=s.run_stall_seconds)
    assert sweep(now + stall / 2).run_reports_sent == 0
    assert sweep(now + stall + timedelta(seconds=5)).run_reports_sent == 1 and sent == [run_id, run_id]
    assert sweep(now + stall + timedelta(seconds=6)).run_reports_sent == 0  # the re-sent message has its time
    # The re-sent message's task starts, the receiver is down: it holds the report through its countdown.
    hook.script.append((503, {}))
    assert isinstance(notify.deliver(s, run_id, "resent", random.Random(6)), notify.Again)
    lease = report_row(s, run_id).report_lease_until
    assert lease is not None
    assert sweep(lease - timedelta(seconds=1)).run_reports_sent == 0  # a live holder is never replaced
    # Its retry was lost (Redis restarted empty): past its lease, the sweeper sends the report again.
    assert sweep(lease + timedelta(seconds=1)).run_reports_sent == 1 and len(sent) == 3
    assert notify.deliver(s, run_id, "taken-over", random.Random(6)).outcome is ReportOutcome.SENT
    assert notify.deliver(s, run_id, "resent", random.Random(6)).outcome is None  # the old holder, back
    assert hook.count() == 2
    row = report_row(s, run_id)
    assert (row.report_outcome, row.report_attempts, row.report_resends) == ("sent", 2, 2)
    assert sweep(lease + stall * 3).run_reports_sent == 0  # ended: never again
    # Without a hook configured the sweeper sends nothing.
    assert (
        pipeline.sweep(s, lambda *_: None, lambda *_: None, lambda _: None, lambda *_: None).run_reports_sent
        == 0
    )


def test_a_run_given_up_reports_the_tenants_it_could_not_summarise(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    seed_tenant(settings, sandbox, "ng-1", accounts=1)
    run_id = nightly_run(settings, "ng-run")  # planned; its refreshes never ran
    now = datetime.now(UTC)
    assert recovery.give_up(settings, run_id, RunStatus.RUNNING, now, "no progress until the last deadline")
    s = notifying(settings, sandbox, hook.url)
    assert notify.deliver(s, run_id, "task", random.Random(7)).outcome is ReportOutcome.SENT
    doc = json.loads(hook.received[0].body)
    assert doc["run"]["status"] == "stale" and doc["run"]["error"] == "no progress until the last deadline"
    assert doc["run"]["accounts"]["pending"] == 1
    [tenant] = doc["tenants"]
    assert tenant["summarised"] is False and tenant["status"] == "refreshing" and tenant["totals"] == []
    assert "Given up: no progress until the last deadline" in doc["text"]


def test_no_report_is_sent_for_a_run_still_running_or_without_a_hook(
    settings: Settings, sandbox: Sandbox, hook: Hook
) -> None:
    seed_tenant(settings, sandbox, "nn-1", accounts=1)
    running = nightly_run(settings, "nn-run")
    s = notifying(settings, sandbox, hook.url)
    assert notify.deliver(s, running, "task", random.Random(8)).outcome is None
    finished = finish_run(settings, "nn-run-2")
    off = s.model_copy(update={"notify_url": None})
    assert notify.deliver(off, finished, "task", random.Random(8)) == notify.Ended(
        None, "no BALANCES_NOTIFY_URL"
    )
    assert hook.count() == 0
    assert report_row(s, finished).report_attempts == 0


def test_the_claims_hold_on_sqlite_too(tmp_path: Path) -> None:
    """The embedded default: the same conditional UPDATEs, RETURNING and time comparisons."""
    lite = load_settings(database_url=f"sqlite:///{tmp_path / 'r.db'}")
    upgrade(lite)
    run_id, _ = runs.create_run(lite, trigger=Trigger.ON_DEMAND, actor="alice")
    now = datetime.now(UTC)
    lease = now + timedelta(minutes=5)
    assert run_reports.claim_attempt(lite, run_id, "a", lease) is None  # not finished yet
    with session_scope(lite) as session:
        session.execute(
            update(RefreshRun)
            .where(RefreshRun.id == run_id)
            .values(status=RunStatus.COMPLETED, finished_at=now)
        )
    assert run_reports.claim_attempt(lite, run_id, "a", lease) == 1
    assert run_reports.claim_attempt(lite, run_id, "b", lease) is None
    args = {"finished_since": now - timedelta(days=1), "unclaimed_before": now, "max_resends": 3}
    assert run_reports.claim_resends(lite, lease - timedelta(seconds=1), lease_until=lease, **args) == []
    later = lease + timedelta(seconds=1)
    assert run_reports.claim_resends(lite, later, lease_until=later + timedelta(minutes=5), **args) == [
        run_id
    ]
    assert run_reports.claim_attempt(lite, run_id, "b", later + timedelta(minutes=5)) == 2
    assert not run_reports.finish(lite, run_id, "a", ReportOutcome.SENT, later)
    assert run_reports.finish(lite, run_id, "b", ReportOutcome.SENT, later)
    assert run_reports.claim_attempt(lite, run_id, "b", later) is None


# -- through real workers ---------------------------------------------------------------------------------


@pytest.fixture
def env(settings: Settings, redis_url: str, sandbox: Sandbox) -> Iterator[dict[str, str]]:
    redis.Redis.from_url(redis_url).flushdb()
    sandbox.state.scripted_users.clear()
    yield service_env(
        settings.database_url,
        redis_url,
        sandbox,
        BALANCES_NOTIFY_SECRET=SECRET,
        BALANCES_NOTIFY_RETRY_BASE_SECONDS="0.05",
        BALANCES_NOTIFY_RETRY_CAP_SECONDS="1",
    )


def start_run(env: dict[str, str]) -> str:
    proc = run_cli(env, "--as", "alice", "run", "nightly", "--no-wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(json.loads(proc.stdout)["runId"])


def finished(settings: Settings, run_id: str) -> dict[str, Any] | None:
    status = runs.run_status(settings, run_id)
    return status if status and status["status"] not in ("pending", "planning", "running") else None


def summaries(settings: Settings, run_id: str) -> int:
    with session_scope(settings) as s:
        return int(
            s.scalar(select(func.count()).select_from(TenantSummary).where(TenantSummary.run_id == run_id))
            or 0
        )


@pytest.mark.e2e
def test_a_worker_sends_the_report_when_the_run_ends_retrying_a_503_and_sweeps_send_nothing_more(
    env: dict[str, str], settings: Settings, sandbox: Sandbox, hook: Hook, tmp_path: Path
) -> None:
    ok, sca = arrange_tenants(settings, sandbox, "ne")
    hook.script.append((503, {}))
    env = dict(env, BALANCES_NOTIFY_URL=hook.url)
    with run_worker(env, tmp_path / "w.log") as worker:
        run_id = start_run(env)
        status = wait_until(lambda: finished(settings, run_id), "run to finish", 90)
        wait_until(lambda: report_row(settings, run_id).report_outcome, "the report's delivery to end", 60)
        scraped = worker.scrape()
        # The finishing code again, twice: the sweeper finds the report delivered and sends nothing.
        for _ in range(2):
            swept = run_cli(env, "--as", "alice", "run", "sweep", "--json")
            assert swept.returncode == 0 and json.loads(swept.stdout)["runReportsSent"] == 0, swept.stderr
    logs = log_tail(worker.log)
    assert status["status"] == "completed" and summaries(settings, run_id) == 2, logs
    row = report_row(settings, run_id)
    assert (row.report_outcome, row.report_attempts, row.report_resends) == ("sent", 2, 0), logs
    assert hook.count() == 2  # the 503, then the retry (a new message, signed by the worker)
    last = hook.received[-1]
    assert verify(SECRET.encode(), last.headers, last.body, time.time())
    doc = json.loads(last.body)
    assert doc["run"]["id"] == run_id and doc["run"]["accounts"]["failed"] == 2
    assert {t["tenantId"] for t in doc["tenants"]} == {ok, sca}
    assert total(scraped, "balances_run_reports_total", outcome="sent") == 1
    text = worker.log.read_text(errors="replace")
    assert "path-secret" not in text and "query-secret" not in text and SECRET not in text
    assert f"run report of {run_id} to 127.0.0.1 sent after 2 attempt(s)" in text


@pytest.mark.e2e
def test_a_run_completes_while_the_hook_is_unreachable(
    env: dict[str, str], settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    arrange_tenants(settings, sandbox, "nx")
    closed = f"http://127.0.0.1:{free_port()}{SECRET_PATH}?{SECRET_QUERY}"
    env = dict(env, BALANCES_NOTIFY_URL=closed, BALANCES_NOTIFY_MAX_ATTEMPTS="3")
    with run_worker(env, tmp_path / "w.log") as worker:
        run_id = start_run(env)
        status = wait_until(lambda: finished(settings, run_id), "run to finish", 90)
        wait_until(lambda: report_row(settings, run_id).report_outcome, "the report's delivery to end", 60)
        scraped = worker.scrape()
    logs = log_tail(worker.log)
    assert status["status"] == "completed", logs
    assert status["accounts"]["succeeded"] == 2 and status["accounts"]["failed"] == 2
    assert summaries(settings, run_id) == 2
    row = report_row(settings, run_id)
    assert (row.report_outcome, row.report_attempts) == ("failed", 3), logs
    assert total(scraped, "balances_run_reports_total", outcome="failed") == 1
    assert total(scraped, "balances_run_reports_total", outcome="sent") == 0
    text = worker.log.read_text(errors="replace")
    assert "path-secret" not in text and "query-secret" not in text and SECRET not in text
