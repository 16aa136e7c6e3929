"""``balances demo``: the whole refresh path on one machine with no services.

A Powens sandbox runs on loopback; tenants are seeded through the real Powens calls (``/auth/init``,
connections, accounts); every account is refreshed by the same task and handler a worker runs, on a
Celery worker embedded in this process (a thread). Then Powens pushes a sync to the webhook receiver
(``app.devtools.demo_push``), and the nightly run reads only what no push made fresh. With no
``CELERY_BROKER_URL`` in the environment the broker is Celery's in-memory transport and coordination
stays in this process; with one, that broker is used. ``DATABASE_URL`` is used when set, else the
embedded SQLite file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from app.config import ENV_FILE, Settings, load_settings, use_settings
from app.devtools.sandbox import Sandbox, SandboxState
from app.policy import ADMIN

DEMO_ACTOR = "demo-admin"
TENANTS = ("demo-acme", "demo-globex", "demo-initech", "demo-umbrella", "demo-hooli")
IN_MEMORY_BROKER = "memory://localhost/"
SANDBOX_SEED = 7  # `balances sandbox serve --seed 7` makes the same Powens users, ids and tokens
SANDBOX_PORT = 8765  # `balances sandbox serve`'s default port


@dataclass
class Row:
    tenant: str
    account_id: str
    name: str
    outcome: str
    current: Decimal | None = None
    available: Decimal | None = None
    currency: str = ""
    note: str = ""


def _demo_settings(sandbox: Sandbox) -> Settings:
    base = load_settings()
    overrides: dict[str, object] = {
        "powens_base_url_override": sandbox.base_url,
        "powens_client_id": "demo-client",
        "retry_base_seconds": 0.2,
        "retry_cap_seconds": 2.0,
        "metrics_port": 0,
        "log_level": "WARNING",
    }
    if "celery_broker_url" not in base.model_fields_set:
        # No services: an in-memory broker, and coordination (locks, shared reads, rate limit) inside
        # this process.
        overrides["celery_broker_url"] = IN_MEMORY_BROKER
        overrides["coordination"] = "local"
        overrides["powens_rate_limit"] = 0

    if base.encryption_key is None:
        from app.store.secrets import generate_key

        # Kept in balances.env beside the database (write_env), so the shell can use it afterwards.
        overrides["encryption_key"] = SecretStr(generate_key())
    import secrets

    if base.signing_key is None:
        overrides["signing_key"] = SecretStr(secrets.token_hex(32))
    if base.webhook_secret is None:
        overrides["webhook_secret"] = SecretStr(secrets.token_hex(16))
    return base.model_copy(update=overrides)


def write_env(settings: Settings, console: Console) -> None:
    """The demo's settings beside its embedded database (``balances.env``, read by every command run
    in this directory), once: the keys that opened its tokens stay the keys, run after run, and the
    shell can read and write the demo database (``keys rotate``, a refresh with a worker beside it).
    Not for a database the demo was pointed at (DATABASE_URL): its settings are its operator's."""
    if "database_url" in settings.model_fields_set:
        return
    path = Path(ENV_FILE)
    if path.exists():
        return

    def secret(value: SecretStr | None) -> str:
        return value.get_secret_value() if value is not None else ""

    lines = [
        "# Written by `balances demo`: the settings of the demo database beside this file (balances.db),",
        "# read by every `balances` command and `celery -A app worker` run in this directory (the process",
        "# environment wins). Demo keys: never use them for real data.",
        f"BALANCES_ENCRYPTION_KEY={secret(settings.encryption_key)}",
        f"BALANCES_SIGNING_KEY={secret(settings.signing_key)}",
        f"POWENS_WEBHOOK_SECRET={secret(settings.webhook_secret)}",
        "# `balances sandbox serve --seed 7 --users 3` serves the demo's Powens users (same ids, tokens).",
        f"POWENS_BASE_URL=http://127.0.0.1:{SANDBOX_PORT}/2.0",
        "POWENS_CLIENT_ID=demo-client",
        "# The shell acts as the demo's admin unless told otherwise (--as NAME).",
        f"BALANCES_ACTOR={DEMO_ACTOR}",
    ]
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    console.print(f"Settings of the demo database: {path.resolve()} (read by every command run here).")


def run_demo(tenants: int = 3, console: Console | None = None) -> int:
    console = console or Console()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("openbanking.telemetry").setLevel(logging.WARNING)
    started = time.perf_counter()
    with Sandbox(SandboxState(seed=SANDBOX_SEED)) as sandbox:
        settings = _demo_settings(sandbox)
        use_settings(settings)
        try:
            return _run(settings, sandbox, min(max(tenants, 1), len(TENANTS)), console, started)
        finally:
            use_settings(None)


