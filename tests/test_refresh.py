"""The command handler against real PostgreSQL and the Powens sandbox (over HTTP)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.errors import Reason, RefreshError
from app.policy import SCHEDULER
from app.refresh.deps import Deps
from app.refresh.handler import check_policy, refresh_balances
from app.refresh.outcomes import Attempt, RetryLater
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, ForcedSync, RefreshAttempt
from app.store.states import Trigger
from tests.support.data import nightly_run, seed_tenant, telemetry_events
from tests.support.metrics import failed_total, refreshed_total


def _inp(seeded_tenant: str, account_id: str, **extra: object) -> dict[str, object]:
    return {"tenantId": seeded_tenant, "accountId": account_id, **extra}


def _count(settings: Settings, model: type) -> int:
    with session_scope(settings) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_success_writes_latest_records_and_audit(
    settings: Settings, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    t = seed_tenant(settings, sandbox, "t-ok")
    acc_id = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc_id]]
    sacc.balance, sacc.coming = Decimal("1000.10"), Decimal("-0.20")
    before = refreshed_total()
    caplog.set_level(logging.INFO, logger="openbanking.telemetry")

    out = refresh_balances(_inp("t-ok", acc_id), "alice", Trigger.ON_DEMAND)

    by_type = {b.balance_type: b for b in out.balances}
    assert set(by_type) == {"current", "uncleared"}
    assert by_type["current"].current_balance == Decimal("1000.10")
    assert by_type["current"].available_balance == Decimal("999.90")
    assert by_type["uncleared"].current_balance == Decimal("-0.20")
    assert by_type["current"].tenant_id == "t-ok" and by_type["current"].currency == sacc.currency
    assert by_type["current"].last_updated_at == sacc.last_update
    assert by_type["current"].metadata and by_type["current"].metadata["powensAccountId"] == sacc.id
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(AccountBalance)) == 2
        # On demand, the latest records only: the day's snapshot is the nightly run's (one point in
        # time for every account of the day).
        assert repo.snapshots(s, acc_id) == []
        [audit] = repo.attempts(s, "t-ok", acc_id)
        assert (audit.outcome, audit.actor, audit.trigger, audit.balance_count) == (
            "succeeded",
            "alice",
            "on_demand",
            2,
        )
        assert audit.powens_request_id and audit.powens_request_id.startswith("sbx-")
    assert refreshed_total() == before + 1
    [event] = telemetry_events(caplog.records)
    assert event["event"] == "openbanking.balances.refreshed"
    assert event["properties"] == {
        "tenantId": "t-ok",
        "accountId": acc_id,
        "refreshedAt": event["properties"]["refreshedAt"],
        "balanceCount": 2,
    }


def test_balance_types_filter_only_refreshes_those_types(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-filter")
    acc_id = t.account_ids[0]
    t.user.accounts[t.external[acc_id]].coming = Decimal("-5")
    out = refresh_balances(_inp("t-filter", acc_id, balanceTypes=["current", "credit"]), "alice", "on_demand")
    assert [b.balance_type for b in out.balances] == ["current"]
    assert out.errors and "'credit' is not provided" in out.errors[0]
    with session_scope(settings) as s:
        assert [b.balance_type for b in repo.latest_balances(s, "t-filter", acc_id)] == ["current"]


def test_failure_keeps_previous_balances_and_records_why(
    settings: Settings, sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    t = seed_tenant(settings, sandbox, "t-fail")
    acc_id = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc_id]]
    sacc.balance = Decimal("50.00")
    refresh_balances(_inp("t-fail", acc_id), "alice", "on_demand")

    sacc.balance = Decimal("75.00")
    sandbox.state.malformed.add(sacc.id)
    before = failed_total("invalid_response")
    caplog.set_level(logging.INFO, logger="openbanking.telemetry")
    try:
        with pytest.raises(RefreshError) as info:
            refresh_balances(_inp("t-fail", acc_id), "alice", "on_demand")
    finally:
        sandbox.state.malformed.discard(sacc.id)
    assert info.value.reason is Reason.INVALID_RESPONSE
    with session_scope(settings) as s:
        [cur] = repo.latest_balances(s, "t-fail", acc_id, ["current"])
        assert cur.current_balance == Decimal("50.00")
        audits = repo.attempts(s, "t-fail", acc_id)
        assert [a.outcome for a in audits] == ["succeeded", "failed"]
        assert audits[1].reason == "invalid_response" and "invalid payload" in (audits[1].message or "")
    assert failed_total("invalid_response") == before + 1
    events = telemetry_events(caplog.records)
    assert [e["event"] for e in events] == ["openbanking.balances.refresh_failed"]
    assert events[0]["properties"]["error"] == info.value.message


def test_retryable_failure_before_the_last_attempt_records_nothing_terminal(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "t-retry")
    acc_id = t.account_ids[0]
    sandbox.state.scripted[t.external[acc_id]] = __import__("collections").deque([(503, None), (503, None)])
    before = failed_total("provider_unavailable")
    with pytest.raises(RetryLater) as later:
        refresh_balances(_inp("t-retry", acc_id), "alice", "on_demand", attempt=Attempt(1, 2, "task-r"))
    assert later.value.error.reason is Reason.PROVIDER_UNAVAILABLE
    assert _count(settings, RefreshAttempt) == 0
    with pytest.raises(RefreshError):
        refresh_balances(_inp("t-retry", acc_id), "alice", "on_demand", attempt=Attempt(2, 2, "task-r"))
    assert failed_total("provider_unavailable") == before + 1
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "t-retry")
        assert (audit.outcome, audit.reason, audit.attempts, audit.task_id) == (
            "failed",
            "provider_unavailable",
            2,
            "task-r",
        )


def test_redelivered_task_is_idempotent(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-idem")
    acc_id = t.account_ids[0]
    first = refresh_balances(_inp("t-idem", acc_id), "alice", "on_demand", attempt=Attempt(1, 3, "task-1"))
    calls = sandbox.state.stats()["total"]
    counted = refreshed_total()
    again = refresh_balances(_inp("t-idem", acc_id), "alice", "on_demand", attempt=Attempt(1, 3, "task-1"))
    assert again.balances == first.balances
    assert sandbox.state.stats()["total"] == calls  # no Powens call for a replay
    assert refreshed_total() == counted  # and no second count
    assert _count(settings, RefreshAttempt) == 1
    assert _count(settings, AccountBalance) == len(first.balances)


def test_same_day_nightly_refreshes_update_one_snapshot_row(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-day")
    acc_id = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc_id]]
    sacc.coming = None
    day = settings.business_day(datetime.now(UTC))

    def nightly(name: str) -> None:
        run_id = nightly_run(settings, name)
        attempt = Attempt(1, 3, f"{run_id}:{acc_id}", run_id, business_day=day)
        refresh_balances(_inp("t-day", acc_id), SCHEDULER.name, "scheduled", attempt=attempt)

    nightly("day-1")
    sacc.balance += Decimal("10")
    sacc.last_update = (sacc.last_update or datetime.now(UTC)) + timedelta(minutes=1)
    nightly("day-2")  # a second run of the same business day (re-run by hand)
    with session_scope(settings) as s:
        [snap] = repo.snapshots(s, acc_id)
        assert (snap.current_balance, snap.day, snap.carried) == (sacc.balance, day, False)


def test_older_powens_data_never_replaces_a_newer_record(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-old")
    acc_id = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc_id]]
    refresh_balances(_inp("t-old", acc_id), "alice", "on_demand")
    newest = sacc.balance
    sacc.balance += Decimal("1")
    sacc.last_update = (sacc.last_update or datetime.now(UTC)) - timedelta(hours=3)
    out = refresh_balances(_inp("t-old", acc_id), "alice", "on_demand")
    cur = next(b for b in out.balances if b.balance_type == "current")
    assert cur.current_balance == newest
    assert out.errors and any("older than the stored record" in e for e in out.errors)


def test_another_tenants_account_is_not_found(settings: Settings, sandbox: Sandbox) -> None:
    a = seed_tenant(settings, sandbox, "t-a")
    seed_tenant(settings, sandbox, "t-b")
    calls = sandbox.state.stats()["total"]
    with pytest.raises(RefreshError) as info:
        refresh_balances(_inp("t-b", a.account_ids[0]), "alice", "on_demand")
    assert info.value.reason is Reason.NOT_FOUND
    assert "t-a" not in info.value.message
    assert sandbox.state.stats()["total"] == calls


def test_non_admin_is_policy_denied_audited_and_counted(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-pol")
    before = failed_total("policy_denied")
    with pytest.raises(RefreshError) as info:
        check_policy(_inp("t-pol", t.account_ids[0]), "mallory", Trigger.ON_DEMAND)
    assert info.value.reason is Reason.POLICY_DENIED
    assert 'Operation "openbanking.balances.refresh.v1.0.0" requires "admin" auth level' in info.value.message
    assert failed_total("policy_denied") == before + 1
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "t-pol")
        assert (audit.outcome, audit.reason, audit.actor) == ("failed", "policy_denied", "mallory")


def test_the_scheduler_is_a_builtin_admin(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-sched")
    before = refreshed_total("scheduled")
    refresh_balances(_inp("t-sched", t.account_ids[0]), SCHEDULER.name, Trigger.SCHEDULED)
    assert refreshed_total("scheduled") == before + 1


def test_sca_required_fails_with_needs_user_action_naming_the_reconnect_command(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "t-sca")
    acc_id = t.account_ids[0]
    conn = next(iter(t.user.connections.values()))
    conn.state = "SCARequired"
    with pytest.raises(RefreshError) as info:
        refresh_balances(_inp("t-sca", acc_id), "alice", "on_demand", attempt=Attempt(1, 3, "task-sca"))
    assert info.value.reason is Reason.NEEDS_USER_ACTION  # raised, not RetryLater: never retried
    assert f"connection {conn.id} needs the user (state SCARequired)" in info.value.message
    with session_scope(settings) as s:
        [c] = [c for _a, c, _u in repo.list_accounts(s, "t-sca")][:1]
        assert c.state == "SCARequired"
        # the command that makes a link, never a link (its temporary code must not sit in a message)
        assert f"balances connections reconnect-link --tenant t-sca --connection {c.id}" in info.value.message
        assert "code=" not in info.value.message


def test_transient_connection_state_keeps_data_with_a_note(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-transient")
    next(iter(t.user.connections.values())).state = "websiteUnavailable"
    out = refresh_balances(_inp("t-transient", t.account_ids[0]), "alice", "on_demand")
    assert out.balances and out.errors and "websiteUnavailable" in out.errors[0]


def test_forced_sync_honours_the_quota_of_four_per_day(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "t-force")
    acc_id = t.account_ids[0]
    puts = "PUT /users/{id_user}/connections/{id_connection}"
    start = sandbox.state.calls[puts]
    outputs = [
        refresh_balances(_inp("t-force", acc_id, forceRefresh=True), "alice", "on_demand") for _ in range(5)
    ]
    assert sandbox.state.calls[puts] - start == 4
    assert all(o.errors is None for o in outputs[:4])
    assert outputs[4].errors and "quota of 4" in outputs[4].errors[0]
    assert outputs[4].balances  # read anyway
    assert _count(settings, ForcedSync) == 4
    with session_scope(settings) as s:
        first = s.scalar(select(func.min(ForcedSync.at)))
    assert first is not None
    when = (first + timedelta(hours=24)).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    assert f"next forced sync allowed at {when}" in outputs[4].errors[0]  # when the quota frees a slot


def test_a_rate_limited_refresh_says_when_it_may_be_tried_again(settings: Settings, sandbox: Sandbox) -> None:
    from collections import deque

    from app.refresh.outcomes import replay

    t = seed_tenant(settings, sandbox, "t-429")
    acc = t.account_ids[0]
    sandbox.state.scripted[t.external[acc]] = deque([(429, 120.0)])
    before = datetime.now(UTC)
    with pytest.raises(RefreshError) as info:
        refresh_balances(_inp("t-429", acc), "alice", "on_demand", attempt=Attempt(3, 3, "task-429"))
    err = info.value
    assert err.reason is Reason.RATE_LIMITED and err.next_attempt_at is not None
    assert (
        before + timedelta(seconds=119) <= err.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=121)
    )
    assert "next attempt allowed at" in err.message
    assert err.as_json()["error"]["nextAttemptAt"].endswith("Z")
    replayed = replay(settings, "task-429")  # what the admin shell reads back from the audit row
    assert replayed is not None and replayed.error.next_attempt_at == err.next_attempt_at  # type: ignore[union-attr]


def test_deps_default_uses_the_installed_settings(settings: Settings) -> None:
    assert Deps.default().settings is settings
