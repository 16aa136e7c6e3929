"""Hostile input, bounded: hostile shell arguments, fuzzed contract input and Powens payloads (pure and
through the handler), strings, dates and ids Powens should never send.
Figures go to build/security.json (``tests.support.figures``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.config import Settings
from app.contract import parse_input
from app.devtools.sandbox import Sandbox
from app.errors import InvalidInput, Reason, RefreshError
from app.powens.errors import PowensError
from app.powens.models import PowensAccount
from app.refresh.deps import Deps
from app.refresh.handler import check_policy, execute
from app.refresh.outcomes import Attempt, Failed, Succeeded
from app.refresh.records import map_balances
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, RefreshAttempt, Tenant
from app.store.states import Trigger
from tests.support.data import seed_tenant
from tests.support.figures import count_case, note
from tests.support.processes import run_cli, service_env

UTC_ZONE = ZoneInfo("UTC")
PUSH_KEY = "the-receivers-push-key-" + "7" * 32
FUZZ_EXAMPLES = 5_000  # per pure fuzz test; with the database-backed ones, over 10,000 cases a run
pytestmark = pytest.mark.usefixtures("security_figures")


# -- hostile input ---------------------------------------------------------------------------------------

HOSTILE = [
    ("an unknown account", ["refresh", "--tenant", "sec-cli", "--account", "acc_does_not_exist"]),
    ("an unknown tenant", ["refresh", "--tenant", "nobody-here", "--account", "acc_x"]),
    ("SQL in the tenant", ["refresh", "--tenant", "x'; DROP TABLE tenants; --", "--account", "a"]),
    ("SQL in the account", ["refresh", "--tenant", "sec-cli", "--account", "1 OR 1=1"]),
    ("a huge tenant id", ["refresh", "--tenant", "t" * 100_000, "--account", "a"]),
    ("control characters", ["refresh", "--tenant", "sec-cli", "--account", "acc\x1b[31m\nforged log line"]),
    (
        "a huge balance type",
        ["refresh", "--tenant", "sec-cli", "--account", "a", "--balance-type", "x" * 5000],
    ),
    ("a newline in the actor", ["--as", "alice\n", "show", "--tenant", "sec-cli"]),
    ("SQL in a summary", ["summary", "--tenant", "'; SELECT pg_sleep(10); --"]),
    ("an unknown run", ["run", "status", "run_\x07nope"]),  # (argv cannot carry NUL)
    (
        "an unknown connection",
        ["connections", "reconnect-link", "--tenant", "sec-cli", "--connection", "con_nope"],
    ),
    ("a Powens user id beyond any column", ["powens", "link", "--tenant", "sec-cli", "--user-id", "9" * 25]),
    ("a negative Powens user id", ["powens", "link", "--tenant", "sec-cli", "--user-id", "-4"]),
    ("a tenant name beyond its column", ["tenant", "add", "sec-long", "--name", "n" * 5000]),
    ("a tenant id with control characters", ["tenant", "add", "sec\x1bx"]),
    ("a role nobody knows", ["admin", "grant", "bob", "--role", "r" * 5000]),
    (
        "a timeout that is not a number",
        ["refresh", "--tenant", "sec-cli", "--account", "a", "--timeout", "nan"],
    ),
    ("a negative timeout", ["run", "nightly", "--timeout", "-5"]),
]


@pytest.mark.e2e
def test_hostile_cli_arguments_get_one_line_a_nonzero_exit_and_dispatch_nothing(
    settings: Settings, sandbox: Sandbox, redis_url: str
) -> None:
    seed_tenant(settings, sandbox, "sec-cli", accounts=1)
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    env = service_env(settings.database_url, redis_url, sandbox)
    for what, args in HOSTILE:
        full = args if args[0] == "--as" else ["--as", "alice", *args]
        proc = run_cli(env, *full)
        # the contract's failure telemetry event is a JSON line on stderr too; the error is the rest
        telemetry = '{"event": "openbanking.balances.'
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(telemetry)]
        assert proc.returncode != 0, (what, proc.stdout, proc.stderr)
        assert len(lines) == 1, (what, proc.stderr)  # one clear line, no traceback
        assert "Traceback" not in proc.stderr + proc.stdout
    assert [k for k in broker.keys("*") if not k.startswith(b"_kombu")] == []  # nothing was dispatched
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(Tenant)) == 1  # and nothing was dropped
    note("hostile CLI arguments", tried=len(HOSTILE), dispatched=0, multi_line_errors=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
contract_like = st.fixed_dictionaries(
    {},
    optional={
        "tenantId": json_values,
        "accountId": json_values,
        "connectionId": json_values,
        "balanceTypes": json_values,
        "forceRefresh": json_values,
        "extra": json_values,
    },
)


@hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(contract_like)
def test_fuzzed_contract_input_is_a_model_or_a_clean_invalid_input(raw: dict[str, Any]) -> None:
    try:
        inp = parse_input(raw)
    except InvalidInput as exc:
        assert exc.reason is Reason.INVALID_INPUT and "\n" not in exc.message
    else:
        assert 1 <= len(inp.tenant_id) <= 128 and 1 <= len(inp.account_id) <= 128
    count_case("fuzzed contract inputs")


amounts = st.one_of(
    st.none(),
    st.decimals(allow_nan=False, allow_infinity=False, places=None),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.booleans(),
)
# Dates as Powens writes them (naive, or with an offset), over the whole range Python can hold: the
# year 1 and the year 9999 cannot be converted to UTC from every zone.
powens_dates = st.one_of(
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
    st.datetimes(
        timezones=st.sampled_from([UTC_ZONE, ZoneInfo("America/New_York"), ZoneInfo("Asia/Tokyo")])
    ).map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.isoformat()),
)
# Ids around every boundary a column has.
powens_ids = st.one_of(
    st.integers(), st.integers(min_value=2**62, max_value=2**65), st.text(max_size=10), st.none()
)
powens_like = st.fixed_dictionaries(
    {},
    optional={
        "id": powens_ids,
        "id_connection": powens_ids,
        "id_user": st.one_of(powens_ids, st.booleans()),
        "name": st.one_of(st.text(max_size=400), st.none(), st.integers()),
        "original_name": st.one_of(st.text(max_size=400), st.none()),
        "balance": amounts,
        "coming": amounts,
        "currency": st.one_of(
            st.none(),
            st.text(max_size=5),
            st.fixed_dictionaries(
                {"id": st.one_of(st.sampled_from(["EUR", "USD", "ZZZ", ""]), st.integers())},
                optional={"precision": st.one_of(st.integers(), st.text(max_size=3))},
            ),
        ),
        "type": st.one_of(st.text(max_size=80), st.none()),
        "usage": st.one_of(st.sampled_from(["PRIV", "ORGA", "ASSO"]), st.text(max_size=30), st.none()),
        "last_update": st.one_of(
            st.none(), st.text(max_size=25), st.just("2026-11-23 10:00:00"), st.integers(), powens_dates
        ),
        "disabled": st.one_of(st.none(), st.just("2026-11-23 10:00:00"), st.text(max_size=10), powens_dates),
        "deleted": st.one_of(st.none(), st.just("2026-11-23 10:00:00")),
        "iban": st.one_of(st.none(), st.text(max_size=80)),
        "number": st.one_of(st.none(), st.text(max_size=80)),
        "error": st.one_of(st.none(), st.text(max_size=80)),
    },
)


@hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(powens_like)
def test_fuzzed_powens_accounts_are_records_or_a_clean_invalid_response(raw: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    try:
        acc = PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/users/{id_user}/accounts")
    except PowensError as exc:
        assert exc.reason is Reason.INVALID_RESPONSE
    else:
        for draft in map_balances(acc, datetime.now(UTC)):
            assert (
                isinstance(draft.current_balance, Decimal) and abs(draft.current_balance) < Decimal(10) ** 18
            )
    count_case("fuzzed Powens payloads")


def test_fuzzed_input_through_the_handler_never_writes_on_rejection(
    settings: Settings, sandbox: Sandbox
) -> None:
    """The same fuzz, now through the handler on the real database: a rejection writes its audit row
    and nothing else."""
    seed_tenant(settings, sandbox, "sec-fuzz", accounts=1)
    cases = 0

    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(contract_like)
    def one(raw: dict[str, Any]) -> None:
        nonlocal cases
        cases += 1
        with session_scope(settings) as s:
            balances = s.scalar(select(func.count()).select_from(AccountBalance))
        try:
            check_policy(raw, "alice", Trigger.ON_DEMAND, deps=Deps(settings))
        except RefreshError as exc:
            assert exc.reason in (Reason.INVALID_INPUT, Reason.NOT_FOUND)
        with session_scope(settings) as s:
            assert s.scalar(select(func.count()).select_from(AccountBalance)) == balances

    one()
    count_case("fuzzed contract inputs", cases)


def test_a_rejected_input_with_nul_and_newlines_is_recorded_with_its_ids_escaped(settings: Settings) -> None:
    # Found by the fuzz above: the failure audit row kept the raw tenantId, and PostgreSQL refused
    # the NUL, so the rejection itself ended in a database error and was never recorded.
    raw = {"tenantId": "ten\x00ant", "accountId": "acc\nforged", "balanceTypes": ["cur\x00rent"]}
    with pytest.raises(InvalidInput):
        check_policy(raw, "alice", Trigger.ON_DEMAND, deps=Deps(settings))
    with session_scope(settings) as s:
        row = s.scalars(select(RefreshAttempt).where(RefreshAttempt.tenant_id == "ten\\x00ant")).one()
        assert row.account_id == "acc\\x0aforged" and row.reason == Reason.INVALID_INPUT.value


def test_fuzzed_powens_payloads_through_the_handler_keep_previous_balances(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "sec-wire", accounts=1)
    acc = t.account_ids[0]
    first = execute({"tenantId": "sec-wire", "accountId": acc}, "alice", Trigger.ON_DEMAND)
    assert isinstance(first, Succeeded)
    cases = 0

    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(powens_like)
    def one(wire: dict[str, Any]) -> None:
        nonlocal cases
        cases += 1
        kept = {k: v for k, v in wire.items() if k not in ("id", "id_connection", "deleted")}
        sandbox.state.wire_overrides[t.external[acc]] = kept
        with session_scope(settings) as s:
            before = {(b.balance_type, b.current_balance) for b in repo.latest_balances(s, "sec-wire", acc)}
        outcome = execute(
            {"tenantId": "sec-wire", "accountId": acc}, "alice", Trigger.ON_DEMAND, attempt=Attempt(3, 3)
        )
        assert isinstance(outcome, Succeeded | Failed)
        if isinstance(outcome, Failed):
            assert outcome.error.reason in (
                Reason.INVALID_RESPONSE,
                Reason.NOT_FOUND,
                Reason.NEEDS_USER_ACTION,
            )
            with session_scope(settings) as s:
                after = {
                    (b.balance_type, b.current_balance) for b in repo.latest_balances(s, "sec-wire", acc)
                }
            assert after == before  # a failure writes nothing but its audit row

    try:
        one()
    finally:
        sandbox.state.wire_overrides.clear()
    count_case("fuzzed Powens payloads", cases)


def test_long_strings_from_powens_are_an_invalid_response_not_a_database_error() -> None:
    for field, value in (("name", "n" * 301), ("type", "t" * 65), ("error", "e" * 65)):
        raw = {
            "id": 1,
            "id_connection": 2,
            "name": "ok",
            "balance": 1,
            "currency": {"id": "EUR"},
            field: value,
        }
        with pytest.raises(PowensError) as info:
            PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
        assert info.value.reason is Reason.INVALID_RESPONSE and "longer than" in info.value.message


def test_a_nul_character_from_powens_is_an_invalid_response_not_a_database_error() -> None:
    # PostgreSQL text cannot hold NUL: stored, it would fail the write half-way as a database error
    # (and be re-queued as our own outage); refused at the parser, it is a clean invalid_response.
    for field in ("name", "iban", "type", "error"):
        raw = {"id": 1, "id_connection": 2, "name": "ok", "balance": 1, "currency": {"id": "EUR"}}
        raw[field] = "bad\x00value"
        with pytest.raises(PowensError) as info:
            PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
        assert info.value.reason is Reason.INVALID_RESPONSE and field in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("last_update", "0001-01-01"),  # before UTC can express it in Europe/Paris
        ("last_update", "9999-12-31T23:59:59-05:00"),  # after it
        ("id", 2**63),  # beyond a BIGINT column
        ("id_connection", -5),
        ("id", 0),
    ],
)
def test_out_of_range_dates_and_ids_from_powens_are_an_invalid_response(field: str, value: object) -> None:
    raw = {"id": 1, "id_connection": 2, "name": "ok", "balance": 1, "currency": {"id": "EUR"}, field: value}
    with pytest.raises(PowensError) as info:
        PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
    assert info.value.reason is Reason.INVALID_RESPONSE and field in info.value.message


def test_every_log_format_is_scrubbed() -> None:
    import io
    import logging

    from app.ops import logs

    stream = io.StringIO()
    logs.configure("INFO", "text", stream=stream)
    try:
        logging.getLogger("sec").warning(
            "Authorization: Bearer sbx_0123456789abcdef0123 token=abc123secret "
            "iban FR7630004000031234567890143"
        )
    finally:
        logs.configure("WARNING", "json")
    text = stream.getvalue()
    assert "sbx_0123456789abcdef0123" not in text and "abc123secret" not in text
    assert "FR7630004000031234567890143" not in text and "0143" in text


def test_the_sandbox_admin_routes_need_its_token(sandbox: Sandbox) -> None:
    import requests

    assert requests.get(sandbox.admin_url + "stats", timeout=5).status_code == 401
    from app.devtools.sandbox import admin_call

    assert "total" in admin_call(sandbox.admin_url, sandbox.state.admin_token, "stats")
