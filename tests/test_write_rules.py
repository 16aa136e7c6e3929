"""What Powens' word does to the store, finding by finding (the write-path audit), on real PostgreSQL
and the Powens sandbox. Each test reproduces one finding through the public entry points: a single
refresh (``execute``), a nightly batch (``run_batch``) and a push (``apply``). The conformance test
(``tests/test_write_conformance.py``) holds the three paths to the same rows; these hold each rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, localcontext
from typing import Any

import psycopg
import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from app import jsonio
from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.nightly import pipeline
from app.nightly.batch import run_batch
from app.push.apply import apply
from app.push.events import Event, reduce
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Attempt, Failed, Requeue, Succeeded
from app.refresh.records import get_balances
from app.reports.summary import build_summary
from app.store import runs
from app.store.db import get_engine, session_scope
from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, BankConnection, RefreshAttempt
from app.store.states import AccountStatus, Trigger
from tests.support.data import Seeded, seed_tenant

DAY = date(2026, 11, 24)


def _single(
    settings: Settings, t: Seeded, account_id: str, *, deps: Deps | None = None, **attempt: Any
) -> Any:
    return execute(
        {"tenantId": t.tenant_id, "accountId": account_id},
        "alice",
        Trigger.ON_DEMAND,
        attempt=Attempt(**attempt) if attempt else None,
        deps=deps or Deps(settings),
    )


def _plan(settings: Settings, business_day: date = DAY) -> tuple[str, list[runs.Item]]:
    run_id, _ = pipeline.start_run(
        settings, trigger=Trigger.ON_DEMAND, actor="alice", business_day=business_day
    )
    pages: list[runs.Item] = []
    pipeline.plan_run(settings, run_id, lambda _r, page: pages.extend(page), lambda *_: None)
    return run_id, pages


def _push(
    settings: Settings, event_type: Event, body: dict[str, Any], at: datetime | None = None
) -> list[str]:
    payload = jsonio.dumps(reduce(event_type, jsonio.loads(jsonio.dumps(body))))
    return [a.outcome.value for a in apply(Deps(settings), payload, at or datetime.now(UTC))]


def _account(settings: Settings, account_id: str) -> BankAccount:
    with session_scope(settings) as s:
        row = s.get(BankAccount, account_id)
        assert row is not None
        return row


def _latest(settings: Settings, account_id: str) -> dict[str, AccountBalance]:
    with session_scope(settings) as s:
        rows = s.scalars(select(AccountBalance).where(AccountBalance.account_id == account_id))
        return {r.balance_type: r for r in rows}


def _meanwhile(settings: Settings, change: Callable[[Session], object]) -> Deps:
    """Deps whose Powens reads first commit ``change`` (another writer, while the refresh reads)."""
    deps = Deps(settings)
    real_one, real_list = deps.client.get_account, deps.client.list_accounts_raw

    def get_account(*args: Any, **kw: Any) -> Any:
        with session_scope(settings) as s:
            change(s)
        return real_one(*args, **kw)

    def list_accounts_raw(*args: Any, **kw: Any) -> Any:
        with session_scope(settings) as s:
            change(s)
        return real_list(*args, **kw)

    deps.client.get_account = get_account  # type: ignore[method-assign]
    deps.client.list_accounts_raw = list_accounts_raw  # type: ignore[method-assign]
    return deps


@contextmanager
def audit_insert_fails(settings: Settings) -> Iterator[None]:
    """The database drops the connection at the audit row's INSERT: the end of the one transaction."""

    def cut(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "INTO refresh_attempts" in statement:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", cut)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", cut)


# -- a deleted account stays deleted -----------------------------------------------------------------


