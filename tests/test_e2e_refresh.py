"""End to end: the ``balances`` CLI dispatches to a real ``celery -A app worker`` over real Redis,
which refreshes from the sandbox into real PostgreSQL. Counters are read from the worker's /metrics."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.store import repo
from app.store.db import session_scope
from tests.support.data import seed_tenant
from tests.support.metrics import sum_scrape, total
from tests.support.processes import ENCRYPTION_KEY, Worker, run_cli, run_worker, service_env

pytestmark = pytest.mark.e2e

ACCOUNT_ROUTE = "GET /users/{id_user}/accounts/{id_account}"


@pytest.fixture(scope="module")
def worker(
    pg_migrated: str, redis_url: str, sandbox_server: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    env = service_env(pg_migrated, redis_url, sandbox_server)
    with run_worker(env, tmp_path_factory.mktemp("worker") / "worker.log") as w:
        yield w


def refresh(worker: Worker, tenant: str, account: str, *extra: str, actor: str = "alice") -> tuple[int, dict]:
    proc = run_cli(
        worker.env, "--as", actor, "refresh", "--tenant", tenant, "--account", account, "--json", *extra
    )
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    assert ENCRYPTION_KEY not in proc.stdout + proc.stderr
    return proc.returncode, doc


def test_refresh_through_cli_and_worker_succeeds(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-ok")
    acc = t.account_ids[0]
    before = worker.scrape()

    code, doc = refresh(worker, "e2e-ok", acc)

    assert code == 0, doc
    assert {b["balanceType"] for b in doc["balances"]} >= {"current"}
    cur = next(b for b in doc["balances"] if b["balanceType"] == "current")
    assert str(cur["currentBalance"]) == str(t.user.accounts[t.external[acc]].balance)
    after = worker.scrape()
    name = "openbanking_balances_refreshed_total"
    assert total(after, name, trigger="on_demand") == total(before, name, trigger="on_demand") + 1
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "e2e-ok", acc)
        assert audit.outcome == "succeeded" and audit.task_id and audit.attempts == 1
    events = [e for e in worker.telemetry() if e.get("taskId") == audit.task_id]
    assert [e["event"] for e in events] == ["openbanking.balances.refreshed"]
    assert events[0]["properties"]["balanceCount"] == len(doc["balances"])  # type: ignore[index]


def test_a_503_then_200_account_succeeds_after_one_retry(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-retry")
    acc = t.account_ids[0]
    ext = t.external[acc]
    sandbox.state.scripted[ext] = deque([(503, None)])
    before = worker.scrape()

    code, doc = refresh(worker, "e2e-retry", acc)

    assert code == 0, doc
    after = worker.scrape()
    assert total(after, "openbanking_balance_refresh_retries_total", reason="provider_unavailable") == (
        total(before, "openbanking_balance_refresh_retries_total", reason="provider_unavailable") + 1
    )
    assert (
        total(after, "openbanking_balances_refreshed_total")
        == total(before, "openbanking_balances_refreshed_total") + 1
    )
    assert total(after, "openbanking_balances_refresh_failed_total") == total(
        before, "openbanking_balances_refresh_failed_total"
    )
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "e2e-retry", acc)
        assert (audit.outcome, audit.attempts) == ("succeeded", 2)
    events = [e for e in worker.telemetry() if e.get("taskId") == audit.task_id]
    assert [e["event"] for e in events] == [
        "openbanking.balances.refreshed"
    ]  # one event, not one per attempt


def test_sca_required_fails_with_needs_user_action_and_no_retry(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-sca")
    acc = t.account_ids[0]
    next(iter(t.user.connections.values())).state = "SCARequired"
    calls_before = sandbox.state.calls_by_user[t.user.id]
    before = worker.scrape()

    code, doc = refresh(worker, "e2e-sca", acc)

    assert code == 1
    assert doc["error"]["reason"] == "needs_user_action"
    assert "reconnect" in doc["error"]["message"]
    assert sandbox.state.calls_by_user[t.user.id] - calls_before == 1  # one read, no retry
    after = worker.scrape()
    failed = "openbanking_balances_refresh_failed_total"
    assert (
        total(after, failed, reason="needs_user_action")
        == total(before, failed, reason="needs_user_action") + 1
    )
    assert sum_scrape(after, "openbanking_balance_refresh_retries_total") == sum_scrape(
        before, "openbanking_balance_refresh_retries_total"
    )
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "e2e-sca", acc)
        assert (audit.outcome, audit.reason, audit.attempts) == ("failed", "needs_user_action", 1)
    events = [e for e in worker.telemetry() if e.get("taskId") == audit.task_id]
    assert [e["event"] for e in events] == ["openbanking.balances.refresh_failed"]
    assert events[0]["properties"]["error"] == doc["error"]["message"]  # type: ignore[index]


def test_non_admin_is_denied_and_nothing_is_dispatched(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-deny")
    calls_before = sandbox.state.calls_by_user[t.user.id]

    code, doc = refresh(worker, "e2e-deny", t.account_ids[0], actor="mallory")

    assert code == 3
    assert doc["error"]["reason"] == "policy_denied"
    assert 'requires "admin" auth level' in doc["error"]["message"]
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "e2e-deny")
        assert (audit.reason, audit.actor, audit.task_id) == ("policy_denied", "mallory", None)
    assert sandbox.state.calls_by_user[t.user.id] == calls_before


def test_no_wait_prints_the_task_id_and_show_reads_the_store(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-nowait")
    acc = t.account_ids[0]
    proc = run_cli(
        worker.env, "--as", "alice", "refresh", "--tenant", "e2e-nowait", "--account", acc, "--no-wait"
    )
    assert proc.returncode == 0, proc.stderr
    task_id = proc.stdout.strip()
    assert len(task_id) == 36
    from app.refresh.outcomes import Succeeded, wait_for

    outcome = wait_for(settings, task_id, None, timeout=60, poll=0.1)
    assert isinstance(outcome, Succeeded), "no outcome"
    out = outcome.output
    shown = run_cli(worker.env, "--as", "alice", "show", "--tenant", "e2e-nowait", "--json")
    doc = json.loads(shown.stdout)
    assert [b["id"] for b in doc["balances"]] == [b.id for b in out.balances]


def test_powens_link_reads_the_token_from_stdin_only(
    worker: Worker, settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    seed_tenant(settings, sandbox, "e2e-link")
    user = sandbox.state.create_user()
    proc = run_cli(
        worker.env,
        "--as",
        "alice",
        "powens",
        "link",
        "--tenant",
        "e2e-link",
        "--user-id",
        str(user.id),
        stdin=user.token + "\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert user.token not in proc.stdout + proc.stderr
    sync = run_cli(worker.env, "--as", "alice", "accounts", "sync", "--tenant", "e2e-link", "--json")
    assert sync.returncode == 0, sync.stderr
    listed = json.loads(
        run_cli(worker.env, "--as", "alice", "accounts", "list", "--tenant", "e2e-link", "--json").stdout
    )
    assert {a["externalId"] for a in listed} >= {str(i) for i in user.accounts}
    assert all(a["tenantId"] == "e2e-link" and a["userId"] for a in listed)
    assert user.token not in worker.log.read_text()


def test_worker_logs_are_json_with_context_and_never_carry_a_secret(
    worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "e2e-logs")
    acc = t.account_ids[0]
    code, _doc = refresh(worker, "e2e-logs", acc)
    assert code == 0
    lines = worker.log_lines()
    ready = next(i for i, line in enumerate(lines) if "ready." in line)
    docs = []
    for line in lines[ready:]:
        if not line.strip() or line.startswith("worker: Warm shutdown"):
            continue
        docs.append(json.loads(line))  # every line after the banner is one JSON document
    mine = [d for d in docs if d.get("account_id") == acc and d.get("logger") == "app.worker.tasks"]
    assert mine and all(d["tenant_id"] == "e2e-logs" and d["task_id"] for d in mine)
    text = "\n".join(lines)
    secrets = [t.user.token, ENCRYPTION_KEY] + [a.iban for a in t.user.accounts.values() if a.iban]
    for secret in secrets:
        assert secret not in text
