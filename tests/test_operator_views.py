"""What an operator sees before a user notices: the bank data's own age, consents about to end,
transient connection states that last, and when a refused attempt may be tried again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.ops.exporter import ServiceCollector
from app.reports.attention import age_bucket, age_text, tenant_views
from app.store.db import session_scope
from app.store.models import BankAccount
from tests.support.data import seed_tenant
from tests.support.processes import run_cli, service_env


def _arrange(settings: Settings, sandbox: Sandbox, tenant: str) -> tuple[Any, Any, Any]:
    """Two connections: the first's consent ends in 3 days and one of its accounts has bank data 10 days
    old; the second is in a transient state (the bank's site is down)."""
    t = seed_tenant(settings, sandbox, tenant, connections=2, accounts=1)
    first, second = sorted(t.user.connections.values(), key=lambda c: c.id)
    now = datetime.now(UTC).replace(microsecond=0)
    first.expire = now + timedelta(days=3)
    second.expire = now + timedelta(days=90)
    second.state = "websiteUnavailable"
    old_account = next(a for a in t.user.accounts.values() if a.id_connection == first.id)
    old_account.last_update = now - timedelta(days=10)
    with session_scope(settings) as s:  # as if Powens had not synced it when it was first listed
        s.execute(
            update(BankAccount)
            .where(BankAccount.tenant_id == tenant, BankAccount.external_id == old_account.id)
            .values(powens_last_update=None)
        )
    proc_env = service_env(settings.database_url, settings.celery_broker_url, sandbox)
    proc = run_cli(proc_env, "--as", "alice", "accounts", "sync", "--tenant", tenant)
    assert proc.returncode == 0, proc.stderr
    return t, first, second


def test_the_summary_lists_old_bank_data_consents_ending_and_transient_states_that_last(
    settings: Settings, sandbox: Sandbox
) -> None:
    _, first, second = _arrange(settings, sandbox, "ops-views")
    now = datetime.now(UTC)
    with session_scope(settings) as s:
        today = tenant_views(s, settings, "ops-views", now)
        later = tenant_views(s, settings, "ops-views", now + timedelta(days=4))
    old_ids = [a["accountId"] for a in today["oldBankData"]]
    assert len(old_ids) == 1 and today["oldBankData"][0]["age"].endswith(" d")
    [expiring] = today["consentsExpiring"]
    assert expiring["powensConnectionId"] == first.id and 2.9 <= expiring["daysLeft"] <= 3.0
    assert expiring["reconnectCommand"].startswith("balances connections reconnect-link --tenant ops-views")
    assert today["connectionsNeedingUser"] == []  # a transient state is Powens' to retry...
    [stuck] = later["connectionsNeedingUser"]  # ...until it lasts past BALANCES_TRANSIENT_STATE_DAYS
    assert stuck["powensConnectionId"] == second.id and stuck["why"] == "lasting_transient"
    assert stuck["state"] == "websiteUnavailable" and stuck["since"] is not None


def test_the_beat_gauges_count_the_same_views_without_ids(settings: Settings, sandbox: Sandbox) -> None:
    _arrange(settings, sandbox, "ops-gauges")
    families = {f.name: f for f in ServiceCollector(settings).collect()}
    ages = {s.labels["bucket"]: s.value for s in families["openbanking_accounts_by_data_age"].samples}
    assert ages["over_7d"] == 1 and sum(ages.values()) == 2
    assert families["openbanking_connections_consent_expiring"].samples[0].value == 1
    assert families["openbanking_connections"].samples[0].value == 2
    assert families["openbanking_connections_needing_user"].samples[0].value == 0  # not lasting yet
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= {"bucket", "queue"}  # never a tenant or account id


def test_accounts_list_and_show_print_the_bank_datas_age(settings: Settings, sandbox: Sandbox) -> None:
    t, _, _ = _arrange(settings, sandbox, "ops-cli")
    env = service_env(settings.database_url, settings.celery_broker_url, sandbox, COLUMNS="250")
    listed = run_cli(env, "--as", "alice", "accounts", "list", "--tenant", "ops-cli")
    assert listed.returncode == 0, listed.stderr
    assert "(old)" in listed.stdout and "bank data age" in listed.stdout
    as_json = run_cli(env, "--as", "alice", "accounts", "list", "--tenant", "ops-cli", "--json")
    assert '"powensLastUpdate"' in as_json.stdout and '"consentExpiresAt"' in as_json.stdout
    from app.refresh.handler import refresh_balances

    for acc in t.account_ids:
        refresh_balances({"tenantId": "ops-cli", "accountId": acc}, "alice", "on_demand")
    shown = run_cli(env, "--as", "alice", "show", "--tenant", "ops-cli")
    assert shown.returncode == 0, shown.stderr
    assert "10.0 d (old)" in shown.stdout  # refreshed a moment ago, and still the bank's data of 10 days ago


def test_ages_are_bucketed_and_written_for_people() -> None:
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    assert [age_bucket(now - timedelta(days=d), now) for d in (0.5, 2, 5, 30)] == [
        "under_1d",
        "1d_to_3d",
        "3d_to_7d",
        "over_7d",
    ]
    assert age_bucket(None, now) == "never" and age_text(None, now) == "never"
    assert age_text(now - timedelta(minutes=42), now) == "42 min"
    assert age_text(now - timedelta(hours=5), now) == "5.0 h"
    assert age_text(now - timedelta(days=3, hours=5), now) == "3.2 d"