def start_embedded_worker(settings: Settings) -> None:
    """A Celery worker on a daemon thread of this process, consuming every queue of the service until
    the process exits. It is not stopped: Celery's stop flag is process-wide and a warm stop waits
    for two 2-second broker polls; everything the demo waits for has committed before it returns."""
    import threading

    from celery.contrib.testing.worker import TestWorkController, setup_app_for_worker

    from app.celery import app

    app.conf.broker_url = settings.celery_broker_url
    if settings.celery_broker_url == IN_MEMORY_BROKER:
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "polling_interval": 0.02,
        }
    # One thread: SQLite takes one writer at a time, and the demo is small.
    setup_app_for_worker(app, "WARNING", None)
    worker = TestWorkController(
        app=app,
        pool="threads",
        concurrency=1,
        loglevel="WARNING",
        logfile=None,
        ready_callback=None,
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
    )
    threading.Thread(target=worker.start, name="demo-worker", daemon=True).start()
    worker.ensure_started()
    # The worker set up logging (JSON on stderr); the demo's telemetry stays quiet.
    logging.getLogger("openbanking.telemetry").setLevel(logging.WARNING)


def _run(settings: Settings, sandbox: Sandbox, n_tenants: int, console: Console, started: float) -> int:
    from app.admin.accounts import sync_accounts
    from app.admin.manage import add_tenant, grant
    from app.admin.powens_users import link_powens_user
    from app.devtools.sandbox import admin_call
    from app.policy import Actor
    from app.powens.client import build_client
    from app.refresh.deps import Deps
    from app.store import repo
    from app.store.db import session_scope
    from app.store.migrate import upgrade
    from app.store.states import AccountStatus

    in_memory = settings.celery_broker_url == IN_MEMORY_BROKER
    where = settings.database_url.split("@")[-1] if not settings.is_sqlite else settings.database_url
    console.print(f"[bold]balances demo[/] — Powens sandbox at {sandbox.base_url}, database {where}")
    upgrade(settings)
    actor = Actor(DEMO_ACTOR, frozenset({ADMIN}))
    # Granted by the demo itself: on its embedded database nobody else is there; on another one the
    # admin shell made sure an admin runs it.
    grant(settings, Actor("system:demo", frozenset({ADMIN})), DEMO_ACTOR, ADMIN)
    deps = Deps(settings)
    client = build_client(settings)
    now = datetime.now(UTC)

    accounts: list[tuple[str, str, str]] = []
    for tenant_id in TENANTS[:n_tenants]:
        add_tenant(settings, tenant_id, tenant_id.replace("demo-", "").title())
        id_user, token = client.init_user("demo-client", "demo-secret")
        link_powens_user(settings, tenant_id, id_user, token, now)
        result = sync_accounts(tenant_id, actor, deps)
        console.print(
            f"  tenant {tenant_id}: Powens user {id_user} linked, {result.synced} accounts discovered"
        )
        with session_scope(settings) as session:
            for acc, _conn, user in repo.list_accounts(session, tenant_id):
                if user.powens_user_id == id_user and acc.status == AccountStatus.ACTIVE:
                    accounts.append((tenant_id, acc.id, acc.name))

    # Faults, so the demo shows what operators will see: one transient 503 (retried, then fine) and one
    # connection that needs its user (no retry, previous balances kept).
    faults: dict[str, str] = {}
    token = sandbox.state.admin_token
    with session_scope(settings) as session:
        if len(accounts) >= 2:
            ctx = repo.find_account(session, accounts[1][0], accounts[1][1])
            assert ctx is not None
            admin_call(sandbox.admin_url, token, f"accounts/{ctx.account.external_id}", {"fail": [503]})
            faults[accounts[1][1]] = "one 503, then retried"
        if n_tenants >= 3:
            last = [a for a in accounts if a[0] == TENANTS[n_tenants - 1]][-1]
            ctx = repo.find_account(session, last[0], last[1])
            assert ctx is not None
            admin_call(
                sandbox.admin_url,
                token,
                f"connections/{ctx.connection.external_id}",
                {"state": "SCARequired"},
            )
            faults[last[1]] = "bank asks for SCA"

    start_embedded_worker(settings)
    rows = _refresh_all(settings, accounts)
    _print(console, rows, faults)
    stats = sandbox.state.stats()
    ok = sum(r.outcome == "refreshed" for r in rows)
    how = "tasks run in-process" if in_memory else "tasks through the configured broker"
    console.print(
        f"{ok} of {len(rows)} accounts refreshed, {len(rows) - ok} failed; "
        f"{stats['total']} Powens calls; {time.perf_counter() - started:.2f}s "
        f"({how}, on an embedded celery worker)"
    )
    from app.devtools.demo_push import show_push

    push_ok = show_push(settings, sandbox, console, TENANTS[0])
    nightly_ok = _nightly(settings, sandbox, console, list(TENANTS[:n_tenants]))
    write_env(settings, console)
    console.print(
        f"Canonical records: [bold]balances show --tenant demo-acme[/] (same database; as {DEMO_ACTOR}, "
        "from balances.env).",
        soft_wrap=True,
    )
    return 0 if ok > 0 and nightly_ok and push_ok else 1


