"""The nightly refresh in batches (app.nightly.batch) as plain functions: real PostgreSQL, the sandbox
as Powens.

What a batch must keep from the single refresh: an outcome per account (audit row under its item's
task id, run item, counter), one Powens call per user, one bad account failing alone, nothing written
twice, retries per user, and an account missing from its list handed to the single refresh.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import redis
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.jsonio import loads
from app.nightly import pipeline
from app.nightly.batch import BatchResult, Item, run_batch, split_by_user
from app.refresh.deps import Deps
from app.store import runs
from app.store.db import get_engine, session_scope
from app.store.models import (
    AccountBalance,
    BalanceSnapshot,
    BankAccount,
    BankConnection,
    RefreshAttempt,
    RunItem,
    RunTenant,
)
from app.store.states import Trigger
from tests.support.data import Seeded, seed_tenant
from tests.support.metrics import refreshed_total


def plan(settings: Settings) -> tuple[str, list[Item]]:
    """A run planned in the database; its items as the planner would publish them."""
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="alice")
    pages: list[runs.Item] = []
    pipeline.plan_run(settings, run_id, lambda _r, page: pages.extend(page), lambda *_: None)
    return run_id, pages


def batch(settings: Settings, run_id: str, items: list[Item], attempt: int = 1) -> BatchResult:
    return run_batch(Deps.default(settings), run_id, items, date(2026, 11, 24), attempt)


@contextmanager
def counted(settings: Settings) -> Iterator[list[int]]:
    """SQL statements the database executes meanwhile (an executemany counts once per row)."""
    seen = [0]
    engine = get_engine(settings)

    def count(_c: object, _cur: object, _s: str, params: object, _x: object, many: bool) -> None:
        seen[0] += len(params) if many and isinstance(params, list | tuple) else 1  # type: ignore[arg-type]

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def while_reading(settings: Settings, change: Callable[[Session], object]) -> Deps:
    """Deps whose Powens client first commits ``change`` (another writer, between the batch's load
    and its answer), then reads the user's accounts."""
    deps = Deps.default(settings)
    real = deps.client.list_accounts_raw

    def meanwhile(token: str, user: int | str = "me", **kw: object) -> object:
        with session_scope(settings) as s:
            change(s)
        return real(token, user, **kw)  # type: ignore[arg-type]

    deps.client.list_accounts_raw = meanwhile  # type: ignore[method-assign]
    return deps


def seed(settings: Settings, sandbox: Sandbox, tenants: int, accounts: int) -> list[Seeded]:
    return [seed_tenant(settings, sandbox, f"t-{i}", accounts=accounts) for i in range(tenants)]


def audit_rows(settings: Settings, run_id: str) -> list[RefreshAttempt]:
    with session_scope(settings) as s:
        return list(s.scalars(select(RefreshAttempt).where(RefreshAttempt.run_id == run_id)))


def test_a_batch_reads_each_user_once_and_records_each_account_alone(
    settings: Settings, sandbox: Sandbox
) -> None:
    seeded = seed(settings, sandbox, tenants=4, accounts=3)
    exact = Decimal("98765432109876.123456789")  # no float holds it
    odd = seeded[0].account_ids[0]
    sandbox.state.wire_overrides[seeded[0].external[odd]] = {"balance": exact}
    run_id, items = plan(settings)
    before = refreshed_total("scheduled")
    sandbox.state.reset_stats()

    with counted(settings) as statements:
        result = batch(settings, run_id, items)

    assert (result.succeeded, result.failed, result.skipped) == (12, 0, 0)
    assert sandbox.state.stats()["calls"] == {"GET /users/{id_user}/accounts": 4}
    rows = audit_rows(settings, run_id)
    assert sorted(r.task_id or "" for r in rows) == sorted(i[0] for i in items)
    assert {r.outcome for r in rows} == {"succeeded"} and all(r.balance_count for r in rows)
    assert refreshed_total("scheduled") - before == 12
    assert sorted(result.emptied_tenants) == sorted(t.tenant_id for t in seeded)
    with session_scope(settings) as s:
        assert set(s.scalars(select(RunItem.status).where(RunItem.run_id == run_id))) == {"succeeded"}
        assert set(s.scalars(select(RunTenant.remaining).where(RunTenant.run_id == run_id))) == {0}
        snaps = s.scalar(select(func.count()).select_from(BalanceSnapshot))
        latest = s.scalar(select(func.count()).select_from(AccountBalance))
        assert snaps == latest and latest and latest >= 12
        current = dict(
            s.execute(
                select(AccountBalance.account_id, AccountBalance.current_balance).where(
                    AccountBalance.balance_type == "current"
                )
            ).all()
        )
    # Money goes through the batch's JSON exactly, digit for digit (Decimal in, NUMERIC stored).
    assert current.pop(odd) == exact
    for t in seeded:
        for account_id in t.account_ids:
            if account_id != odd:
                assert current[account_id] == t.user.accounts[t.external[account_id]].balance
    # Set-based: one row update per account, the rest a fixed few per batch and one per tenant (a
    # single refresh costs about fifteen per account).
    assert statements[0] <= len(items) + 10 + len(seeded), statements[0]


