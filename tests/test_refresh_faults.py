"""Each finding of the fault review, reproduced through the handler on real PostgreSQL, Redis and the
sandbox over HTTP (the fault-injection suite with real processes is tests/test_faults.py)."""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select

from app.admin.accounts import sync_accounts
from app.config import Settings
from app.errors import Reason
from app.nightly import pipeline
from app.refresh.coordination import get_coordinator, throttle
from app.refresh.deps import Deps
from app.refresh.handler import execute, give_up_refresh
from app.refresh.outcomes import Attempt, Failed, Requeue, Retry, Succeeded
from app.store import repo, runs
from app.store.db import session_scope
from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, ForcedSync, RunItem, RunTenant
from app.store.states import AccountStatus, ItemStatus, TenantStatus, Trigger
from tests.support.data import ADMIN_ACTOR, nightly_run, seed_tenant
from tests.support.metrics import failed_total

ACCOUNTS_LIST = "GET /users/{id_user}/accounts"
ONE_ACCOUNT = "GET /users/{id_user}/accounts/{id_account}"
FORCED_SYNC = "PUT /users/{id_user}/connections/{id_connection}"


def scheduled(settings: Settings, tenant: str, account: str, run_id: str, number: int = 1) -> object:
    """One attempt of a nightly refresh, as the worker runs it (in the run keyed ``run_id``)."""
    run_id = nightly_run(settings, run_id)
    attempt = Attempt(number, settings.max_attempts, f"{run_id}:{account}", run_id)
    return execute(
        {"tenantId": tenant, "accountId": account}, "system:scheduler", Trigger.SCHEDULED, attempt=attempt
    )


def on_demand(tenant: str, account: str, task_id: str, number: int = 1, **extra: object) -> object:
    raw = {"tenantId": tenant, "accountId": account, **extra}
    return execute(raw, "alice", Trigger.ON_DEMAND, attempt=Attempt(number, 3, task_id))


def status_of(settings: Settings, account_id: str) -> str:
    with session_scope(settings) as s:
        row = s.get(BankAccount, account_id)
        assert row is not None
        return row.status