def _refresh_all(settings: Settings, accounts: list[tuple[str, str, str]]) -> list[Row]:
    """Dispatch every refresh as the admin shell does, then wait for each outcome in the audit table."""
    from app.contract import OpenBankingRefreshBalancesInput
    from app.refresh.outcomes import Failed, wait_for
    from app.store.states import Trigger
    from app.worker.tasks import dispatch_refresh

    task_ids = [
        dispatch_refresh(
            OpenBankingRefreshBalancesInput(tenant_id=tenant_id, account_id=account_id),
            DEMO_ACTOR,
            Trigger.ON_DEMAND,
        )
        for tenant_id, account_id, _ in accounts
    ]
    rows: list[Row] = []
    deadline = time.monotonic() + 120
    for (tenant_id, account_id, name), task_id in zip(accounts, task_ids, strict=True):
        outcome = wait_for(settings, task_id, None, timeout=max(0.0, deadline - time.monotonic()), poll=0.05)
        if outcome is None:
            rows.append(Row(tenant_id, account_id, name, "no outcome (is the worker up?)"))
        elif isinstance(outcome, Failed):
            err = outcome.error
            rows.append(Row(tenant_id, account_id, name, f"failed: {err.reason.value}", note=err.message))
        else:
            out = outcome.output
            cur = next(b for b in out.balances if b.balance_type == "current")
            note = "; ".join(out.errors or [])
            rows.append(
                Row(
                    tenant_id,
                    account_id,
                    name,
                    "refreshed",
                    cur.current_balance,
                    cur.available_balance,
                    cur.currency,
                    note,
                )
            )
    return rows


def _print(console: Console, rows: list[Row], faults: dict[str, str]) -> None:
    table = Table("tenant", "account", "outcome", "current", "available", "ccy", "note", title="Balances")
    for r in rows:
        note = faults.get(r.account_id, "")
        if r.note:
            note = f"{note}: {r.note}" if note else r.note
        table.add_row(
            r.tenant,
            r.name,
            r.outcome if r.outcome == "refreshed" else f"[red]{r.outcome}[/]",
            "" if r.current is None else f"{r.current:,.2f}",
            "" if r.available is None else f"{r.available:,.2f}",
            r.currency,
            note,
        )
    console.print(table)


def _nightly(settings: Settings, sandbox: Sandbox, console: Console, tenants: list[str]) -> bool:
    """The nightly pipeline over the demo tenants: progress, then each tenant's summary and forecast."""
    from app.cli.render import print_forecast, print_summary, watch_run
    from app.nightly import pipeline
    from app.policy import SCHEDULER
    from app.reports.jobs import latest_forecasts
    from app.reports.summary import latest_summary
    from app.store.db import session_scope
    from app.store.states import RunStatus, Trigger
    from app.worker.tasks import enqueue_plan

    days = _backfill_history(settings)
    if days:
        console.print(
            f"(demo) {days} days of synthetic balance history backfilled, so forecasts have a trend"
        )
    console.print("[bold]nightly run[/]: every active account, then one summary and one forecast per tenant")
    sandbox.state.reset_stats()
    t0 = time.perf_counter()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor=SCHEDULER.name)
    enqueue_plan(run_id)
    status = watch_run(settings, run_id, timeout=300, console=console)
    if status is None:
        return False
    acc = status["accounts"]
    console.print(
        f"run {run_id} {status['status']}: {acc['succeeded']} ok, {acc['failed']} failed, "
        f"{acc['stale']} stale of {acc['total']} accounts; {sandbox.state.stats()['total']} Powens calls "
        f"for {len(tenants)} Powens users; {time.perf_counter() - t0:.2f}s"
    )
    for tenant_id in tenants:
        with session_scope(settings) as session:
            summary = latest_summary(session, tenant_id, run_id)
        if summary:
            print_summary(console, summary)
        for fc in latest_forecasts(settings, tenant_id, run_id):
            print_forecast(console, fc, every=7)
    return status["status"] == RunStatus.COMPLETED


def _backfill_history(settings: Settings, days: int = 45) -> int:
    """Demo only: a deterministic random walk of past daily snapshots ending at today's balance."""
    import random
    from datetime import timedelta

    from sqlalchemy import func, select

    from app.store.db import session_scope
    from app.store.models import AccountBalance, BalanceSnapshot

    today = settings.business_day()
    with session_scope(settings) as session:
        if session.scalar(
            select(func.count()).select_from(BalanceSnapshot).where(BalanceSnapshot.day < today)
        ):
            return 0
        latest = session.scalars(select(AccountBalance).where(AccountBalance.balance_type == "current")).all()
        for rec in latest:
            rng = random.Random(rec.account_id)
            drift = Decimal(rng.randint(-3000, 6000)) / 100
            value = rec.current_balance
            for back in range(1, days + 1):
                value = value - drift - Decimal(rng.randint(-20000, 20000)) / 100
                at = rec.refreshed_at - timedelta(days=back)
                session.add(
                    BalanceSnapshot(
                        account_id=rec.account_id,
                        tenant_id=rec.tenant_id,
                        balance_type="current",
                        day=today - timedelta(days=back),
                        current_balance=value,
                        available_balance=None,
                        currency=rec.currency,
                        last_updated_at=at,
                        refreshed_at=at,
                    )
                )
    return days