def test_a_single_refresh_does_not_bring_back_an_account_deleted_while_it_read(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-del", accounts=1)
    acc = t.account_ids[0]
    t.user.accounts[t.external[acc]].balance = Decimal("77.00")

    def delete(s: Session) -> None:  # CONNECTION_DELETED lands while Powens answers
        row = s.get(BankAccount, acc)
        assert row is not None
        row.status = AccountStatus.DELETED

    outcome = _single(settings, t, acc, deps=_meanwhile(settings, delete))

    assert isinstance(outcome, Failed) and outcome.error.reason.value == "not_found"
    assert _account(settings, acc).status == AccountStatus.DELETED  # not back in totals or tonight's plan
    assert "current" not in _latest(settings, acc)  # nothing of the answer was stored for it


# -- the day's snapshot ------------------------------------------------------------------------------


def test_a_push_fresh_account_gets_the_run_days_snapshot_carried_from_its_latest_record(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-carry", accounts=2)
    pushed, read = t.account_ids
    sacc = t.user.accounts[t.external[pushed]]
    sacc.balance = Decimal("512.34")
    assert _push(settings, Event.ACCOUNT_SYNCED, sacc.wire(None)) == ["stored"]
    run_id, items = _plan(settings)

    result = run_batch(Deps(settings), run_id, items, DAY)

    assert (result.succeeded, result.failed) == (2, 0)
    with session_scope(settings) as s:
        snaps = {
            (r.account_id, r.balance_type): r
            for r in s.scalars(select(BalanceSnapshot).where(BalanceSnapshot.day == DAY))
        }
    assert (pushed, "current") in snaps and (read, "current") in snaps  # day-over-day covers both
    carried = snaps[(pushed, "current")]
    assert carried.current_balance == Decimal("512.34") and carried.carried is True
    assert snaps[(read, "current")].carried is False  # read by the run itself


def test_a_push_after_the_run_leaves_the_run_days_snapshot_as_the_run_saw_it(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-eod", accounts=1)
    acc = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc]]
    sacc.balance = Decimal("100.00")
    today = settings.business_day(datetime.now(UTC))
    run_id, items = _plan(settings, today)
    run_batch(Deps(settings), run_id, items, today)
    sacc.balance, sacc.last_update = (
        Decimal("250.00"),
        (sacc.last_update or datetime.now(UTC)) + timedelta(minutes=5),
    )

    assert _push(settings, Event.ACCOUNT_SYNCED, sacc.wire(None)) == ["stored"]

    assert _latest(settings, acc)["current"].current_balance == Decimal("250.00")
    with session_scope(settings) as s:
        snap = s.scalars(
            select(BalanceSnapshot).where(
                BalanceSnapshot.account_id == acc,
                BalanceSnapshot.day == today,
                BalanceSnapshot.balance_type == "current",
            )
        ).one()
    assert snap.current_balance == Decimal("100.00")  # one point in time for every account of the day


# -- money read back exactly -------------------------------------------------------------------------


def test_amounts_of_thirty_digits_read_back_and_sum_exactly(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "w-digits", accounts=2)
    big = Decimal("123456789012345678.123456789012")  # 30 significant digits: the parser accepts it
    tiny = Decimal("0.000000000000000000000000000001")  # 30 decimal places: accepted too
    for acc in t.account_ids:
        sacc = t.user.accounts[t.external[acc]]
        sacc.balance, sacc.coming, sacc.currency = big, tiny, "EUR"  # one currency: one total
        assert isinstance(_single(settings, t, acc), Succeeded)

    with localcontext(Context(prec=100)):  # the expected values, computed without rounding
        available, twice, current_twice = big + tiny, (big + tiny) * 2, big * 2
    got = get_balances(settings, "w-digits", t.account_ids[0])
    current = next(b for b in got.balances if b.balance_type == "current")
    assert current.current_balance == big and str(current.current_balance) == str(big)
    assert current.available_balance == available  # Decimal's default context rounds at 28 digits
    assert str(big) in jsonio.dumps(got)  # what `show --json` prints
    with session_scope(settings) as s:
        summary = build_summary(s, settings, "no-run", "w-digits", DAY)
    [total] = summary["totals"]
    assert total["current"] == current_twice and total["coming"] == tiny * 2
    assert total["available"] == twice


# -- Powens must never crash a worker ----------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["1e400", "300000000000"])
def test_an_absurd_retry_after_ends_a_single_refresh_as_a_recorded_rate_limit(
    settings: Settings, sandbox: Sandbox, retry_after: str
) -> None:
    t = seed_tenant(settings, sandbox, "w-ra", accounts=1)
    acc = t.account_ids[0]
    sandbox.state.scripted[t.external[acc]] = deque([(429, retry_after)])

    outcome = _single(settings, t, acc, number=1, max_attempts=1, task_id="w-ra-1")

    assert isinstance(outcome, Failed) and outcome.error.reason.value == "rate_limited"
    when = outcome.error.next_attempt_at
    assert when is not None and when <= datetime.now(UTC) + timedelta(days=1, minutes=1)


@pytest.mark.parametrize("retry_after", ["1e400", "300000000000"])
def test_an_absurd_retry_after_ends_a_batch_as_recorded_rate_limits(
    settings: Settings, sandbox: Sandbox, retry_after: str
) -> None:
    t = seed_tenant(settings, sandbox, "w-rab", accounts=2)
    sandbox.state.scripted_users[t.user.id] = deque([(429, retry_after)])
    run_id, items = _plan(settings)

    result = run_batch(Deps(settings), run_id, items, DAY, attempt_number=settings.max_attempts)

    assert (result.failed, result.single, result.retry) == (2, [], [])
    status = runs.run_status(settings, run_id)
    assert status is not None and status["accounts"]["failed"] == 2


# -- Powens' naive Paris time in the repeated hour ---------------------------------------------------

FIRST_PASS = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)  # 02:45 Paris, summer time (UTC+2)
SECOND_PASS = datetime(2026, 10, 25, 1, 15, tzinfo=UTC)  # 02:15 Paris again, winter time (UTC+1)


