"""The push path over real HTTP: the sandbox signs and posts Powens' webhooks to ``balances webhooks
serve`` (uvicorn), a real worker applies them from the broker, PostgreSQL holds the result."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.devtools.sandbox_push import Pusher
from app.jsonio import loads
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, BankConnection, RefreshAttempt
from app.store.states import AccountStatus, Trigger
from tests.support.data import Seeded, seed_tenant
from tests.support.metrics import sum_scrape
from tests.support.polling import wait_until
from tests.support.processes import Receiver, Worker, run_cli, run_receiver, run_worker, service_env

SECRET = "whsec-test-0123456789abcdef"
OLD_SECRET = "whsec-old-fedcba9876543210"
PUSH_KEY = "push-signing-key-" + "9" * 32
RECEIVER_NEEDS_NOT = (
    "DATABASE_URL",
    "BALANCES_ENCRYPTION_KEY",
    "BALANCES_SIGNING_KEY",
    "POWENS_CLIENT_SECRET",
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(
    pg_migrated: str, redis_url: str, sandbox_server: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Receiver, Worker, dict[str, str]]]:
    logs = tmp_path_factory.mktemp("push")
    env = service_env(
        pg_migrated,
        redis_url,
        sandbox_server,
        POWENS_WEBHOOK_SECRET=f"{SECRET},{OLD_SECRET}",
        BALANCES_PUSH_SIGNING_KEY=PUSH_KEY,
    )
    # The internet-facing receiver holds the broker URL, Powens' webhook secret and its own push key:
    # no database URL, no encryption key, not the key every other task is signed with.
    with (
        run_worker(env, logs / "worker.log") as worker,
        run_receiver(receiver_env(env), logs / "receiver.log") as receiver,
    ):
        yield receiver, worker, env


def receiver_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in RECEIVER_NEEDS_NOT}


@pytest.fixture
def pushing(stack: tuple[Receiver, Worker, dict[str, str]], sandbox: Sandbox) -> Iterator[Pusher]:
    receiver, _, _ = stack
    sandbox.state.configure_webhooks(receiver.url, SECRET)
    assert sandbox.state.pusher is not None
    yield sandbox.state.pusher
    sandbox.state.configure_webhooks(None, None)


def push_rows(settings: Settings, tenant_id: str) -> list[RefreshAttempt]:
    with session_scope(settings) as s:
        return list(
            s.scalars(
                select(RefreshAttempt).where(
                    RefreshAttempt.tenant_id == tenant_id, RefreshAttempt.trigger == Trigger.WEBHOOK
                )
            )
        )


def latest(settings: Settings, account_id: str) -> dict[str, Decimal]:
    with session_scope(settings) as s:
        return {
            r.balance_type: r.current_balance
            for r in s.scalars(select(AccountBalance).where(AccountBalance.account_id == account_id))
        }


def connection_of(t: Seeded) -> tuple[Any, Any]:
    conn = next(iter(t.user.connections.values()))
    return t.user, conn


def queued(receiver: Receiver) -> float:
    """Events the receiver put on the broker so far (its own counter: a worker consuming the queue
    cannot hide one)."""
    total = 0.0
    for line in receiver.scrape().splitlines():
        if line.startswith("powens_webhooks_received_total{") and 'outcome="queued"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_signed_connection_sync_is_stored_through_the_refresh_write_path_without_a_powens_call(
    settings: Settings, sandbox: Sandbox, pushing: Pusher, stack: tuple[Receiver, Worker, dict[str, str]]
) -> None:
    receiver, worker, _ = stack
    t = seed_tenant(settings, sandbox, "wh-good", accounts=2)
    user, conn = connection_of(t)
    sandbox.state.reset_stats()
    before = sum_scrape(worker.scrape(), "openbanking_balances_refreshed_total")

    status = sandbox.state.sync_connection(user, conn)  # Powens syncs, then pushes CONNECTION_SYNCED

    assert status == 202
    rows = wait_until(
        lambda: len(push_rows(settings, "wh-good")) == 2 and push_rows(settings, "wh-good"), "rows"
    )
    assert {r.account_id for r in rows} == set(t.account_ids)
    assert all(r.outcome == "succeeded" and r.actor == "system:powens-webhook" for r in rows)
    for acc_id in t.account_ids:
        pushed = user.accounts[t.external[acc_id]]
        assert latest(settings, acc_id)["current"] == pushed.balance  # exactly what Powens pushed
    with session_scope(settings) as s:
        snaps = s.scalar(
            select(func.count())
            .select_from(BalanceSnapshot)
            .where(BalanceSnapshot.account_id.in_(t.account_ids))
        )
        assert snaps == 0  # a push updates the latest records; the day's snapshot is the nightly run's
        accounts = s.scalars(select(BankAccount).where(BankAccount.tenant_id == "wh-good")).all()
        assert all(a.pushed_at is not None for a in accounts)
    assert sandbox.state.stats()["total"] == 0  # no call reached Powens: the push carried the data
    scraped = worker.scrape()
    assert sum_scrape(scraped, "openbanking_balances_refreshed_total") == before + 2
    assert 'openbanking_balances_refreshed_total{provider="powens",trigger="webhook"}' in scraped
    telemetry = [e for e in worker.telemetry() if e.get("trigger") == "webhook"]
    assert {e["properties"]["accountId"] for e in telemetry} >= set(t.account_ids)  # type: ignore[index]
    assert 'powens_webhooks_received_total{event="CONNECTION_SYNCED",outcome="queued"}' in receiver.scrape()


@pytest.mark.parametrize(
    "how", ["missing signature", "wrong secret", "altered body", "stale date", "date from the future"]
)
def test_a_bad_missing_or_stale_signature_is_401_and_writes_and_queues_nothing(
    settings: Settings,
    sandbox: Sandbox,
    pushing: Pusher,
    stack: tuple[Receiver, Worker, dict[str, str]],
    how: str,
) -> None:
    receiver = stack[0]
    before = queued(receiver)
    t = seed_tenant(settings, sandbox, "wh-bad", accounts=1)
    user, conn = connection_of(t)
    sandbox.state.sync_connection(user, conn, push=False)
    body = sandbox.state.connection_synced_body(user, conn)
    url = f"{pushing.url}/CONNECTION_SYNCED"
    if how == "missing signature":
        status = requests.post(url, json={"user": {"id": user.id}}, timeout=10).status_code
    elif how == "wrong secret":
        status = pushing.send("CONNECTION_SYNCED", body, secret="not-the-secret")
    elif how == "altered body":
        from app.jsonio import dumps
        from app.push.signature import sign

        date = datetime.now(UTC).isoformat()
        signature = sign(
            SECRET.encode(), "POST", "/webhooks/powens/CONNECTION_SYNCED", date, dumps(body).encode()
        )
        body["connection"]["accounts"][0]["balance"] = Decimal("99999999.99")  # a man in the middle
        status = requests.post(
            url,
            data=dumps(body).encode(),
            headers={"BI-Signature": signature, "BI-Signature-Date": date},
            timeout=10,
        ).status_code
    elif how == "stale date":
        status = pushing.send("CONNECTION_SYNCED", body, date=datetime.now(UTC) - timedelta(minutes=6))
    else:
        status = pushing.send("CONNECTION_SYNCED", body, date=datetime.now(UTC) + timedelta(minutes=6))
    assert status == 401
    assert queued(receiver) == before
    assert push_rows(settings, "wh-bad") == []
    assert latest(settings, t.account_ids[0]) == {}


def test_a_redelivered_event_is_written_once_and_an_older_one_never_regresses(
    settings: Settings, sandbox: Sandbox, pushing: Pusher, stack: tuple[Receiver, Worker, dict[str, str]]
) -> None:
    _, worker, _ = stack
    t = seed_tenant(settings, sandbox, "wh-idem", accounts=2)
    user, conn = connection_of(t)
    sandbox.state.sync_connection(user, conn, push=False)
    older = sandbox.state.connection_synced_body(user, conn)
    time.sleep(1.05)  # Powens' last_update has one-second resolution
    sandbox.state.sync_connection(user, conn, push=False)
    newer = sandbox.state.connection_synced_body(user, conn)
    expected = {a: user.accounts[t.external[a]].balance for a in t.account_ids}

    assert pushing.send("CONNECTION_SYNCED", newer) == 202
    assert pushing.send("CONNECTION_SYNCED", newer) == 202  # Powens delivering it again
    assert pushing.send("CONNECTION_SYNCED", older) == 202  # and an earlier sync arriving late
    wait_until(
        lambda: 'outcome="out_of_order"' in worker.scrape() and 'outcome="duplicate"' in worker.scrape(),
        "all three events applied",
    )
    rows = push_rows(settings, "wh-idem")
    assert len(rows) == 2  # one per account: the redelivery and the older event wrote nothing
    assert {a: latest(settings, a)["current"] for a in t.account_ids} == expected
    with session_scope(settings) as s:
        snaps = s.scalars(select(BalanceSnapshot).where(BalanceSnapshot.account_id.in_(t.account_ids))).all()
        assert len({(x.account_id, x.balance_type, x.day) for x in snaps}) == len(snaps)
        assert all(x.current_balance == expected[x.account_id] for x in snaps if x.balance_type == "current")


def test_a_push_that_needs_the_user_is_recorded_as_a_refresh_would_record_it(
    settings: Settings, sandbox: Sandbox, pushing: Pusher
) -> None:
    t = seed_tenant(settings, sandbox, "wh-sca", accounts=1)
    user, conn = connection_of(t)
    conn.state = "SCARequired"
    sandbox.state.sync_connection(user, conn)
    [row] = wait_until(lambda: push_rows(settings, "wh-sca"), "the failure row")
    assert row.outcome == "failed" and row.reason == "needs_user_action"
    assert "balances connections reconnect-link --tenant wh-sca" in (row.message or "")
    with session_scope(settings) as s:
        stored = s.scalars(select(BankConnection).where(BankConnection.tenant_id == "wh-sca")).one()
        assert stored.state == "SCARequired" and stored.state_since is not None


def test_status_events_and_unknown_users_and_accounts(
    settings: Settings, sandbox: Sandbox, pushing: Pusher, stack: tuple[Receiver, Worker, dict[str, str]]
) -> None:
    _, worker, _ = stack
    t = seed_tenant(settings, sandbox, "wh-status", accounts=2)
    user, conn = connection_of(t)
    first, second = (user.accounts[t.external[a]] for a in t.account_ids)
    disabled = datetime.now(UTC).astimezone(settings.powens_zone).strftime("%Y-%m-%d %H:%M:%S")
    assert pushing.send("ACCOUNT_DISABLED", {**first.wire(None), "disabled": disabled}) == 202
    wait_until(lambda: _status(settings, t.account_ids[0]) == AccountStatus.DISABLED, "disabled")
    assert pushing.send("ACCOUNT_ENABLED", first.wire(None)) == 202
    wait_until(lambda: _status(settings, t.account_ids[0]) == AccountStatus.ACTIVE, "enabled again")

    stranger = sandbox.state.create_user()  # a Powens user no tenant linked
    s_user, s_conn = stranger, next(iter(stranger.connections.values()))
    assert sandbox.state.sync_connection(s_user, s_conn) == 202
    found = {**second.wire(None), "id": 987654}  # an account Powens found for a linked user
    assert pushing.send("ACCOUNT_SYNCED", found) == 202
    wait_until(
        lambda: 'outcome="unknown_user"' in worker.scrape() and 'outcome="registered"' in worker.scrape(),
        "the unknown user counted and the new account registered",
    )
    with session_scope(settings) as s:
        rows = s.scalars(select(BankAccount)).all()
    assert len(rows) == 3  # the stranger's accounts were not registered...
    assert {r.tenant_id for r in rows} == {"wh-status"}  # ...the found one was, in its user's tenant
    assert [r.account_id for r in push_rows(settings, "wh-status")] == [
        r.id for r in rows if r.external_id == 987654
    ]

    assert pushing.send("CONNECTION_DELETED", {"id": conn.id, "id_user": user.id}) == 202
    wait_until(
        lambda: all(_status(settings, a) == AccountStatus.DELETED for a in t.account_ids),
        "connection deleted",
    )


def _status(settings: Settings, account_id: str) -> str | None:
    with session_scope(settings) as s:
        row = s.get(BankAccount, account_id)
        return row.status if row is not None else None


def test_unknown_events_oversized_bodies_and_junk_get_their_status_and_queue_nothing(
    settings: Settings,
    sandbox: Sandbox,
    pushing: Pusher,
    redis_url: str,
    stack: tuple[Receiver, Worker, dict[str, str]],
) -> None:
    receiver, _, env = stack
    before = queued(receiver)
    assert pushing.send("USER_CREATED", {"id": 5}) == 202  # signed, but not an event we act on
    assert pushing.send("CONNECTION_SYNCED", {"user": {"id": "x"}}) == 400  # signed, but not the event
    assert queued(receiver) == before
    assert 'powens_webhooks_received_total{event="unknown",outcome="unknown_event"} 1.0' in receiver.scrape()
    with run_receiver(
        receiver_env(env), Path(receiver.log.parent) / "small.log", BALANCES_WEBHOOK_MAX_BODY_BYTES="2048"
    ) as small:
        big = Pusher(small.url, SECRET)
        t = seed_tenant(settings, sandbox, "wh-big", accounts=8)
        user, conn = connection_of(t)
        body = sandbox.state.connection_synced_body(user, conn)
        assert big.send("CONNECTION_SYNCED", body) == 413
        assert queued(small) == 0


def test_a_rotated_secret_accepts_the_old_and_the_new_and_nothing_else(
    settings: Settings, sandbox: Sandbox, pushing: Pusher
) -> None:
    t = seed_tenant(settings, sandbox, "wh-rotate", accounts=1)
    user, conn = connection_of(t)
    body = sandbox.state.connection_synced_body(user, conn)
    assert pushing.send("CONNECTION_SYNCED", body, secret=OLD_SECRET) == 202
    assert pushing.send("CONNECTION_SYNCED", body, secret=SECRET) == 202
    assert pushing.send("CONNECTION_SYNCED", body, secret="a-third-secret") == 401


def test_healthz_is_ready_only_with_the_broker_and_an_unreachable_broker_is_a_503(
    pg_migrated: str, sandbox_server: Sandbox, tmp_path: Path, stack: tuple[Receiver, Worker, dict[str, str]]
) -> None:
    receiver, _, env = stack
    assert requests.get(receiver.url.replace("/webhooks/powens", "/healthz"), timeout=5).status_code == 200
    from tests.support.processes import free_port

    dead = dict(receiver_env(env), CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    with run_receiver(dead, tmp_path / "dead.log") as orphan:
        assert requests.get(orphan.url.replace("/webhooks/powens", "/healthz"), timeout=5).status_code == 503
        status = Pusher(orphan.url, SECRET).send(
            "ACCOUNT_ENABLED", {"id": 1, "id_connection": 2, "id_user": 3}
        )
        assert status == 503  # not on the broker: not acknowledged, so Powens sends it again


def test_the_nightly_run_does_not_read_again_what_a_push_made_fresh(
    settings: Settings, sandbox: Sandbox, pushing: Pusher, stack: tuple[Receiver, Worker, dict[str, str]]
) -> None:
    _, _, env = stack
    pushed = [seed_tenant(settings, sandbox, f"wh-night-{i}", accounts=2) for i in range(3)]
    polled = seed_tenant(settings, sandbox, "wh-night-polled", accounts=2)
    for t in pushed:
        user, conn = connection_of(t)
        assert sandbox.state.sync_connection(user, conn) == 202
    wait_until(lambda: all(len(push_rows(settings, t.tenant_id)) == 2 for t in pushed), "pushes applied")
    sandbox.state.reset_stats()

    proc = run_cli(env, "--as", "alice", "run", "nightly", "--json", "--timeout", "120")

    assert proc.returncode == 0, proc.stderr
    status = loads(proc.stdout)
    assert status["accounts"]["succeeded"] == 8 and status["accounts"]["failed"] == 0
    calls = sandbox.state.stats()
    users_read = {int(u) for u in calls["by_user"]}
    assert users_read == {polled.user.id}  # 4 Powens users, 1 read: the pushed ones were not read again
    assert calls["total"] < 4
    with session_scope(settings) as s:
        notes = [
            r.errors or []
            for r in s.scalars(
                select(RefreshAttempt).where(
                    RefreshAttempt.run_id == status["runId"], RefreshAttempt.tenant_id.like("wh-night-%")
                )
            )
            if r.tenant_id != "wh-night-polled"
        ]
        assert len(notes) == 6 and all(any("refreshed from a Powens push" in n for n in e) for e in notes)
    for t in pushed:
        assert repo is not None and all(latest(settings, a) for a in t.account_ids)
