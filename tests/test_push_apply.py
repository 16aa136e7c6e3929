"""The worker side of the push path as plain code on the real database (no broker): what a queued event
does to the store, in the orders Powens may deliver events."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from app import jsonio
from app.config import Settings
from app.devtools.sandbox import SAccount, Sandbox
from app.push import apply as apply_module
from app.push.apply import apply
from app.push.events import Event, reduce
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Attempt, Failed, Succeeded
from app.store.db import session_scope
from app.store.models import AccountBalance, BankAccount, BankConnection, RefreshAttempt
from app.store.states import AccountStatus, Trigger
from tests.support.data import Seeded, nightly_run, seed_tenant


def push(settings: Settings, event: Event, body: dict[str, Any]) -> list[str]:
    """The event as the receiver queues it (reduced, JSON text), applied as the worker applies it."""
    payload = jsonio.dumps(reduce(event, jsonio.loads(jsonio.dumps(body))))
    return [a.outcome.value for a in apply(Deps(settings), payload, datetime.now(UTC))]


def only_connection(t: Seeded) -> Any:
    return next(iter(t.user.connections.values()))


def nightly_refresh(settings: Settings, t: Seeded, account_id: str) -> Any:
    """One nightly-run refresh of the account (a run id: the push-fresh skip applies)."""
    run_id = nightly_run(settings, "run-push-test")
    return execute(
        {"tenantId": t.tenant_id, "accountId": account_id},
        "system:scheduler",
        Trigger.SCHEDULED,
        attempt=Attempt(task_id=f"{run_id}:{account_id}", run_id=run_id),
        deps=Deps(settings),
    )


def test_an_account_synced_push_stores_its_balances(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "pa-account", accounts=1)
    acc = t.user.accounts[t.external[t.account_ids[0]]]
    acc.balance = Decimal("1234.56")
    assert push(settings, Event.ACCOUNT_SYNCED, acc.wire(None)) == ["stored"]
    with session_scope(settings) as s:
        row = s.scalars(select(AccountBalance).where(AccountBalance.account_id == t.account_ids[0])).first()
        assert row is not None and row.current_balance == Decimal("1234.56")


def test_a_late_push_does_not_bring_back_a_deleted_connection(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "pa-deleted", accounts=2)
    conn = only_connection(t)
    sandbox.state.sync_connection(t.user, conn, push=False)
    late = sandbox.state.connection_synced_body(t.user, conn)  # queued before the delete, applied after
    assert push(settings, Event.CONNECTION_DELETED, {"id": conn.id, "id_user": t.user.id}) == [
        "status_updated"
    ]
    assert push(settings, Event.CONNECTION_SYNCED, late) == ["deleted", "deleted"]
    with session_scope(settings) as s:
        statuses = s.scalars(select(BankAccount.status).where(BankAccount.tenant_id == "pa-deleted")).all()
        active = s.scalars(
            select(BankConnection.active).where(BankConnection.tenant_id == "pa-deleted")
        ).all()
        written = s.scalars(select(RefreshAttempt).where(RefreshAttempt.tenant_id == "pa-deleted")).all()
    assert statuses == [AccountStatus.DELETED, AccountStatus.DELETED] and active == [False]
    assert written == []


def test_an_older_event_that_loses_the_race_to_a_newer_one_writes_nothing(
    settings: Settings, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = seed_tenant(settings, sandbox, "pa-race", accounts=1)
    conn = only_connection(t)
    sandbox.state.sync_connection(t.user, conn, push=False)
    older = sandbox.state.connection_synced_body(t.user, conn)
    time.sleep(1.05)  # Powens' last_update has one-second resolution
    sandbox.state.sync_connection(t.user, conn, push=False)
    newer = sandbox.state.connection_synced_body(t.user, conn)
    real_judge = apply_module.judge
    newer_outcomes: list[list[str]] = []
    raced: list[bool] = []

    def newer_commits_first(*args: Any, **kw: Any) -> Any:  # the newer lands while the older is judged
        if not raced:
            raced.append(True)
            newer_outcomes.append(push(settings, Event.CONNECTION_SYNCED, newer))
        return real_judge(*args, **kw)

    monkeypatch.setattr(apply_module, "judge", newer_commits_first)
    assert push(settings, Event.CONNECTION_SYNCED, older) == ["out_of_order"]
    assert newer_outcomes == [["stored"]]
    with session_scope(settings) as s:
        rows = s.scalars(select(RefreshAttempt).where(RefreshAttempt.tenant_id == "pa-race")).all()
    assert len(rows) == 1  # the newer one's only


def test_an_account_powens_found_is_registered_from_the_push_in_its_users_tenant(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "pa-new", accounts=2)
    conn = only_connection(t)
    state = sandbox.state
    with state.lock:  # the bank shows a third account on this connection
        new_id = max(t.user.accounts) + 1000
        t.user.accounts[new_id] = SAccount(
            id=new_id,
            id_connection=conn.id,
            id_user=t.user.id,
            name="New savings",
            number="12345678901",
            iban="FR7630004000031234567890143",
            bic=None,
            balance=Decimal("10.00"),
            coming=None,
            currency="EUR",
            type="savings",
            usage=None,
            last_update=None,
        )
    sandbox.state.sync_connection(t.user, conn, push=False)
    outcomes = push(settings, Event.CONNECTION_SYNCED, sandbox.state.connection_synced_body(t.user, conn))
    assert sorted(outcomes) == ["registered", "stored", "stored"]
    with session_scope(settings) as s:
        new = s.scalars(select(BankAccount).where(BankAccount.external_id == new_id)).one()
        balance = s.scalars(select(AccountBalance).where(AccountBalance.account_id == new.id)).one()
    assert new.tenant_id == "pa-new" and balance.current_balance == t.user.accounts[new_id].balance
    assert new.iban_masked is None  # the push carries no IBAN: discovery fills the masked form later


def test_the_nightly_run_reads_again_an_account_whose_last_push_said_the_connection_needs_its_user(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "pa-sca", accounts=1)
    conn = only_connection(t)
    sandbox.state.sync_connection(t.user, conn, push=False)
    assert push(settings, Event.CONNECTION_SYNCED, sandbox.state.connection_synced_body(t.user, conn)) == [
        "stored"
    ]
    fresh = nightly_refresh(settings, t, t.account_ids[0])
    assert isinstance(fresh, Succeeded) and "refreshed from a Powens push" in (fresh.output.errors or [""])[0]
    conn.state = "SCARequired"  # the next sync failed: same last_update, a state that needs the user
    body = sandbox.state.connection_synced_body(t.user, conn)
    assert push(settings, Event.CONNECTION_SYNCED, body) == ["needs_user"]
    run2 = nightly_run(settings, "run-push-test-2")
    again = execute(
        {"tenantId": "pa-sca", "accountId": t.account_ids[0]},
        "system:scheduler",
        Trigger.SCHEDULED,
        attempt=Attempt(task_id=f"{run2}:{t.account_ids[0]}", run_id=run2),
        deps=Deps(settings),
    )
    assert isinstance(again, Failed) and again.error.reason.value == "needs_user_action"  # not hidden
