"""What the admin shell and the demo print: tables, summaries, forecasts, a run's progress.

Plain functions over a rich ``Console``; no command logic, no data access except the run-progress
poll. Shared by ``app.cli`` and ``app.devtools.demo`` so that neither imports the other.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.output import Col, Format, listing, stamp
from app.config import Settings
from app.contract import AccountBalanceRecord, BankAccountRecord
from app.money import money_display, money_text
from app.reports.attention import age_text, is_old
from app.store.runs import run_status
from app.store.states import ItemStatus, RunStatus


def _is_old(settings: Settings | None, last: datetime | None, now: datetime) -> str | None:
    """The style of an age past BALANCES_STALE_AFTER_DAYS."""
    return "yellow" if settings is not None and is_old(settings, last, now) else None


def _age(settings: Settings | None, last: datetime | None, now: datetime) -> str:
    """How old the bank's data is (Powens' last_update), ``(old)`` past BALANCES_STALE_AFTER_DAYS."""
    text = age_text(last, now)
    return f"{text} (old)" if settings is not None and is_old(settings, last, now) else text


def balance_cols(settings: Settings | None = None) -> list[Col[AccountBalanceRecord]]:
    now = datetime.now(UTC)
    return [
        Col("account", lambda r: r.account_id, ident=True),
        Col("type", lambda r: r.balance_type),
        Col(
            "current",
            lambda r: money_display(r.current_balance, r.currency),
            justify="right",
            raw=lambda r: money_text(r.current_balance, r.currency),
        ),
        Col(
            "available",
            lambda r: "" if r.available_balance is None else money_display(r.available_balance, r.currency),
            drop=3,
            justify="right",
            raw=lambda r: "" if r.available_balance is None else money_text(r.available_balance, r.currency),
        ),
        Col("currency", lambda r: r.currency),
        Col("bank data as of", lambda r: stamp(r.last_updated_at), drop=2),
        Col(
            "age",
            lambda r: _age(settings, r.last_updated_at, now),
            drop=1,
            style=lambda r: _is_old(settings, r.last_updated_at, now),
        ),
    ]


def account_cols(settings: Settings | None = None) -> list[Col[BankAccountRecord]]:
    now = datetime.now(UTC)

    def meta(r: BankAccountRecord, key: str) -> Any:
        return (r.metadata or {}).get(key)

    return [
        Col("id", lambda r: r.id, ident=True),
        Col("name", lambda r: r.display_name),
        Col("status", lambda r: str(meta(r, "status"))),
        Col("connection state", lambda r: str(meta(r, "connectionState") or "ok"), drop=1),
        Col(
            "bank data age",
            lambda r: _age(settings, meta(r, "powensLastUpdate"), now),
            drop=2,
            style=lambda r: _is_old(settings, meta(r, "powensLastUpdate"), now),
        ),
        Col("last refreshed", lambda r: stamp(meta(r, "lastRefreshedAt")), drop=3),
        Col("currency", lambda r: r.currency, drop=4),
        Col(
            "consent ends",
            lambda r: c.date().isoformat() if (c := meta(r, "consentExpiresAt")) else "-",
            drop=5,
        ),
        Col("type", lambda r: r.account_type, drop=6),
        Col("Powens id", lambda r: r.external_id, drop=7),
    ]


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
    cols: list[Col[dict[str, Any]]] = [
        Col("run", lambda s: s["runId"], ident=True),
        Col("status", lambda s: s["status"]),
        Col("accounts", lambda s: str(s["accounts"]["total"]), justify="right"),
        Col("ok", lambda s: str(s["accounts"][ItemStatus.SUCCEEDED]), justify="right"),
        Col("failed", lambda s: str(s["accounts"][ItemStatus.FAILED]), justify="right"),
        Col("stale", lambda s: str(s["accounts"][ItemStatus.STALE]), justify="right", drop=2),
        Col("pending", lambda s: str(s["accounts"][ItemStatus.PENDING]), justify="right", drop=3),
        Col("duration", lambda s: f"{s['durationSeconds']:.1f}s", justify="right", drop=1),
        Col(
            "failures by reason",
            lambda s: ", ".join(f"{k} {v}" for k, v in s["failuresByReason"].items()) or "-",
            drop=4,
        ),
    ]
    listing(out, [status], cols, Format.TABLE, status)
    if status.get("error"):
        out.print(f"  {status['error']}", highlight=False)
    for s in status["staleAccounts"][:20]:
        out.print(f"  stale: {s['tenantId']} {s['accountId']}", highlight=False)


def _money(value: Any, currency: str, *, sign: bool = False) -> str:
    return money_display(Decimal(str(value)), currency, sign=sign)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """A tenant's summary (``present_summary``'s document). Each command an operator may copy is a
    line of its own, never broken by us (the terminal may wrap it; it copies as one line)."""
    acc = summary["accounts"]
    console.print(
        f"[bold]{escape(summary['tenantId'])}[/] — run {summary['runId']}, business day "
        f"{summary['businessDay']}: {acc['refreshed']} refreshed, {acc['failed']} failed, "
        f"{acc['stale']} stale",
        highlight=False,
    )
    table = Table("currency", "accounts", "current", "available", "coming", "day over day")
    for t in summary["totals"]:
        ccy, dod = t["currency"], t.get("dayOverDay")
        table.add_row(
            ccy,
            str(t["accounts"]),
            _money(t["current"], ccy),
            _money(t["available"], ccy),
            _money(t["coming"], ccy),
            "n/a (no snapshot yesterday)" if not dod else _money(dod["change"], ccy, sign=True),
        )
    console.print(table)
    lines = [f"  failed: {f['name']} ({f['accountId']}): {f['reason']}" for f in summary["failedAccounts"]]
    lines += [f"  no balance yet: {n['name']} ({n['accountId']})" for n in summary.get("noBalanceYet", [])]
    for c in summary["connectionsNeedingUser"]:
        why = "needs the user" if c.get("why", "user_action") == "user_action" else "stuck (transient state)"
        since = f" since {c['since'][:10]}" if c.get("since") else ""
        lines += [
            f"  {why}: connection {c['powensConnectionId']} ({c['state']}{since}):",
            f"    {c['reconnectCommand']}",
        ]
    for c in summary.get("consentsExpiring", []):
        lines += [
            f"  consent ends {c['consentExpiresAt'][:10]} ({c['daysLeft']} days): connection "
            f"{c['powensConnectionId']}:",
            f"    {c['reconnectCommand']}",
        ]
    lines += [
        f"  old bank data ({a['age']}): {a['name']} ({a['accountId']})"
        for a in summary.get("oldBankData", [])
    ]
    for line in lines:
        console.print(escape(line), highlight=False, soft_wrap=True)


def print_forecast(console: Console, fc: dict[str, Any], every: int = 5) -> None:
    """A tenant's forecast in one currency (``present_forecast``'s document)."""
    ccy = fc["currency"]
    console.print(
        f"[bold]{escape(fc['tenantId'])}[/] {ccy}: {fc['method']} over {fc['historyDays']} days, "
        f"drift {_money(fc['driftPerDay'], ccy, sign=True)}/day, coming {_money(fc['coming'], ccy)}"
        + (f" — {escape(fc['note'])}" if fc.get("note") else ""),
        highlight=False,
    )
    points = fc["points"]
    table = Table("day", "projected", "lower", "upper", "")
    values = [(Decimal(str(p["value"])), Decimal(str(p["lower"])), Decimal(str(p["upper"]))) for p in points]
    lo = min(v[1] for v in values)
    span = (max(v[2] for v in values) - lo) or 1
    for i, (p, (value, lower, upper)) in enumerate(zip(points, values, strict=True)):
        if i % every and i != len(points) - 1:
            continue
        width = int(30 * (value - lo) / span)
        table.add_row(
            p["day"], _money(value, ccy), _money(lower, ccy), _money(upper, ccy), "▇" * max(width, 1)
        )
    console.print(table)
