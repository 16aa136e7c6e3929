"""``balances demo``: the whole refresh path on one machine with no services.

A Powens sandbox runs on loopback; tenants are seeded through the real Powens calls (``/auth/init``,
connections, accounts); every account is refreshed through the same task and handler code a worker
runs. With no ``CELERY_BROKER_URL`` in the environment, tasks run in this process (Celery ``apply``);
with one, a real ``celery -A app worker`` is started and tasks go through the broker. ``DATABASE_URL``
is used when set, else the embedded SQLite file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from rich.console import Console
from rich.table import Table

from app.config import Settings, load_settings, use_settings
from app.errors import RefreshError
from app.policy import ADMIN
from app.powens.sandbox import Sandbox, SandboxState

DEMO_ACTOR = "demo-admin"
TENANTS = ("demo-acme", "demo-globex", "demo-initech", "demo-umbrella", "demo-hooli")


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
    }
    if "celery_broker_url" not in base.model_fields_set:
        # No services: coordination (locks, shared reads, rate limit) stays inside this process.
        overrides["coordination"] = "local"
        overrides["powens_rate_limit"] = 0
    if base.encryption_key is None:
        from pydantic import SecretStr

        from app.store.secrets import generate_key

        # Demo tokens are re-linked on every run, so a key of this run is enough.
        overrides["encryption_key"] = SecretStr(generate_key())
    return base.model_copy(update=overrides)


def run_demo(tenants: int = 3, console: Console | None = None) -> int:
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=140)  # a log or a pipe: do not wrap rows at 80 columns
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("openbanking.telemetry").setLevel(logging.WARNING)
    started = time.perf_counter()
    with Sandbox(SandboxState(seed=7)) as sandbox:
        settings = _demo_settings(sandbox)
        use_settings(settings)
        try:
            return _run(settings, sandbox, min(max(tenants, 1), len(TENANTS)), console, started)
        finally:
            use_settings(None)


def _run(settings: Settings, sandbox: Sandbox, n_tenants: int, console: Console, started: float) -> int:
    from app.accounts import link_powens_user, sync_accounts
    from app.policy import Actor
    from app.powens.client import get_client
    from app.powens.sandbox import admin_call
    from app.refresh import Deps, outcome_for_task
    from app.store import repo
    from app.store.db import session_scope
    from app.store.migrate import upgrade

    broker_mode = "celery_broker_url" in load_settings().model_fields_set
    where = settings.database_url.split("@")[-1] if not settings.is_sqlite else settings.database_url
    console.print(f"[bold]balances demo[/] — Powens sandbox at {sandbox.base_url}, database {where}")
    upgrade(settings)
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        repo.grant_role(session, DEMO_ACTOR, ADMIN, now)
    actor = Actor(DEMO_ACTOR, frozenset({ADMIN}))
    deps = Deps.default(settings)
    client = get_client(settings)

    accounts: list[tuple[str, str, str]] = []
    for tenant_id in TENANTS[:n_tenants]:
        with session_scope(settings) as session:
            repo.add_tenant(session, tenant_id, tenant_id.replace("demo-", "").title(), now)
        id_user, token = client.init_user("demo-client", "demo-secret")
        link_powens_user(settings, tenant_id, id_user, token, now)
        result = sync_accounts(tenant_id, actor, deps)
        console.print(
            f"  tenant {tenant_id}: Powens user {id_user} linked, {result.synced} accounts discovered"
        )
        with session_scope(settings) as session:
            for acc, _conn, user in repo.list_accounts(session, tenant_id):
                if user.powens_user_id == id_user and acc.status == "active":
                    accounts.append((tenant_id, acc.id, acc.name))

    # Faults, so the demo shows what operators will see: one transient 503 (retried, then fine) and one
    # connection that needs its user (no retry, previous balances kept).
    faults: dict[str, str] = {}
    with session_scope(settings) as session:
        if len(accounts) >= 2:
            ctx = repo.find_account(session, accounts[1][0], accounts[1][1])
            assert ctx is not None
            admin_call(sandbox.admin_url, f"accounts/{ctx.account.external_id}", {"fail": [503]})
            faults[accounts[1][1]] = "one 503, then retried"
        if n_tenants >= 3:
            last = [a for a in accounts if a[0] == TENANTS[n_tenants - 1]][-1]
            ctx = repo.find_account(session, last[0], last[1])
            assert ctx is not None
            admin_call(
                sandbox.admin_url, f"connections/{ctx.connection.external_id}", {"state": "SCARequired"}
            )
            faults[last[1]] = "bank asks for SCA"

    worker = _start_worker(settings) if broker_mode else None
    try:
        task_ids = _refresh_all(accounts, broker_mode)
        rows: list[Row] = []
        deadline = time.monotonic() + 120
        for (tenant_id, account_id, name), task_id in zip(accounts, task_ids, strict=True):
            raw = {"tenantId": tenant_id, "accountId": account_id}
            while True:
                try:
                    output = outcome_for_task(settings, task_id, raw)
                except RefreshError as exc:
                    rows.append(
                        Row(tenant_id, account_id, name, f"failed: {exc.reason.value}", note=exc.message)
                    )
                    break
                if output is not None:
                    cur = next(b for b in output.balances if b.balanceType == "current")
                    rows.append(
                        Row(
                            tenant_id,
                            account_id,
                            name,
                            "refreshed",
                            cur.currentBalance,
                            cur.availableBalance,
                            cur.currency,
                            "; ".join(output.errors or []),
                        )
                    )
                    break
                if time.monotonic() > deadline:
                    rows.append(Row(tenant_id, account_id, name, "no outcome (is the worker up?)"))
                    break
                time.sleep(0.1)

        _print(console, rows, faults)
        stats = sandbox.state.stats()
        ok = sum(r.outcome == "refreshed" for r in rows)
        console.print(
            f"{ok} of {len(rows)} accounts refreshed, {len(rows) - ok} failed; "
            f"{stats['total']} Powens calls; {time.perf_counter() - started:.2f}s "
            f"({'celery worker via broker' if broker_mode else 'tasks run in-process'})"
        )
        nightly_ok = _nightly(settings, sandbox, console, [t for t in TENANTS[:n_tenants]], broker_mode)
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=30)
    console.print("Canonical records: [bold]balances show --tenant demo-acme[/] (same database).")
    return 0 if ok > 0 and nightly_ok else 1


def _refresh_all(accounts: list[tuple[str, str, str]], broker_mode: bool) -> list[str]:
    from app.refresh import Trigger
    from app.tasks import dispatch_refresh, refresh_account

    ids = []
    for tenant_id, account_id, _ in accounts:
        raw = {"tenantId": tenant_id, "accountId": account_id}
        task_id = str(uuid.uuid4())
        if broker_mode:
            dispatch_refresh(raw, DEMO_ACTOR, Trigger.ON_DEMAND, task_id=task_id)
        else:
            refresh_account.apply(args=(raw, DEMO_ACTOR, Trigger.ON_DEMAND.value), task_id=task_id)
        ids.append(task_id)
    return ids


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": settings.database_url,
            "POWENS_BASE_URL": settings.powens_base_url,
            "BALANCES_ENCRYPTION_KEY": settings.encryption_key.get_secret_value()
            if settings.encryption_key
            else "",
            "BALANCES_RETRY_BASE_SECONDS": str(settings.retry_base_seconds),
            "BALANCES_RETRY_CAP_SECONDS": str(settings.retry_cap_seconds),
            "BALANCES_METRICS_PORT": "0",
        }
    )
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "app",
            "worker",
            "-Q",
            "interactive,refresh,reports",
            "-c",
            "2",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"demo-{uuid.uuid4().hex[:6]}@%h",
            "--loglevel",
            "WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


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
            note[:90],
        )
    console.print(table)


def _nightly(
    settings: Settings, sandbox: Sandbox, console: Console, tenants: list[str], broker_mode: bool
) -> bool:
    """The nightly pipeline over the demo tenants: progress, then each tenant's summary and forecast."""
    import threading

    from app import pipeline
    from app.celery import app
    from app.cli import print_forecast, print_summary, watch_run
    from app.policy import SCHEDULER
    from app.reports.jobs import latest_forecasts
    from app.reports.summary import latest_summary
    from app.store.db import session_scope
    from app.tasks import enqueue_plan, plan_nightly_run

    days = _backfill_history(settings)
    if days:
        console.print(
            f"(demo) {days} days of synthetic balance history backfilled, so forecasts have a trend"
        )
    console.print("[bold]nightly run[/]: every active account, then one summary and one forecast per tenant")
    sandbox.state.reset_stats()
    t0 = time.perf_counter()
    run_id, _ = pipeline.start_run(settings, trigger="manual", actor=SCHEDULER.name)
    worker_thread = None
    if broker_mode:
        enqueue_plan(run_id)
    else:
        app.conf.task_always_eager = True
        worker_thread = threading.Thread(target=lambda: plan_nightly_run.apply(args=(run_id,)), daemon=True)
        worker_thread.start()
    status = watch_run(settings, run_id, timeout=300, console=console)
    if worker_thread is not None:
        worker_thread.join(timeout=60)
        app.conf.task_always_eager = False
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
    return status["status"] == "completed"


def _backfill_history(settings: Settings, days: int = 45) -> int:
    """Demo only: a deterministic random walk of past daily snapshots ending at today's balance."""
    import random
    from datetime import timedelta

    from sqlalchemy import func, select

    from app.reports.summary import business_day
    from app.store.db import session_scope
    from app.store.models import AccountBalance, BalanceSnapshot

    today = business_day(settings)
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
