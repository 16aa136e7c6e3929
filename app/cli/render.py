"""What the admin shell and the demo print: tables, summaries, forecasts, a run's progress.

Plain functions over a rich ``Console``; no command logic, no data access except the run-progress
poll. Shared by ``app.cli`` and ``app.devtools.demo`` so that neither imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.config import Settings
from app.contract import AccountBalanceRecord, BankAccountRecord
from app.reports.attention import age_text, is_old
from app.store.runs import run_status
from app.store.states import ItemStatus, RunStatus


def _age(settings: Settings | None, last: datetime | None, now: datetime) -> str:
    """How old the bank's data is (Powens' last_update), flagged when past BALANCES_STALE_AFTER_DAYS."""
    text = age_text(last, now)
    return f"[yellow]{text} (old)[/]" if settings is not None and is_old(settings, last, now) else text


def balances_table(
    console: Console,
    records: Iterable[AccountBalanceRecord],
    title: str | None = None,
    settings: Settings | None = None,
) -> None:
    now = datetime.now(UTC)
    table = Table(
        "account", "type", "current", "available", "currency", "bank data as of (UTC)", "age", title=title
    )
    for r in records:
        table.add_row(
            r.account_id,
            r.balance_type,
            f"{r.current_balance:,.2f}",
            "" if r.available_balance is None else f"{r.available_balance:,.2f}",
            r.currency,
            r.last_updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            _age(settings, r.last_updated_at, now),
        )
    console.print(table)


def accounts_table(
    console: Console, records: Iterable[BankAccountRecord], settings: Settings | None = None
) -> None:
    now = datetime.now(UTC)
    table = Table(
        "id",
        "Powens id",
        "name",
        "type",
        "currency",
        "status",
        "connection state",
        "bank data age",
        "consent ends",
        "last refreshed",
    )
    for r in records:
        meta = r.metadata or {}
        last = meta.get("lastRefreshedAt")
        consent = meta.get("consentExpiresAt")
        table.add_row(
            r.id,
            r.external_id,
            r.display_name,
            r.account_type,
            r.currency,
            str(meta.get("status")),
            str(meta.get("connectionState") or "ok"),
            _age(settings, meta.get("powensLastUpdate"), now),
            consent.date().isoformat() if consent else "-",
            last.isoformat(timespec="seconds") if last else "never",
        )
    console.print(table)


def watch_run(settings: Settings, run_id: str, *, timeout: float, console: Console) -> dict[str, Any] | None:
    """A progress bar (accounts done / failed / remaining) until the run is no longer open."""
    deadline = time.monotonic() + timeout
    status = run_status(settings, run_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        bar = progress.add_task(run_id, total=None, detail=RunStatus.PLANNING.value)
        while status is not None:
            acc = status["accounts"]
            ok, failed, stale = acc[ItemStatus.SUCCEEDED], acc[ItemStatus.FAILED], acc[ItemStatus.STALE]
            progress.update(
                bar,
                total=acc["total"] or None,
                completed=ok + failed + stale,
                detail=f"ok {ok}  failed {failed}  stale {stale}  "
                f"remaining {acc[ItemStatus.PENDING]}  [{status['status']}]",
            )
            if not RunStatus(status["status"]).open or time.monotonic() > deadline:
                break
            time.sleep(0.25)
            status = run_status(settings, run_id)
    return status


def print_status(out: Console, err: Console, status: dict[str, Any] | None) -> None:
    if status is None:
        err.print("no such run")
        return
    acc = status["accounts"]
    table = Table(
        "run", "status", "accounts", "ok", "failed", "stale", "pending", "duration", "failures by reason"
    )
    table.add_row(
        status["runId"],
        status["status"],
        str(acc["total"]),
        str(acc[ItemStatus.SUCCEEDED]),
        str(acc[ItemStatus.FAILED]),
        str(acc[ItemStatus.STALE]),
        str(acc[ItemStatus.PENDING]),
        f"{status['durationSeconds']:.1f}s",
        ", ".join(f"{k} {v}" for k, v in status["failuresByReason"].items()) or "-",
    )
    out.print(table)
    for s in status["staleAccounts"][:20]:
        out.print(f"  stale: {s['tenantId']} {s['accountId']}", highlight=False)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    acc = summary["accounts"]
    console.print(
        f"[bold]{summary['tenantId']}[/] — run {summary['runId']}, business day {summary['businessDay']}: "
        f"{acc['refreshed']} refreshed, {acc['failed']} failed, {acc['stale']} stale",
        highlight=False,
    )
    table = Table("currency", "accounts", "current", "available", "coming", "day over day")
    for t in summary["totals"]:
        dod = t.get("dayOverDay")
        table.add_row(
            t["currency"],
            str(t["accounts"]),
            f"{t['current']:,.2f}",
            f"{t['available']:,.2f}",
            f"{t['coming']:,.2f}",
            "n/a (no snapshot yesterday)" if not dod else f"{dod['change']:+,.2f}",
        )
    console.print(table)
    for f in summary["failedAccounts"]:
        console.print(f"  failed: {f['name']} ({f['accountId']}): {f['reason']}", highlight=False)
    for n in summary.get("noBalanceYet", []):
        console.print(f"  no balance yet: {n['name']} ({n['accountId']})", highlight=False)
    for c in summary["connectionsNeedingUser"]:
        why = "needs the user" if c.get("why", "user_action") == "user_action" else "stuck (transient state)"
        since = f" since {c['since'][:10]}" if c.get("since") else ""
        console.print(
            f"  {why}: connection {c['powensConnectionId']} ({c['state']}{since}): {c['reconnectCommand']}",
            highlight=False,
        )
    for c in summary.get("consentsExpiring", []):
        console.print(
            f"  consent ends {c['consentExpiresAt'][:10]} ({c['daysLeft']} days): connection "
            f"{c['powensConnectionId']}: {c['reconnectCommand']}",
            highlight=False,
        )
    for a in summary.get("oldBankData", []):
        console.print(f"  old bank data ({a['age']}): {a['name']} ({a['accountId']})", highlight=False)


def print_forecast(console: Console, fc: dict[str, Any], every: int = 5) -> None:
    console.print(
        f"[bold]{fc['tenantId']}[/] {fc['currency']}: {fc['method']} over {fc['historyDays']} days, "
        f"drift {fc['driftPerDay']:+,.2f}/day, coming {fc['coming']:,.2f}"
        + (f" — {fc['note']}" if fc.get("note") else ""),
        highlight=False,
    )
    points = fc["points"]
    table = Table("day", "projected", "lower", "upper", "")
    lo = min(p["lower"] for p in points)
    hi = max(p["upper"] for p in points)
    span = (hi - lo) or 1
    for i, p in enumerate(points):
        if i % every and i != len(points) - 1:
            continue
        width = int(30 * (p["value"] - lo) / span)
        table.add_row(
            p["day"], f"{p['value']:,.2f}", f"{p['lower']:,.2f}", f"{p['upper']:,.2f}", "▇" * max(width, 1)
        )
    console.print(table)