def _held_before(settings: Settings, account_id: str, when: datetime) -> None:
    """The account as discovery left it, synced by Powens before the night of the change."""
    with session_scope(settings) as s:
        row = s.get(BankAccount, account_id)
        assert row is not None
        row.powens_last_update = when


def test_a_sync_in_the_repeated_autumn_hour_is_not_mistaken_for_an_older_one(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-dst", accounts=1)
    acc = t.account_ids[0]
    ext = t.external[acc]
    _held_before(settings, acc, FIRST_PASS - timedelta(hours=1))
    sandbox.state.wire_overrides[ext] = {"last_update": "2026-10-25 02:45:00", "balance": Decimal("10.00")}
    first = _single(settings, t, acc, deps=Deps(settings, clock=lambda: FIRST_PASS + timedelta(minutes=5)))
    assert isinstance(first, Succeeded)
    assert _latest(settings, acc)["current"].last_updated_at == FIRST_PASS

    # Half an hour later on the clock, the bank syncs again: Powens says 02:15, the second 02:15.
    sandbox.state.wire_overrides[ext] = {"last_update": "2026-10-25 02:15:00", "balance": Decimal("20.00")}
    later = Deps(settings, clock=lambda: SECOND_PASS + timedelta(minutes=5))
    second = _single(settings, t, acc, deps=later)

    assert isinstance(second, Succeeded)
    stored = _latest(settings, acc)["current"]
    assert (stored.current_balance, stored.last_updated_at) == (Decimal("20.00"), SECOND_PASS)
    assert _account(settings, acc).powens_last_update == SECOND_PASS


def test_in_the_repeated_hour_a_time_not_yet_reached_is_read_as_the_first_pass(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-dst1", accounts=1)
    acc = t.account_ids[0]
    ext = t.external[acc]
    _held_before(settings, acc, FIRST_PASS - timedelta(hours=1))
    sandbox.state.wire_overrides[ext] = {"last_update": "2026-10-25 02:45:00", "balance": Decimal("10.00")}
    _single(settings, t, acc, deps=Deps(settings, clock=lambda: FIRST_PASS + timedelta(minutes=5)))
    # A redelivered older answer (02:15, first pass) read at 00:50 UTC: the second 02:15 has not
    # happened yet, so it can only be the first one, older than what is stored.
    sandbox.state.wire_overrides[ext] = {"last_update": "2026-10-25 02:15:00", "balance": Decimal("5.00")}
    _single(settings, t, acc, deps=Deps(settings, clock=lambda: FIRST_PASS + timedelta(minutes=6)))

    stored = _latest(settings, acc)["current"]
    assert (stored.current_balance, stored.last_updated_at) == (Decimal("10.00"), FIRST_PASS)


# -- status pushes in order --------------------------------------------------------------------------


def test_an_old_account_disabled_push_replayed_after_enabled_leaves_the_account_enabled(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-order", accounts=1)
    acc = t.account_ids[0]
    wire = t.user.accounts[t.external[acc]].wire(None)
    disabled_at = datetime.now(UTC) + timedelta(seconds=2)  # after discovery, in whole seconds
    disabled = {
        **wire,
        "disabled": disabled_at.astimezone(settings.powens_zone).strftime("%Y-%m-%d %H:%M:%S"),
    }
    _push(settings, Event.ACCOUNT_DISABLED, disabled, at=disabled_at)
    assert _account(settings, acc).status == AccountStatus.DISABLED
    _push(settings, Event.ACCOUNT_ENABLED, wire, at=disabled_at + timedelta(minutes=5))
    assert _account(settings, acc).status == AccountStatus.ACTIVE

    # The broker redelivers the first one (its message carries the time it was received).
    _push(settings, Event.ACCOUNT_DISABLED, disabled, at=disabled_at)

    assert _account(settings, acc).status == AccountStatus.ACTIVE  # still in tonight's plan


# -- one transaction: nothing of Powens' word is written outside it ----------------------------------


def test_a_single_refresh_that_cannot_record_leaves_the_account_as_it_was(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-tx1", accounts=1)
    acc = t.account_ids[0]
    t.user.accounts[t.external[acc]].disabled = datetime.now(UTC)

    with audit_insert_fails(settings):
        outcome = _single(settings, t, acc)

    assert isinstance(outcome, Requeue) and outcome.infrastructure  # tried again later, nothing lost
    assert _account(settings, acc).status == AccountStatus.ACTIVE  # not half-recorded as disabled


def test_a_batch_that_cannot_record_leaves_its_connections_as_they_were(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-tx2", accounts=2)
    next(iter(t.user.connections.values())).state = "SCARequired"
    run_id, items = _plan(settings)

    with audit_insert_fails(settings), pytest.raises(Exception, match="closed the connection"):
        run_batch(Deps(settings), run_id, items, DAY)

    with session_scope(settings) as s:
        assert set(s.scalars(select(BankConnection.state).where(BankConnection.tenant_id == "w-tx2"))) == {
            None
        }


def test_a_push_that_cannot_record_leaves_its_connection_as_it_was(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-tx3", accounts=1)
    acc = t.account_ids[0]
    sacc = t.user.accounts[t.external[acc]]
    sacc.last_update = (sacc.last_update or datetime.now(UTC)) + timedelta(minutes=1)

    with audit_insert_fails(settings), pytest.raises(Exception, match="closed the connection"):
        _push(settings, Event.ACCOUNT_SYNCED, sacc.wire("wrongpass"))

    with session_scope(settings) as s:
        assert set(s.scalars(select(BankConnection.state).where(BankConnection.tenant_id == "w-tx3"))) == {
            None
        }


# -- review findings: status words dated when they were said, lock order, SQLite, bugs in writing ----


def test_a_read_asked_before_a_disable_does_not_undo_it(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "w-asked", accounts=1)
    acc = t.account_ids[0]
    wire = t.user.accounts[t.external[acc]].wire(None)
    asked = datetime.now(UTC) + timedelta(seconds=2)  # the read asks Powens at ``asked`` ...
    disabled = asked + timedelta(seconds=2)  # ... Powens disables the account 2 s later and pushes it

    def disabled_meanwhile(_s: Session) -> None:  # received while Powens computes the (older) answer
        paris = disabled.astimezone(settings.powens_zone).strftime("%Y-%m-%d %H:%M:%S")
        _push(
            settings, Event.ACCOUNT_DISABLED, {**wire, "disabled": paris}, at=disabled + timedelta(seconds=1)
        )

    deps = _meanwhile(settings, disabled_meanwhile)
    deps.clock = lambda: asked
    outcome = _single(settings, t, acc, deps=deps)

    assert isinstance(outcome, Succeeded)  # the answer's balances are stored ...
    assert _account(settings, acc).status == AccountStatus.DISABLED  # ... but its older status is not


def test_an_old_account_disabled_resent_by_powens_after_enabled_changes_nothing(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "w-resent", accounts=1)
    acc = t.account_ids[0]
    wire = t.user.accounts[t.external[acc]].wire(None)
    disabled_at = datetime.now(UTC) + timedelta(seconds=2)  # after discovery, in whole seconds
    paris = disabled_at.astimezone(settings.powens_zone).strftime("%Y-%m-%d %H:%M:%S")
    _push(settings, Event.ACCOUNT_DISABLED, {**wire, "disabled": paris}, at=disabled_at)
    _push(settings, Event.ACCOUNT_ENABLED, wire, at=disabled_at + timedelta(minutes=5))

    # Powens sends the old event again, received now: it says when the account was disabled.
    _push(
        settings, Event.ACCOUNT_DISABLED, {**wire, "disabled": paris}, at=disabled_at + timedelta(minutes=9)
    )

    assert _account(settings, acc).status == AccountStatus.ACTIVE


def test_a_disabled_push_without_a_last_update_still_disables(settings: Settings, sandbox: Sandbox) -> None:
    t = seed_tenant(settings, sandbox, "w-nolast", accounts=1)
    acc = t.account_ids[0]
    now = datetime.now(UTC) + timedelta(seconds=2)  # after discovery, in whole seconds
    wire = {
        **t.user.accounts[t.external[acc]].wire(None),
        "last_update": None,
        "disabled": now.astimezone(settings.powens_zone).strftime("%Y-%m-%d %H:%M:%S"),
    }
    assert _push(settings, Event.ACCOUNT_SYNCED, wire, at=now + timedelta(seconds=1)) == ["failed"]
    assert _account(settings, acc).status == AccountStatus.DISABLED


def test_a_push_locks_its_accounts_before_its_connection(settings: Settings, sandbox: Sandbox) -> None:
    """The lock order every writer keeps (accounts, then connections): a push and a nightly batch of
    the same connection never wait on each other in a cycle."""
    t = seed_tenant(settings, sandbox, "w-order-locks", accounts=2)
    conn = next(iter(t.user.connections.values()))
    sandbox.state.sync_connection(t.user, conn, push=False)
    body = sandbox.state.connection_synced_body(t.user, conn)
    seen: list[str] = []

    def log(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "FOR UPDATE" in statement or statement.lstrip().startswith("UPDATE"):
            seen.append(" ".join(statement.split()))

    engine = get_engine(settings)
    event.listen(engine, "before_cursor_execute", log)
    try:
        assert _push(settings, Event.CONNECTION_SYNCED, body) == ["stored", "stored"]
    finally:
        event.remove(engine, "before_cursor_execute", log)
    accounts = next(i for i, s in enumerate(seen) if "FROM bank_accounts" in s and "FOR UPDATE" in s)
    connections = [i for i, s in enumerate(seen) if "bank_connections" in s]
    assert connections and accounts < min(connections), seen


def test_on_sqlite_a_writing_transaction_holds_the_write_lock_from_its_first_read(tmp_path: Any) -> None:
    """What ``write.apply`` decides against the rows it read cannot change under it: SQLite's one
    writer at a time is its row lock, taken when the transaction begins."""
    import threading
    import time

    from sqlalchemy import text

    from app.store.db import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'lock.db'}")
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, status TEXT)"))
        c.execute(text("INSERT INTO t VALUES (1, 'active')"))
    order: list[str] = []
    read = threading.Event()

    def decide() -> None:
        with engine.begin() as c:
            held = c.execute(text("SELECT status FROM t")).scalar()
            read.set()
            time.sleep(0.3)  # another writer tries meanwhile
            c.execute(text("UPDATE t SET status = :s"), {"s": held})
            order.append("decided")

    def delete() -> None:
        read.wait(5)
        with engine.begin() as c:
            c.execute(text("UPDATE t SET status = 'deleted'"))
            order.append("deleted")

    threads = [threading.Thread(target=decide), threading.Thread(target=delete)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    with engine.begin() as c:
        final = c.execute(text("SELECT status FROM t")).scalar()
    assert (order, final) == (["decided", "deleted"], "deleted")  # the second writer waited its turn


def test_a_bug_while_recording_is_recorded_as_internal(
    settings: Settings, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.store import writes

    t = seed_tenant(settings, sandbox, "w-bug", accounts=1)
    acc = t.account_ids[0]

    def broken(_session: Any, rows: list[Any]) -> None:
        if rows:
            raise KeyError("a bug in writing the latest records")

    monkeypatch.setattr(writes, "upsert_latest", broken)
    outcome = _single(settings, t, acc, task_id="w-bug-1")

    assert isinstance(outcome, Failed) and outcome.error.reason.value == "internal"
    with session_scope(settings) as s:
        [row] = s.scalars(select(RefreshAttempt).where(RefreshAttempt.task_id == "w-bug-1")).all()
    assert (row.outcome, row.reason) == ("failed", "internal")  # nothing waits for a sweeper