def test_a_second_delivery_of_a_batch_reads_nothing_and_writes_nothing(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed(settings, sandbox, tenants=2, accounts=2)
    run_id, items = plan(settings)
    batch(settings, run_id, items)
    sandbox.state.reset_stats()
    before = refreshed_total("scheduled")

    again = batch(settings, run_id, items)

    assert (again.succeeded, again.failed, again.skipped) == (0, 0, len(items))
    assert sandbox.state.stats()["total"] == 0
    assert len(audit_rows(settings, run_id)) == len(items)
    assert refreshed_total("scheduled") == before
    assert again.emptied_tenants == []


def test_one_unreadable_account_fails_alone_and_its_siblings_succeed(
    settings: Settings, sandbox: Sandbox
) -> None:
    (t,) = seed(settings, sandbox, tenants=1, accounts=3)
    bad = t.account_ids[1]
    sandbox.state.malformed.add(t.external[bad])
    run_id, items = plan(settings)

    result = batch(settings, run_id, items)

    assert (result.succeeded, result.failed) == (2, 1)
    by_account = {r.account_id: r for r in audit_rows(settings, run_id)}
    assert by_account[bad].outcome == "failed" and by_account[bad].reason == "invalid_response"
    assert {by_account[a].outcome for a in t.account_ids if a != bad} == {"succeeded"}


def test_a_user_whose_read_fails_retryably_comes_back_at_the_next_attempt_then_fails_at_the_last(
    settings: Settings, sandbox: Sandbox
) -> None:
    flaky, fine = seed(settings, sandbox, tenants=2, accounts=2)
    sandbox.state.scripted_users[flaky.user.id] = deque([(503, None)] * 10)
    run_id, items = plan(settings)

    first = batch(settings, run_id, items, attempt=1)

    assert first.succeeded == 2 and first.failed == 0
    assert sorted(i[2] for i in first.retry) == sorted(flaky.account_ids) and first.retry_in >= 0
    assert {r.account_id for r in audit_rows(settings, run_id)} == set(fine.account_ids)

    last = batch(settings, run_id, first.retry, attempt=settings.max_attempts)

    assert (last.succeeded, last.failed, last.retry) == (0, 2, [])
    failed = [r for r in audit_rows(settings, run_id) if r.outcome == "failed"]
    assert sorted(r.account_id or "" for r in failed) == sorted(flaky.account_ids)
    assert {r.attempts for r in failed} == {settings.max_attempts}
    assert last.emptied_tenants == [flaky.tenant_id]


def test_an_account_missing_from_its_users_list_goes_to_the_single_refresh(
    settings: Settings, sandbox: Sandbox
) -> None:
    (t,) = seed(settings, sandbox, tenants=1, accounts=3)
    missing = t.account_ids[0]
    sandbox.state.hidden.add(t.external[missing])
    run_id, items = plan(settings)

    result = batch(settings, run_id, items)

    assert [i[2] for i in result.single] == [missing]
    assert result.succeeded == 2
    with session_scope(settings) as s:
        status = s.scalar(
            select(RunItem.status).where(RunItem.run_id == run_id, RunItem.account_id == missing)
        )
    assert status == "pending"  # not deleted, not failed: the single refresh reads it itself
    assert result.emptied_tenants == []


def test_batches_never_split_a_powens_user() -> None:
    items = [Item(f"t{i}", "ten", f"a{i}", user) for i, user in enumerate([1, 1, 1, 2, 2, 3, 3, 3, 3, 4])]
    parts = split_by_user(items, 3)
    assert [len(p) for p in parts] == [3, 2, 4, 1]
    users_in = [{i[3] for i in p} for p in parts]
    assert all(not (a & b) for n, a in enumerate(users_in) for b in users_in[n + 1 :])


def test_pages_of_items_end_at_a_user_boundary(settings: Settings, sandbox: Sandbox) -> None:
    seed(settings, sandbox, tenants=3, accounts=3)
    run_id, _ = plan(settings)
    pages = list(runs.item_pages(settings, run_id, 4, pending_only=False))
    assert sum(len(p) for p in pages) == 9
    users = [{i[3] for i in p} for p in pages]
    assert all(not (a & b) for n, a in enumerate(users) for b in users[n + 1 :])


def test_behind_pgbouncer_a_batch_runs_without_server_side_prepared_statements(
    settings: Settings, sandbox: Sandbox
) -> None:
    """BALANCES_DB_PREPARED_STATEMENTS=false (PgBouncer, transaction mode): psycopg never prepares,
    where by default it prepares what a batch runs again and again."""
    seed(settings, sandbox, tenants=3, accounts=2)
    bouncer = settings.model_copy(update={"db_prepared_statements": False})

    def prepared_after_six_runs(s: Settings) -> int:
        engine = get_engine(s)
        engine.dispose()  # one fresh pooled connection, reused by every step below
        for _ in range(6):
            run_id, items = plan(s)
            assert batch(s, run_id, items).succeeded == 6
        with engine.connect() as conn:
            return int(conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() or 0)

    assert prepared_after_six_runs(settings) > 0
    assert prepared_after_six_runs(bouncer) == 0


def test_a_bug_inside_a_batch_hands_its_accounts_to_single_refreshes(
    settings: Settings, sandbox: Sandbox, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not acknowledged with nothing recorded (the run would wait for the sweeper, and a bug that
    repeats would never finish): each account goes on alone, where a bug ends as a recorded failure."""
    from app.nightly import batch as batch_module
    from app.worker.tasks import refresh_batch

    seed(settings, sandbox, tenants=2, accounts=2)
    run_id, items = plan(settings)
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()

    def bug(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("a bug in the batch's recording")

    monkeypatch.setattr(batch_module, "_record", bug)
    result = refresh_batch.apply(args=(run_id, [list(i) for i in items])).get()

    assert result["single"] == len(items)
    queued = [loads(m)["headers"] for m in broker.lrange("refresh", 0, -1)]
    assert sorted(h["id"] for h in queued) == sorted(i[0] for i in items)
    assert {h["task"] for h in queued} == {"balances.refresh_account"}
    broker.flushdb()


def test_the_connection_state_follows_the_batchs_newer_answer_even_if_it_changed_meanwhile(
    settings: Settings, sandbox: Sandbox
) -> None:
    """Between the batch's load and its answer, another refresh recorded SCARequired on the
    connection; the batch's newer answer says the connection is fine: it must clear it."""
    (t,) = seed(settings, sandbox, tenants=1, accounts=2)
    run_id, items = plan(settings)
    with session_scope(settings) as s:
        conn_id = s.scalar(select(BankAccount.connection_id).where(BankAccount.id == t.account_ids[0]))
    deps = while_reading(
        settings,
        lambda s: s.get(BankConnection, conn_id).set_state("SCARequired", datetime.now(UTC)),  # type: ignore[union-attr]
    )
    result = run_batch(deps, run_id, items, date(2026, 11, 24), 1)

    assert result.succeeded == 2
    with session_scope(settings) as s:
        assert s.get(BankConnection, conn_id).state is None  # type: ignore[union-attr]


def test_an_account_handed_to_the_single_refresh_keeps_its_attempt_count(
    settings: Settings, sandbox: Sandbox, redis_url: str
) -> None:
    """Handed over at the last attempt (its user's list lacked it), the single refresh does not
    start again at attempt 1: a retryable failure there is the last one, recorded."""
    from app.worker.tasks import publish_refreshes, refresh_account

    (t,) = seed(settings, sandbox, tenants=1, accounts=2)
    missing = t.account_ids[0]
    run_id, items = plan(settings)
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    handed = [i for i in items if i[2] == missing]
    publish_refreshes(run_id, handed, attempt=settings.max_attempts)
    (raw,) = broker.lrange("refresh", 0, -1)
    message = loads(raw)
    body = loads(base64.b64decode(message["body"]))
    args, kwargs = body[0], body[1]
    sandbox.state.hidden.add(t.external[missing])  # so the single refresh reads the account itself
    sandbox.state.scripted[t.external[missing]] = deque([(503, None)] * 5)

    result = refresh_account.apply(args=args, kwargs=kwargs, task_id=message["headers"]["id"]).get()

    assert result["ok"] is False and result["error"]["reason"] == "provider_unavailable"
    assert len(sandbox.state.scripted[t.external[missing]]) == 4  # one attempt, the last: no retries
    (row,) = [r for r in audit_rows(settings, run_id) if r.account_id == missing]
    assert row.attempts == settings.max_attempts
    broker.flushdb()


def test_available_balance_is_the_exact_sum_however_many_digits_powens_sends() -> None:
    """balance + coming in Decimal's default context (28 digits) rounded such amounts silently."""
    from zoneinfo import ZoneInfo

    from app.powens.models import PowensAccount
    from app.refresh.records import map_balances

    raw = {
        "id": 1,
        "id_connection": 2,
        "name": "big",
        "balance": Decimal("98765432109876543.123456789012345678"),
        "coming": Decimal("1.000000000000000001"),
        "currency": {"id": "EUR"},
        "last_update": "2026-11-24 04:00:00",
    }
    pacc = PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
    (current,) = [d for d in map_balances(pacc, datetime.now(UTC)) if d.balance_type == "current"]
    assert current.available_balance == Decimal("98765432109876544.123456789012345679")


def test_a_batch_never_revives_an_account_deleted_while_it_read(settings: Settings, sandbox: Sandbox) -> None:
    (t,) = seed(settings, sandbox, tenants=1, accounts=2)
    run_id, items = plan(settings)
    gone = t.account_ids[0]
    # A CONNECTION_DELETED push, say, lands while the batch reads.
    deps = while_reading(settings, lambda s: setattr(s.get(BankAccount, gone), "status", "deleted"))
    run_batch(deps, run_id, items, date(2026, 11, 24), 1)

    with session_scope(settings) as s:
        assert s.get(BankAccount, gone).status == "deleted"  # type: ignore[union-attr]
        assert s.get(BankAccount, t.account_ids[1]).status == "active"  # type: ignore[union-attr]


def test_a_redelivered_batch_claims_the_summary_its_first_delivery_did_not(
    settings: Settings, sandbox: Sandbox, redis_url: str
) -> None:
    """The first delivery committed every outcome, then died before claiming its tenant's summary:
    the redelivery finds nothing to do but the claim."""
    from app.worker.tasks import refresh_batch

    (t,) = seed(settings, sandbox, tenants=1, accounts=2)
    run_id, items = plan(settings)
    batch(settings, run_id, items)  # recorded; no claim made (that is the task's, after the commit)
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()

    result = refresh_batch.apply(args=(run_id, [list(i) for i in items])).get()

    assert result["skipped"] == len(items)
    with session_scope(settings) as s:
        status = s.scalar(
            select(RunTenant.status).where(RunTenant.run_id == run_id, RunTenant.tenant_id == t.tenant_id)
        )
    assert status == "summarising"
    queued = [loads(m)["headers"]["task"] for m in broker.lrange("reports", 0, -1)]
    assert queued == ["balances.summarize_tenant"]
    broker.flushdb()
