"""One conformance test for the write path: entry point by backend by situation, the same rows.

Every cell arranges the same stored state (one account refreshed once, at T1, with known amounts),
has Powens say one thing through one entry point — an on-demand refresh and a nightly single
refresh (each a batch of one), a nightly batch, a push — on PostgreSQL or SQLite, and compares what
the store then holds with what the situation expects: the latest records, the account row (status,
name, balances, Powens' last_update, when it was last refreshed), its connection's state, the day's
snapshot, and the outcome recorded (its audit row: outcome, reason, notes, balance count). What
differs between entry points is by design and named here: only a nightly entry writes the day's
snapshot, and a push records nothing when it brings nothing (older than what is stored, or for a
deleted account).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jsonio
from app.config import Settings, use_settings
from app.devtools.sandbox import Sandbox
from app.nightly import pipeline
from app.nightly.batch import run_batch
from app.policy import SCHEDULER
from app.push.apply import apply
from app.push.events import Event, reduce
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Attempt, Failed, Succeeded
from app.store.db import session_scope
from app.store.migrate import upgrade
from app.store.models import (
    AccountBalance,
    BalanceSnapshot,
    BankAccount,
    BankConnection,
    Base,
    RefreshAttempt,
    RunItem,
)
from app.store.runs import Item
from app.store.states import AccountStatus, Trigger
from tests.conftest import make_settings
from tests.support.data import Seeded, seed_tenant

DAY = date(2026, 11, 24)  # the nightly run's business day
PARIS = "%Y-%m-%d %H:%M:%S"


@dataclasses.dataclass(frozen=True)
class Situation:
    """What is stored (an answer at ``before``), what Powens then says, and what must be stored."""

    before: str  # Powens' naive Paris last_update of the stored answer
    answer: dict[str, Any]  # the wire fields Powens then sends (last_update included)
    at: datetime  # when Powens then answers (the read's clock; the push's arrival)
    latest: dict[str, tuple[str, str | None, datetime]]  # type -> (current, available, lastUpdatedAt)
    status: str = AccountStatus.ACTIVE
    outcome: str = "succeeded"  # succeeded | failed:<reason>
    push_outcome: str | None = None  # when a push records something else ("none": nothing)
    carried: frozenset[str] = frozenset()  # snapshot types carried from the stored record
    balance: str | None = None  # the account row's balance afterwards (None: the answer's)
    deleted_meanwhile: bool = False
    before_coming: Decimal | None = Decimal("-5.00")
    last_update: datetime | None = None  # the account row's Powens last_update afterwards (None: T1)
    notes: tuple[str, ...] = ()  # the success's notes (its audit row's errors), in order
    connection_state: str | None = None
    refreshed: bool = True  # the account row's last_refreshed_at moves to the answer's time

    @property
    def balance_count(self) -> int | None:
        return len(self.latest) if self.outcome == "succeeded" else None


T1 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)  # 10:00 Paris
T2 = T1 + timedelta(hours=1)
A1, A2 = Decimal("100.00"), Decimal("250.50")
BIG = Decimal("123456789012345678.123456789012")  # 30 significant digits
TINY = Decimal("-0.000000000000000000000000000001")  # 30 decimal places
DST_FIRST = datetime(2026, 10, 25, 0, 45, tzinfo=UTC)  # 02:45 Paris, summer time
DST_SECOND = datetime(2026, 10, 25, 1, 15, tzinfo=UTC)  # the second 02:15 Paris, winter time


def paris(at: datetime) -> str:
    """``at`` as Powens writes it: naive Europe/Paris time."""
    return at.astimezone(ZoneInfo("Europe/Paris")).strftime(PARIS)


# As the store gives amounts back: digit for digit, trailing zeros of the fraction dropped.
KEPT = {"current": ("100", "95", T1), "uncleared": ("-5", None, T1)}
SITUATIONS = {
    "newer": Situation(
        paris(T1),
        {"last_update": paris(T2), "balance": A2, "coming": Decimal("-1.50")},
        T2 + timedelta(minutes=1),
        {"current": ("250.5", "249", T2), "uncleared": ("-1.5", None, T2)},
        last_update=T2,
    ),
    "older": Situation(
        paris(T1),
        {"last_update": paris(T1 - timedelta(hours=1)), "balance": A2, "coming": Decimal("-1.50")},
        T2,
        KEPT,
        push_outcome="none",
        carried=frozenset({"current", "uncleared"}),
        balance="100",
        notes=(
            "Powens returned current data older than the stored record; kept it",
            "Powens returned uncleared data older than the stored record; kept it",
        ),
    ),
    "equal": Situation(
        paris(T1),
        {"last_update": paris(T1), "balance": A2, "coming": Decimal("-1.50")},
        T2,
        {"current": ("250.5", "249", T1), "uncleared": ("-1.5", None, T1)},  # ties take the answer
    ),
    "deleted meanwhile": Situation(
        paris(T1),
        {"last_update": paris(T2), "balance": A2, "coming": Decimal("-1.50")},
        T2,
        KEPT,
        status=AccountStatus.DELETED,
        outcome="failed:not_found",
        push_outcome="none",
        balance="100",
        deleted_meanwhile=True,
        refreshed=False,
    ),
    "disabled": Situation(
        paris(T1),
        {"last_update": paris(T1), "balance": A2, "disabled": paris(T2)},
        T2,
        KEPT,
        status=AccountStatus.DISABLED,
        outcome="failed:not_found",
        balance="100",
        refreshed=False,
    ),
    "type dropped": Situation(
        paris(T1),
        {"last_update": paris(T2), "balance": A2, "coming": None},
        T2,
        {"current": ("250.5", None, T2)},
        last_update=T2,
    ),
    "no balance yet": Situation(
        paris(T1),
        {"last_update": paris(T2), "balance": None, "coming": None, "currency": None},
        T2,
        KEPT,
        carried=frozenset({"current", "uncleared"}),
        balance="100",
        last_update=T2,
        notes=("no balance yet: Powens has no balance for this account (the bank has not reported)",),
    ),
    "exact 30 digits": Situation(
        paris(T1),
        {"last_update": paris(T2), "balance": BIG, "coming": TINY},
        T2,
        {
            "current": (str(BIG), "123456789012345678.123456789011999999999999999999", T2),
            "uncleared": (str(TINY), None, T2),
        },
        last_update=T2,
        notes=("an amount has more decimal places than EUR's precision (2); kept exactly as Powens sent it",),
    ),
    "DST repeated hour": Situation(
        "2026-10-25 02:45:00",  # the first 02:45 (summer time)
        {"last_update": "2026-10-25 02:15:00", "balance": A2, "coming": Decimal("-1.50")},
        DST_SECOND + timedelta(minutes=5),  # the second 02:15 has happened: it is the newer sync
        {"current": ("250.5", "249", DST_SECOND), "uncleared": ("-1.5", None, DST_SECOND)},
        last_update=DST_SECOND,
    ),
    "needs the user": Situation(
        paris(T1),
        {"last_update": paris(T1), "balance": A2, "error": "SCARequired"},
        T2,
        KEPT,
        outcome="failed:needs_user_action",
        balance="100",
        connection_state="SCARequired",
        refreshed=False,
    ),
}


# -- backends ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_file(tmp_path_factory: pytest.TempPathFactory, sandbox_server: Sandbox) -> Path:
    path = tmp_path_factory.mktemp("conformance") / "store.db"
    upgrade(make_settings(f"sqlite:///{path}", sandbox_server, coordination="local"))
    return path


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request: pytest.FixtureRequest, sandbox: Sandbox) -> Iterator[Settings]:
    if request.param == "postgresql":
        yield request.getfixturevalue("settings")
        return
    s = make_settings(f"sqlite:///{request.getfixturevalue('sqlite_file')}", sandbox, coordination="local")
    with session_scope(s) as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(table.delete())
    use_settings(s)
    yield s
    use_settings(None)


# -- entry points --------------------------------------------------------------------------------------


def _nightly_run(settings: Settings) -> str:
    run_id, _ = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor=SCHEDULER.name, business_day=DAY
    )
    pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None)
    return run_id


def on_demand(
    settings: Settings, deps: Deps, t: Seeded, acc: str, _wire: dict[str, Any], _at: datetime
) -> str:
    out = execute({"tenantId": t.tenant_id, "accountId": acc}, "alice", "on_demand", deps=deps)
    return _kind(out)


def single(settings: Settings, deps: Deps, t: Seeded, acc: str, _wire: dict[str, Any], _at: datetime) -> str:
    run_id = _nightly_run(settings)
    attempt = Attempt(settings.max_attempts, settings.max_attempts, f"{run_id}:{acc}", run_id, 0, DAY)
    inp = {"tenantId": t.tenant_id, "accountId": acc}
    return _kind(execute(inp, SCHEDULER.name, "scheduled", attempt=attempt, deps=deps))


def batch(settings: Settings, deps: Deps, _t: Seeded, _acc: str, _wire: dict[str, Any], _at: datetime) -> str:
    run_id = _nightly_run(settings)
    with session_scope(settings) as s:
        rows = s.scalars(select(RunItem)).all()
        items = [Item(r.task_id, r.tenant_id, r.account_id, r.powens_user_pk) for r in rows]
    result = run_batch(deps, run_id, items, DAY, settings.max_attempts)
    assert not (result.single or result.retry or result.requeue), result
    return _kind_of(_audit(settings))


def push(settings: Settings, deps: Deps, _t: Seeded, _acc: str, wire: dict[str, Any], at: datetime) -> str:
    payload = jsonio.dumps(reduce(Event.ACCOUNT_SYNCED, jsonio.loads(jsonio.dumps(wire))))
    [applied] = apply(deps, payload, at)
    if applied.outcome.value in ("out_of_order", "deleted"):
        return "none"  # superseded: nothing recorded
    return _kind_of(_audit(settings))


def _audit(settings: Settings) -> RefreshAttempt | None:
    """The act's audit row (the arrange's refresh has its own, written first)."""
    with session_scope(settings) as s:
        rows = s.scalars(select(RefreshAttempt).order_by(RefreshAttempt.id)).all()
        return rows[1] if len(rows) > 1 else None


def _kind_of(row: RefreshAttempt | None) -> str:
    assert row is not None
    return "succeeded" if row.outcome == "succeeded" else f"failed:{row.reason}"


def _kind(outcome: Any) -> str:
    if isinstance(outcome, Succeeded):
        return "succeeded"
    assert isinstance(outcome, Failed), outcome
    return f"failed:{outcome.error.reason.value}"


PATHS: dict[str, Callable[..., str]] = {
    "on-demand refresh": on_demand,
    "nightly single refresh": single,
    "nightly batch": batch,
    "push": push,
}
NIGHTLY = {"nightly single refresh", "nightly batch"}


# -- the test ------------------------------------------------------------------------------------------


def _wire(sandbox: Sandbox, t: Seeded, acc: str) -> dict[str, Any]:
    """The account as Powens sends it now (overrides applied), for a push."""
    sacc = t.user.accounts[t.external[acc]]
    conn = t.user.connections.get(sacc.id_connection)
    wire = sacc.wire(conn.state if conn else None)
    wire.update(sandbox.state.wire_overrides.get(sacc.id, {}))
    return wire


def _meanwhile(deps: Deps, settings: Settings, acc: str) -> None:
    """CONNECTION_DELETED lands while Powens answers (the read's deps commit it first)."""

    def delete(s: Session) -> None:
        row = s.get(BankAccount, acc)
        assert row is not None
        row.status = AccountStatus.DELETED

    for name in ("get_account", "list_accounts_raw"):
        real = getattr(deps.client, name)

        def hooked(*args: Any, _real: Any = real, **kw: Any) -> Any:
            with session_scope(settings) as s:
                delete(s)
            return _real(*args, **kw)

        setattr(deps.client, name, hooked)


def _state(settings: Settings, acc: str) -> dict[str, Any]:
    with session_scope(settings) as s:
        latest = {
            r.balance_type: (
                str(r.current_balance),
                None if r.available_balance is None else str(r.available_balance),
                r.last_updated_at,
            )
            for r in s.scalars(select(AccountBalance).where(AccountBalance.account_id == acc))
        }
        snaps = {
            r.balance_type: (str(r.current_balance), r.last_updated_at, r.carried)
            for r in s.scalars(
                select(BalanceSnapshot).where(BalanceSnapshot.account_id == acc, BalanceSnapshot.day == DAY)
            )
        }
        account = s.get(BankAccount, acc)
        assert account is not None
        conn = s.get(BankConnection, account.connection_id)
        assert conn is not None
        return {
            "latest": latest,
            "snapshots": snaps,
            "status": account.status,
            "name": account.name,
            "balance": None if account.balance is None else str(account.balance),
            "coming": None if account.coming is None else str(account.coming),
            "powens_last_update": account.powens_last_update,
            "last_refreshed_at": account.last_refreshed_at,
            "connection_state": conn.state,
        }


@pytest.mark.parametrize("situation", list(SITUATIONS))
@pytest.mark.parametrize("path", list(PATHS))
def test_every_entry_point_leaves_the_same_rows(
    store: Settings, sandbox: Sandbox, path: str, situation: str
) -> None:
    sit = SITUATIONS[situation]
    t = seed_tenant(store, sandbox, "conf", accounts=1)
    acc = t.account_ids[0]
    ext = t.external[acc]
    with session_scope(store) as s:  # as discovery left it before the stored answer
        row = s.get(BankAccount, acc)
        assert row is not None
        row.powens_last_update, row.status_at = None, None
    # Arrange: the stored answer, through one refresh at T1 (the same for every cell).
    sandbox.state.wire_overrides[ext] = {
        "last_update": sit.before,
        "balance": A1,
        "coming": sit.before_coming,
        "currency": {"id": "EUR", "precision": 2},
    }
    stored_at = DST_FIRST if situation == "DST repeated hour" else T1
    arrange = execute(
        {"tenantId": "conf", "accountId": acc},
        "alice",
        Trigger.ON_DEMAND,
        deps=Deps(store, clock=lambda: stored_at + timedelta(minutes=1)),
    )
    assert isinstance(arrange, Succeeded)
    before = _state(store, acc)
    if situation == "DST repeated hour":
        assert before["latest"] == {k: (v[0], v[1], DST_FIRST) for k, v in KEPT.items()}

    # Act: Powens says its word through the entry point.
    sandbox.state.wire_overrides[ext] = {"currency": {"id": "EUR", "precision": 2}, **sit.answer}
    deps = Deps(store, clock=lambda: sit.at)
    if sit.deleted_meanwhile:
        if path == "push":  # a push has no read: the account was deleted before it arrived
            with session_scope(store) as s:
                s.get(BankAccount, acc).status = AccountStatus.DELETED  # type: ignore[union-attr]
        else:
            _meanwhile(deps, store, acc)
    outcome = PATHS[path](store, deps, t, acc, _wire(sandbox, t, acc), sit.at)

    # Assert: the same rows whatever the entry point and the backend.
    state = _state(store, acc)
    assert outcome == (sit.push_outcome or sit.outcome if path == "push" else sit.outcome)
    assert state["latest"] == sit.latest
    assert state["status"] == sit.status
    assert state["balance"] == (sit.balance or sit.latest["current"][0])
    answered = sit.balance is None  # the account row took the answer's amounts
    uncleared = sit.latest.get("uncleared")
    assert state["coming"] == ((uncleared[0] if uncleared else None) if answered else before["coming"])
    assert state["name"] == before["name"]  # the sandbox keeps the account's name
    assert state["powens_last_update"] == (sit.last_update or before["powens_last_update"])
    recorded = outcome != "none"
    moved = sit.refreshed and recorded and sit.outcome == "succeeded"
    assert state["last_refreshed_at"] == (sit.at if moved else before["last_refreshed_at"])
    assert state["connection_state"] == sit.connection_state
    audit = _audit(store)
    if recorded:
        assert audit is not None and audit.balance_count == sit.balance_count
        assert tuple(audit.errors or ()) == (sit.notes if sit.outcome == "succeeded" else ())
    else:
        assert audit is None  # a superseded push records nothing
    if path in NIGHTLY and sit.outcome == "succeeded":
        assert state["snapshots"] == {
            kind: (current, when, kind in sit.carried) for kind, (current, _avail, when) in sit.latest.items()
        }
    else:
        assert state["snapshots"] == {}  # the day's snapshot is a nightly success's only
