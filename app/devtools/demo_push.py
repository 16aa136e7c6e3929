"""The demo's push: Powens syncs a connection by itself and pushes what it synced to the webhook
receiver, which queues it; the demo's embedded worker stores it through the refresh's write path, with
no Powens call. The receiver is the real one (Starlette on uvicorn, on a thread of this process)."""

from __future__ import annotations

import socket
import threading
import time
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.store.db import session_scope
from app.store.models import AccountBalance, BankAccount, PowensUser, RefreshAttempt
from app.store.states import Trigger


def start_receiver(settings: Settings) -> str:
    """``balances webhooks serve`` on a loopback port of this process; returns its /webhooks/powens URL."""
    import uvicorn

    from app.push.receiver import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="demo-webhooks", daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the webhook receiver did not start")
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}/webhooks/powens"


def show_push(settings: Settings, sandbox: Sandbox, console: Console, tenant_id: str) -> bool:
    assert settings.webhook_secret is not None
    url = start_receiver(settings)
    sandbox.state.configure_webhooks(url, settings.webhook_secret.get_secret_value().split(",")[0])
    with session_scope(settings) as session:
        powens_user_id = session.scalar(
            select(PowensUser.powens_user_id).where(PowensUser.tenant_id == tenant_id).limit(1)
        )
        before = {
            r.account_id: r.current_balance
            for r in session.scalars(
                select(AccountBalance).where(
                    AccountBalance.tenant_id == tenant_id, AccountBalance.balance_type == "current"
                )
            )
        }
    user = sandbox.state.users[int(powens_user_id or 0)]
    conn = next(c for c in user.connections.values() if c.state is None)
    sandbox.state.reset_stats()
    since = datetime.now(UTC)  # this push's own audit rows only: earlier demo runs left theirs
    t0 = time.perf_counter()
    status = sandbox.state.sync_connection(user, conn)  # Powens syncs by itself, then pushes
    answered = time.perf_counter() - t0
    expected = sum(1 for a in user.accounts.values() if a.id_connection == conn.id)
    rows: list[tuple[str, str, str]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with session_scope(settings) as session:
            stored = session.execute(
                select(RefreshAttempt.account_id, BankAccount.name, AccountBalance.current_balance)
                .join(BankAccount, BankAccount.id == RefreshAttempt.account_id)
                .join(AccountBalance, AccountBalance.account_id == RefreshAttempt.account_id)
                .where(
                    RefreshAttempt.tenant_id == tenant_id,
                    RefreshAttempt.trigger == Trigger.WEBHOOK,
                    RefreshAttempt.finished_at >= since,
                    AccountBalance.balance_type == "current",
                )
            ).all()
        if len(stored) >= expected:
            rows = [
                (name, f"{before.get(acc or '', 0):,.2f}", f"{balance:,.2f}") for acc, name, balance in stored
            ]
            break
        time.sleep(0.05)
    table = Table("account", "before the push", "after the push", title=f"Pushed by Powens ({tenant_id})")
    for row in rows:
        table.add_row(*row)
    console.print(
        f"[bold]push[/]: Powens synced connection {conn.id} and posted CONNECTION_SYNCED to {url}/… "
        f"(signed; answered {status} in {answered * 1000:.0f} ms, once on the broker)"
    )
    console.print(table)
    console.print(
        f"{len(rows)} of {expected} accounts stored from the push at {datetime.now(UTC):%H:%M:%S} UTC; "
        f"{sandbox.state.stats()['total']} Powens calls (the push carried the data). "
        "Tonight's run will not read them again."
    )
    return status == 202 and len(rows) == expected
