"""The beat's service gauges: the SQL aggregates count what the Python rules say of each row, and a
scrape serves counts computed at most once per BALANCES_GAUGE_REFRESH_SECONDS, with their time.

The rules (``app.reports.attention``: age buckets, connections that need a person, consents ending,
what counts at all) exist twice, as Python functions of one row (the lists) and as SQL expressions (the
gauges). Here the two are held to the same counts on the same rows in PostgreSQL: arranged rows on
every boundary, and generated ones (states the classification does not know, casing, characters that
lower differently by locale, NULLs, inactive connections, unlinked users)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.ops.exporter import ServiceCollector
from app.ops.refreshed import Refreshed
from app.powens.errors import TRANSIENT_STATES, USER_ACTION_STATES
from app.reports.attention import (
    AGE_BUCKETS,
    ServiceCounts,
    age_bucket,
    consent_ending,
    needs_attention,
    service_counts,
)
from app.store.db import get_engine, session_scope
from app.store.models import BankAccount, BankConnection, Base, PowensUser, Tenant
from app.store.states import AccountStatus

NOW = datetime(2026, 12, 14, 10, 30, 15, 123456, tzinfo=UTC)
US = timedelta(microseconds=1)
# Spelled as Powens and odder senders might: every list's states in their own casing, lower and upper
# case, states no list knows, blanks, and characters that lower to ASCII letters in one place and not
# another (Turkish dotted capital I, the Kelvin sign, dotless i, fullwidth letters).
STATES: list[str | None] = [
    None,
    "",
    " ",
    "SCARequired",
    "scarequired",
    "wrongpass",
    "WRONGPASS",
    "passwordExpired",
    "notSupported",
    "somethingPowensAddsLater",
    "validating",
    "VALIDATING",
    "rateLimiting",
    "websiteUnavailable",
    "WebsiteUnavailable",
    "bug",
    "Bug",
    " bug",
    "bug ",
    "val\u0130dating",  # Turkish dotted capital I
    "validat\u0130ng",
    "ratel\u0131miting",  # dotless i
    "\uff22\uff35\uff27",  # fullwidth BUG
    "\u212aug",  # the Kelvin sign
]


def _days(n: float) -> timedelta:
    return timedelta(days=n)


@dataclass
class Rows:
    """Rows to insert: Powens users (pk -> linked), connections and accounts as column dicts."""

    users: dict[int, bool] = field(default_factory=dict)
    connections: list[dict[str, Any]] = field(default_factory=list)
    accounts: list[dict[str, Any]] = field(default_factory=list)

    def connection(
        self, user: int, state: str | None, since: datetime | None, expires: datetime | None, active: bool
    ) -> str:
        cid = f"con-{len(self.connections)}"
        self.connections.append(
            {
                "id": cid,
                "tenant_id": "gauges",
                "powens_user_pk": user,
                "external_id": len(self.connections),
                "state": state,
                "state_since": since,
                "consent_expires_at": expires,
                "active": active,
                "created_at": NOW,
                "updated_at": NOW,
            }
        )
        return cid

    def account(self, connection: int, status: str, last_update: datetime | None) -> None:
        con = self.connections[connection]
        self.accounts.append(
            {
                "id": f"acc-{len(self.accounts)}",
                "tenant_id": "gauges",
                "powens_user_pk": con["powens_user_pk"],
                "connection_id": con["id"],
                "external_id": len(self.accounts),
                "name": "account",
                "account_type": "checking",
                "status": status,
                "powens_last_update": last_update,
                "last_synced_at": NOW,
                "created_at": NOW,
                "updated_at": NOW,
            }
        )


def store(settings: Settings, rows: Rows) -> None:
    engine = get_engine(settings)
    with engine.begin() as conn:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        conn.execute(insert(Tenant), [{"id": "gauges", "name": "gauges", "active": True, "created_at": NOW}])
        conn.execute(
            insert(PowensUser),
            [
                {
                    "id": pk,
                    "tenant_id": "gauges",
                    "powens_user_id": 1000 + pk,
                    "token_encrypted": b"token" if linked else None,
                    "unlinked_at": None if linked else NOW,
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for pk, linked in rows.users.items()
            ],
        )
        if rows.connections:
            conn.execute(insert(BankConnection), rows.connections)
        if rows.accounts:
            conn.execute(insert(BankAccount), rows.accounts)


def row_by_row(session: Session, settings: Settings, now: datetime) -> ServiceCounts:
    """The Python rules applied to every stored row, one at a time."""
    linked = {pk for pk, token in session.execute(select(PowensUser.id, PowensUser.token_encrypted)) if token}
    ages = dict.fromkeys(AGE_BUCKETS, 0)
    for status, last_update in session.execute(select(BankAccount.status, BankAccount.powens_last_update)):
        if status == AccountStatus.ACTIVE:
            ages[age_bucket(last_update, now)] += 1
    counted = [c for c in session.scalars(select(BankConnection)) if c.active and c.powens_user_pk in linked]
    return ServiceCounts(
        ages=ages,
        needing=sum(needs_attention(settings, c.state, c.state_since, now) is not None for c in counted),
        expiring=sum(consent_ending(settings, c.consent_expires_at, now) for c in counted),
        connections=len(counted),
    )


def both(settings: Settings, now: datetime = NOW) -> tuple[ServiceCounts, ServiceCounts]:
    with session_scope(settings) as session:
        return service_counts(session, settings, now), row_by_row(session, settings, now)


def boundaries(settings: Settings) -> Rows:
    """Every state, each since and consent end on and around its limit, active or not, of a linked
    user or an unlinked one; accounts of every status with bank data on and around each age limit."""
    rows = Rows(users={1: True, 2: False})
    lasting = _days(settings.transient_state_days)
    warning = _days(settings.consent_warning_days)
    sinces = [None, NOW - lasting - US, NOW - lasting, NOW - lasting + US, NOW - _days(40), NOW + _days(1)]
    ends = [None, NOW + warning - US, NOW + warning, NOW + warning + US, NOW - _days(2), NOW + _days(365)]
    for state, since, user, active in itertools.product(STATES, sinces, (1, 2), (True, False)):
        rows.connection(user, state, since, ends[len(rows.connections) % len(ends)], active)
    for expires, user, active in itertools.product(ends, (1, 2), (True, False)):
        rows.connection(user, None, None, expires, active)
    updates = [None, NOW + _days(1), NOW, NOW - _days(400)]
    for days in (1, 3, 7):
        updates += [NOW - _days(days) + US, NOW - _days(days), NOW - _days(days) - US]
    for status, last_update in itertools.product(AccountStatus, updates):
        rows.account(len(rows.accounts) % len(rows.connections), status.value, last_update)
    return rows


def test_the_arranged_rows_meet_every_rule_on_and_around_its_limits(settings: Settings) -> None:
    store(settings, boundaries(settings))
    counted, expected = both(settings)
    assert counted == expected
    # The arrangement reaches every branch: otherwise equal counts would prove little.
    assert counted.needing and counted.expiring and counted.connections > counted.needing
    assert all(counted.ages[b] for b in AGE_BUCKETS), counted.ages


@pytest.mark.parametrize(("transient_days", "warning_days"), [(0.5, 1.25), (10.0, 30.0)])
def test_the_limits_follow_the_settings(
    settings: Settings, transient_days: float, warning_days: float
) -> None:
    other = settings.model_copy(
        update={"transient_state_days": transient_days, "consent_warning_days": warning_days}
    )
    store(settings, boundaries(other))
    counted, expected = both(other)
    assert counted == expected and counted.needing and counted.expiring


def test_unlinked_users_inactive_connections_and_accounts_not_active_are_not_counted(
    settings: Settings,
) -> None:
    rows = Rows(users={1: True, 2: False})
    rows.connection(1, "SCARequired", NOW, NOW, True)  # counted: needs its user, consent ending
    rows.connection(1, "SCARequired", NOW, NOW, False)  # inactive
    rows.connection(2, "SCARequired", NOW, NOW, True)  # its user is unlinked: nobody's to fix
    for status in AccountStatus:
        rows.account(0, status.value, NOW - _days(10))
    store(settings, rows)
    counted, expected = both(settings)
    assert counted == expected
    assert (counted.connections, counted.needing, counted.expiring) == (1, 1, 1)
    assert counted.ages == {**dict.fromkeys(AGE_BUCKETS, 0), "over_7d": 1}


def _random_case(state: str, upper: list[bool]) -> str:
    return "".join(c.upper() if u else c for c, u in zip(state, itertools.cycle(upper or [False])))


KNOWN = sorted(TRANSIENT_STATES | USER_ACTION_STATES)
states = st.one_of(
    st.none(),
    st.sampled_from([s for s in STATES if s is not None]),
    st.builds(_random_case, st.sampled_from(KNOWN), st.lists(st.booleans(), max_size=8)),
    st.text(
        alphabet=st.one_of(
            st.sampled_from("bugvalidtnrmwesBUGVALIDTNRMWES \u0130\u0131K\u212a\uff22"),
            st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        ),
        max_size=64,
    ),
)
offsets = st.one_of(st.none(), st.integers(-20 * 86_400_000_000, 5 * 86_400_000_000))
connection_rows = st.tuples(states, offsets, offsets, st.sampled_from((1, 2)), st.booleans())
account_rows = st.tuples(st.sampled_from([s.value for s in AccountStatus]), offsets)


def _at(offset: int | None) -> datetime | None:
    return None if offset is None else NOW + timedelta(microseconds=offset)


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    connections=st.lists(connection_rows, min_size=1, max_size=40),
    accounts=st.lists(account_rows, max_size=40),
)
def test_generated_rows_are_counted_as_the_python_rules_count_them(
    settings: Settings, connections: list[Any], accounts: list[Any]
) -> None:
    rows = Rows(users={1: True, 2: False})
    for state, since, expires, user, active in connections:
        rows.connection(user, state, _at(since), _at(expires), active)
    for i, (status, last_update) in enumerate(accounts):
        rows.account(i % len(rows.connections), status, _at(last_update))
    store(settings, rows)
    counted, expected = both(settings)
    assert counted == expected


def test_no_character_outside_ascii_lowers_to_letters_of_the_transient_states() -> None:
    """The premise of the SQL's lowering (A-Z only, ``attention._ascii_lower``): were it false, a state
    spelled with such a character would be transient for Python and not for the database."""
    letters = set("".join(TRANSIENT_STATES))
    for code in range(0x80, 0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        lowered = chr(code).lower()
        assert not (lowered.isascii() and set(lowered) & letters), hex(code)


# -- served at most once per period ---------------------------------------------------------------------


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


class Deferred:
    """Computations started but not run until the test says so (a thread that has not run yet)."""

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []

    def __call__(self, work: Callable[[], None]) -> None:
        self.work.append(work)

    def run(self) -> None:
        work, self.work = self.work, []
        for w in work:
            w()


def counter(values: Iterable[object]) -> tuple[Callable[[float], object], list[float]]:
    """A computation returning the given values (an exception is raised), and the times it ran at."""
    it: Iterator[object] = iter(values)
    calls: list[float] = []

    def compute(at: float) -> object:
        calls.append(at)
        value = next(it)
        if isinstance(value, Exception):
            raise value
        return value

    return compute, calls


def test_a_value_is_computed_again_only_once_its_period_has_passed() -> None:
    clock = Clock(1000.0)
    compute, calls = counter(["a", "b", "c"])
    refreshed = Refreshed("test", compute, 60, clock=clock, spawn=lambda w: w())
    first = refreshed.latest()
    assert first is not None and (first.value, first.at) == ("a", 1000.0) and calls == [1000.0]
    clock.at = 1059.9
    assert refreshed.latest() == first and calls == [1000.0]  # within the period: served, not computed
    clock.at = 1060.0
    later = refreshed.latest()
    assert later is not None and (later.value, later.at) == ("b", 1060.0) and calls == [1000.0, 1060.0]
    clock.at = 1000.0  # the clock went back: the value's age means nothing, computed again
    assert refreshed.latest().value == "c"  # type: ignore[union-attr]


def test_a_scrape_never_waits_for_a_computation_once_there_is_a_value() -> None:
    clock, spawn = Clock(0.0), Deferred()
    compute, calls = counter(["a", "b"])
    refreshed = Refreshed("test", compute, 60, clock=clock, spawn=spawn, wait=0)
    assert refreshed.latest() is None  # nothing yet, and the (deferred) computation is running
    assert refreshed.latest() is None and len(spawn.work) == 1  # one computation at a time
    spawn.run()
    assert refreshed.latest().value == "a"  # type: ignore[union-attr]
    clock.at = 120.0
    served = refreshed.latest()  # due: a computation starts, the last value is served meanwhile
    assert served is not None and served.value == "a" and len(spawn.work) == 1
    clock.at = 121.0
    assert refreshed.latest() == served and len(spawn.work) == 1  # still running: not started twice
    spawn.run()
    assert refreshed.latest().value == "b" and calls == [0.0, 120.0]  # type: ignore[union-attr]


def test_only_the_first_computation_is_waited_for() -> None:
    """A database that hangs must not make every scrape wait: once the first computation ended, a
    caller with nothing to answer gets nothing at once."""
    clock, spawn = Clock(0.0), Deferred()
    compute, _calls = counter([RuntimeError("database down"), "a"])
    refreshed = Refreshed("test", compute, 60, clock=clock, spawn=spawn, wait=0)
    assert refreshed.latest() is None
    spawn.run()  # the first computation fails
    refreshed.wait = 30.0
    clock.at = 60.0
    t0 = time.monotonic()
    assert refreshed.latest() is None and len(spawn.work) == 1  # started, not waited for
    assert time.monotonic() - t0 < 10
    spawn.run()
    assert refreshed.latest().value == "a"  # type: ignore[union-attr]


def test_a_failed_computation_keeps_the_last_value_and_is_tried_again_a_period_later() -> None:
    clock = Clock(0.0)
    compute, calls = counter(["a", RuntimeError("database down"), "b"])
    refreshed = Refreshed("test", compute, 60, clock=clock, spawn=lambda w: w())
    assert refreshed.latest().value == "a"  # type: ignore[union-attr]
    clock.at = 60.0
    kept = refreshed.latest()
    assert kept is not None and (kept.value, kept.at) == ("a", 0.0)  # its time says how old it is
    clock.at = 90.0
    assert refreshed.latest() == kept and calls == [0.0, 60.0]  # not tried at every scrape
    clock.at = 120.0
    assert refreshed.latest().value == "b"  # type: ignore[union-attr]


def test_the_first_caller_waits_for_the_running_computation(settings: Settings) -> None:
    """With real threads: the first scrape of a process finds the counts the server started."""
    store(settings, Rows(users={1: True}))
    collector = ServiceCollector(settings)
    collector.counts.start_if_due()
    computed = collector.counts.latest()
    assert computed is not None and computed.value.connections == 0


def gauges(collector: ServiceCollector) -> dict[str, float]:
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            key = sample.name + "".join(f"/{v}" for k, v in sample.labels.items() if k == "bucket")
            if "queue" not in sample.labels:
                out[key] = sample.value
    return out


def test_the_collector_serves_the_last_counts_with_their_time_until_the_period_has_passed(
    settings: Settings,
) -> None:
    rows = Rows(users={1: True})
    rows.connection(1, "SCARequired", NOW, None, True)
    rows.account(0, "active", NOW - _days(2))
    store(settings, rows)
    clock = Clock(NOW.timestamp())
    collector = ServiceCollector(settings, clock=clock, spawn=lambda w: w())
    first = gauges(collector)
    assert first["openbanking_connections_needing_user"] == 1
    assert first["openbanking_accounts_by_data_age/1d_to_3d"] == 1
    assert first["balances_service_gauges_computed_timestamp_seconds"] == NOW.timestamp()
    assert first["balances_service_gauges_compute_duration_seconds"] >= 0

    with session_scope(settings) as s:  # a second connection needs its user, the account is refreshed
        s.execute(insert(BankConnection), [{**rows.connections[0], "id": "con-new", "external_id": 99}])
        s.execute(text("UPDATE bank_accounts SET powens_last_update = :t"), {"t": NOW})
    clock.at += settings.gauge_refresh_seconds - 1
    assert gauges(collector) == first  # within the period: the same counts, the same time

    clock.at += 1
    later = gauges(collector)
    assert later["openbanking_connections_needing_user"] == 2
    assert later["openbanking_accounts_by_data_age/under_1d"] == 1
    assert later["openbanking_accounts_by_data_age/1d_to_3d"] == 0
    assert later["balances_service_gauges_computed_timestamp_seconds"] == clock.at

    collector.settings = settings.model_copy(  # the database unreachable: the last counts stay, dated
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/unreachable"}
    )
    clock.at += settings.gauge_refresh_seconds
    assert gauges(collector) == later