def test_one_unparsable_account_fails_alone_and_its_siblings_share_one_read(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-poison", accounts=3)
    bad = t.account_ids[1]
    sandbox.state.wire_overrides[t.external[bad]] = {
        "currency": {"id": "ZZZ", "name": "?", "symbol": "?", "precision": 2}
    }
    calls = sandbox.state.calls[ACCOUNTS_LIST]

    outcomes = {a: scheduled(settings, "f-poison", a, "run-poison") for a in t.account_ids}

    assert isinstance(outcomes[bad], Failed) and outcomes[bad].error.reason is Reason.INVALID_RESPONSE
    assert "unknown currency" in outcomes[bad].error.message
    assert all(isinstance(outcomes[a], Succeeded) for a in t.account_ids if a != bad)
    assert sandbox.state.calls[ACCOUNTS_LIST] - calls == 1


def test_a_failed_shared_read_is_shared_by_the_whole_attempt_then_read_again(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-503", accounts=3)
    sandbox.state.scripted_users[t.user.id] = deque([(503, None)])
    calls = sandbox.state.calls[ACCOUNTS_LIST]

    first = []
    for account in t.account_ids:
        first.append(scheduled(settings, "f-503", account, "run-503", number=1))
        time.sleep(0.6)  # the tasks of one attempt arrive over seconds, not within one
    assert all(isinstance(o, Retry) and o.error.reason is Reason.PROVIDER_UNAVAILABLE for o in first)
    assert sandbox.state.calls[ACCOUNTS_LIST] - calls == 1  # one Powens call for the whole attempt

    second = [scheduled(settings, "f-503", a, "run-503", number=2) for a in t.account_ids]
    assert all(isinstance(o, Succeeded) for o in second)
    assert sandbox.state.calls[ACCOUNTS_LIST] - calls == 2  # the next attempt read Powens afresh


def test_an_account_missing_from_one_listing_is_read_directly_and_never_deleted(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-hidden", accounts=2)
    hidden = t.account_ids[0]
    sandbox.state.hidden.add(t.external[hidden])  # the list shifted or was cut: this one is not in it
    direct = sandbox.state.calls[ONE_ACCOUNT]

    outcomes = [scheduled(settings, "f-hidden", a, "run-hidden") for a in t.account_ids]

    assert all(isinstance(o, Succeeded) for o in outcomes)
    assert sandbox.state.calls[ONE_ACCOUNT] - direct == 1  # asked Powens about that one account
    assert status_of(settings, hidden) == AccountStatus.ACTIVE
    run_id, _ = runs.create_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    assert pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None) == 2
    with session_scope(settings) as s:
        planned = set(s.scalars(select(RunItem.account_id).where(RunItem.run_id == run_id)))
    assert hidden in planned  # still refreshed every night


def test_disabled_at_powens_leaves_the_runs_and_comes_back_when_listed_again(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-disabled", accounts=2)
    acc, sibling = t.account_ids
    sacc = t.user.accounts[t.external[acc]]
    sacc.disabled = datetime.now(UTC)

    outcome = scheduled(settings, "f-disabled", acc, "run-d1")
    assert isinstance(outcome, Failed) and outcome.error.reason is Reason.NOT_FOUND
    assert status_of(settings, acc) == AccountStatus.DISABLED  # no longer "active, failing every night"

    sacc.disabled = None  # re-enabled at the bank: the next shared read lists it active again
    assert isinstance(scheduled(settings, "f-disabled", sibling, "run-d2"), Succeeded)
    assert status_of(settings, acc) == AccountStatus.ACTIVE


def test_deleted_at_powens_only_on_its_own_word(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-deleted", accounts=1)
    acc = t.account_ids[0]
    t.user.accounts[t.external[acc]].deleted = datetime.now(UTC)
    outcome = scheduled(settings, "f-deleted", acc, "run-del")
    assert isinstance(outcome, Failed) and outcome.error.reason is Reason.NOT_FOUND
    assert status_of(settings, acc) == AccountStatus.DELETED
    # Discovery never deletes by absence: an account Powens stops listing keeps its status.
    other = seed_tenant(settings, sandbox, "f-absent", accounts=2)
    sandbox.state.hidden.add(other.external[other.account_ids[0]])
    sync_accounts("f-absent", ADMIN_ACTOR, Deps.default(settings))
    assert status_of(settings, other.account_ids[0]) == AccountStatus.ACTIVE


def test_a_forced_refresh_forces_one_sync_across_its_retries(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-force", accounts=1)
    acc = t.account_ids[0]
    sandbox.state.scripted[t.external[acc]] = deque([(503, None)])
    puts = sandbox.state.calls[FORCED_SYNC]

    assert isinstance(on_demand("f-force", acc, "force-1", 1, forceRefresh=True), Retry)
    assert isinstance(on_demand("f-force", acc, "force-1", 2, forceRefresh=True), Succeeded)

    assert sandbox.state.calls[FORCED_SYNC] - puts == 1
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 1


def test_a_forced_sync_that_never_left_gives_its_slot_back(settings, sandbox) -> None:
    limited = settings.model_copy(update={"powens_rate_limit": 1.0, "rate_limit_max_wait": 0.0})
    t = seed_tenant(settings, sandbox, "f-throttled", accounts=1)
    deps = Deps(limited)
    throttle(get_coordinator(limited), 0.0)  # this second's one call is taken
    outcome = execute(
        {"tenantId": "f-throttled", "accountId": t.account_ids[0], "forceRefresh": True},
        "alice",
        Trigger.ON_DEMAND,
        attempt=Attempt(1, 3, "force-throttled"),
        deps=deps,
    )
    assert isinstance(outcome, Requeue)
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0


def test_a_409_on_forced_sync_reads_anyway_and_gives_the_slot_back(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-409", accounts=1)
    conn = next(iter(t.user.connections))
    sandbox.state.scripted_syncs[conn] = deque([(409, None)])
    outcome = on_demand("f-409", t.account_ids[0], "force-409", forceRefresh=True)
    assert isinstance(outcome, Succeeded) and outcome.output.balances
    assert outcome.output.errors and "already running" in outcome.output.errors[0]
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0  # no sync was started


def test_an_uncleared_record_leaves_when_powens_stops_sending_coming(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-coming", accounts=1)
    acc = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc]]
    sacc.coming = Decimal("-42.00")
    assert isinstance(scheduled(settings, "f-coming", acc, "run-coming-1"), Succeeded)
    sacc.coming = None
    sacc.last_update = (sacc.last_update or datetime.now(UTC)) + timedelta(minutes=5)
    out = scheduled(settings, "f-coming", acc, "run-coming-2")
    assert isinstance(out, Succeeded)
    assert [b.balance_type for b in out.output.balances] == ["current"]
    with session_scope(settings) as s:
        kinds = set(s.scalars(select(AccountBalance.balance_type).where(AccountBalance.account_id == acc)))
        history = set(
            s.scalars(select(BalanceSnapshot.balance_type).where(BalanceSnapshot.account_id == acc))
        )
    assert kinds == {"current"} and history == {"current", "uncleared"}  # history stays


def test_the_account_row_is_never_overwritten_by_an_older_answer(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-older", accounts=1)
    acc = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc]]
    sacc.balance = Decimal("100.00")
    on_demand("f-older", acc, "older-1")
    sacc.balance = Decimal("1.00")
    sacc.last_update = (sacc.last_update or datetime.now(UTC)) - timedelta(hours=3)
    on_demand("f-older", acc, "older-2")
    with session_scope(settings) as s:
        row = s.get(BankAccount, acc)
        assert row is not None and row.balance == Decimal("100.00")


def test_amounts_are_stored_digit_for_digit_and_absurd_ones_are_invalid(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-exact", accounts=2)
    exact, absurd = t.account_ids
    sandbox.state.wire_overrides[t.external[exact]] = {
        "balance": Decimal("0.123456789012345678"),
        "coming": None,
    }
    sandbox.state.wire_overrides[t.external[absurd]] = {"balance": Decimal("1e20")}
    ok = on_demand("f-exact", exact, "exact-1")
    assert isinstance(ok, Succeeded)
    assert ok.output.balances[0].current_balance == Decimal("0.123456789012345678")
    assert ok.output.errors and "more decimal places than" in ok.output.errors[0]
    with session_scope(settings) as s:
        assert repo.latest_balances(s, "f-exact", exact)[0].current_balance == Decimal("0.123456789012345678")
    bad = on_demand("f-exact", absurd, "absurd-1", number=1)
    assert isinstance(bad, Failed) and bad.error.reason is Reason.INVALID_RESPONSE  # not retried


def test_a_null_balance_is_no_balance_yet_not_a_failure(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-null", accounts=1)
    acc = t.account_ids[0]
    before = on_demand("f-null", acc, "null-1")
    assert isinstance(before, Succeeded)
    failures = failed_total("invalid_response")
    sandbox.state.wire_overrides[t.external[acc]] = {"balance": None, "coming": None, "currency": None}
    after = on_demand("f-null", acc, "null-2")
    assert isinstance(after, Succeeded)
    assert after.output.errors and "no balance yet" in after.output.errors[0]
    assert after.output.balances == before.output.balances  # the previous balances stay
    assert failed_total("invalid_response") == failures


def test_an_unreachable_database_requeues_the_refresh_instead_of_failing_it(settings, sandbox) -> None:
    down = settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:9/nowhere"})
    outcome = execute(
        {"tenantId": "t", "accountId": "a"},
        "alice",
        Trigger.ON_DEMAND,
        attempt=Attempt(1, 3, "db-down"),
        deps=Deps(down),
    )
    assert isinstance(outcome, Requeue) and outcome.infrastructure
    assert "OperationalError" in outcome.why


def test_a_poison_refresh_ends_as_a_recorded_failure(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-poison-msg", accounts=1)
    acc = t.account_ids[0]
    run_id, _ = runs.create_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    assert pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None) == 1
    raw = {"tenantId": "f-poison-msg", "accountId": acc}
    why = "given up after 6 deliveries: the worker running it died each time"
    outcome = give_up_refresh(settings, f"{run_id}:{acc}", run_id, raw, "system:scheduler", "scheduled", why)
    assert isinstance(outcome, Failed) and "given up after 6 deliveries" in outcome.error.message
    with session_scope(settings) as s:
        [audit] = repo.attempts(s, "f-poison-msg", acc)
        assert (audit.outcome, audit.reason) == ("failed", "internal")
        item = s.get(RunItem, (run_id, acc))
        assert item is not None and item.status == ItemStatus.FAILED


def test_discovery_retries_a_transient_503(settings, sandbox) -> None:
    t = seed_tenant(settings, sandbox, "f-discovery", accounts=2)
    sandbox.state.scripted_users[t.user.id] = deque([(503, None)])
    result = sync_accounts("f-discovery", ADMIN_ACTOR, Deps(settings, sleep=lambda _s: None))
    assert result.failed == 0 and result.synced == 2


def test_summaries_use_the_business_day_the_run_started_with(settings, sandbox) -> None:
    from app.nightly import pipeline
    from app.reports import jobs
    from app.reports.summary import latest_summary

    seed_tenant(settings, sandbox, "f-day", accounts=1)
    yesterday = date.today() - timedelta(days=1)
    run_id, _ = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor="system:scheduler", tick="t", business_day=yesterday
    )
    with session_scope(settings) as s:
        s.add(
            RunTenant(
                run_id=run_id,
                tenant_id="f-day",
                status=TenantStatus.SUMMARISING,
                expected=0,
                remaining=0,
                stale=0,
            )
        )
    assert jobs.summarize_tenant(settings, run_id, "f-day")
    with session_scope(settings) as s:
        summary = latest_summary(s, "f-day", run_id)
    assert summary is not None and summary["businessDay"] == yesterday.isoformat()
