"""The views operators of peer tools ask for: recent runs (``run list``, as Flower's task history),
what needs a person across tenants (``attention``), an account's daily history (``accounts history``)
and a tenant's connections with their sync state (``connections list``, as Sure's or Actual's
per-account sync status). Each is a listing: ``--format table|json|tsv``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from app.admin import operations as ops
from app.cli.output import Col, Format, FormatOpt, chosen, listing, stamp
from app.cli.shell import (
    BalanceTypeOpt,
    JsonOpt,
    TenantOpt,
    accounts_cli,
    authorized,
    cli,
    connections_cli,
    or_fail,
    out,
    run_cli,
)

Row = dict[str, Any]


@run_cli.command("list")
def run_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many runs, newest first.")] = 20,
    fmt: FormatOpt = None,
    json_: JsonOpt = False,
) -> None:
    """The latest runs: status, trigger, business day, duration and counts."""
    from app.store.runs import list_runs

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.RUN_LIST, as_json=form is Format.JSON)
    found = list_runs(settings, limit)
    cols: list[Col[Row]] = [
        Col("run", lambda r: r["runId"], ident=True),
        Col("status", lambda r: r["status"], style=lambda r: _status_style(r["status"])),
        Col("trigger", lambda r: r["trigger"], drop=3),
        Col("day", lambda r: str(r["businessDay"] or "-"), drop=4),
        Col("started", lambda r: stamp(r["createdAt"]), drop=2),
        Col("duration", lambda r: f"{r['durationSeconds']:.1f}s", justify="right", drop=1),
        Col("accounts", lambda r: str(r["accounts"]["total"]), justify="right"),
        Col("ok", lambda r: str(r["accounts"]["succeeded"]), justify="right"),
        Col("failed", lambda r: str(r["accounts"]["failed"]), justify="right"),
        Col("stale", lambda r: str(r["accounts"]["stale"]), justify="right", drop=5),
        Col("pending", lambda r: str(r["accounts"]["pending"]), justify="right", drop=6),
    ]
    listing(out, found, cols, form, found, empty="no run yet: balances run nightly")


def _status_style(status: str) -> str | None:
    return {"completed": "green", "stale": "red"}.get(status)


@cli.command("attention")
def attention(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many of each kind.")] = 100,
    runs: Annotated[
        int, typer.Option(min=2, max=30, help="Repeated failures: failed in each of the last N runs.")
    ] = 3,
    fmt: FormatOpt = None,
    json_: JsonOpt = False,
) -> None:
    """What needs a person across every tenant: old bank data, connections needing their user (with
    the command that makes their reconnect link), consents ending, accounts failing run after run."""
    from app.reports.attention import service_attention
    from app.store.db import session_scope

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.ATTENTION, as_json=form is Format.JSON)
    with session_scope(settings) as session:
        doc = service_attention(session, settings, datetime.now(UTC), limit=limit, runs=runs)
    rows = [
        *(
            _row("needs the user" if c["why"] == "user_action" else "stuck state", c, _since(c), c)
            for c in doc["connectionsNeedingUser"]["items"]
        ),
        *(
            _row("consent ends", c, f"{c['consentExpiresAt'][:10]} ({c['daysLeft']} days)", c)
            for c in doc["consentsExpiring"]["items"]
        ),
        *(
            _row("repeated failures", a, f"failed {a['failedRuns']} runs in a row: {a['reason']}", a)
            for a in doc["repeatedFailures"]["items"]
        ),
        *(_row("old bank data", a, f"bank data {a['age']} old", None) for a in doc["oldBankData"]["items"]),
    ]
    cols: list[Col[Row]] = [
        Col("what", lambda r: r["what"]),
        Col("tenant", lambda r: r["tenantId"], ident=True),
        Col("account or connection", lambda r: r["subject"], ident=True),
        Col("detail", lambda r: r["detail"], drop=1),
        Col("what to do", lambda r: r["command"] or "-", drop=2, line=True),
    ]
    listing(out, rows, cols, form, doc, empty="nothing needs attention")
    cut = [f"{doc[k]['total']:,} {words}" for k, words in KIND_WORDS.items() if doc[k]["total"] > limit]
    if form is Format.TABLE and cut:
        out.print(f"(at most {limit} of each kind shown; in all: {', '.join(cut)}; --limit shows more)")


KIND_WORDS = {
    "connectionsNeedingUser": "connections needing their user",
    "consentsExpiring": "consents ending",
    "repeatedFailures": "accounts failing run after run",
    "oldBankData": "accounts with old bank data",
}


def _row(what: str, item: Row, detail: str, command_of: Row | None) -> Row:
    command = None
    if command_of is not None:
        command = command_of.get("reconnectCommand") or command_of.get("command")
    return {
        "what": what,
        "tenantId": item["tenantId"],
        "subject": item.get("accountId") or item.get("connectionId"),
        "detail": detail,
        "command": command,
    }


def _since(c: Row) -> str:
    return f"{c['state']} since {c['since'][:10]}" if c.get("since") else str(c["state"])


@accounts_cli.command("history")
def accounts_history(
    tenant: TenantOpt,
    account: Annotated[str, typer.Option("--account", "-a", help="Canonical account id.")],
    days: Annotated[int, typer.Option(min=1, max=3660, help="Business days back from today.")] = 30,
    balance_type: BalanceTypeOpt = None,
    fmt: FormatOpt = None,
    json_: JsonOpt = False,
) -> None:
    """An account's daily balance snapshots (what forecasts are made of), newest first."""
    from app.refresh.records import balance_history

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.ACCOUNTS_HISTORY, as_json=form is Format.JSON)
    doc = or_fail(
        lambda: balance_history(settings, tenant, account, days, balance_type), as_json=form is Format.JSON
    )
    cols: list[Col[Row]] = [
        Col("day", lambda s: s["day"].isoformat()),
        Col("type", lambda s: s["balanceType"]),
        Col(
            "current",
            lambda s: _grouped(s["currentBalance"]),
            justify="right",
            raw=lambda s: s["currentBalance"],
        ),
        Col(
            "available",
            lambda s: _grouped(s["availableBalance"]),
            justify="right",
            drop=2,
            raw=lambda s: s["availableBalance"] or "",
        ),
        Col("currency", lambda s: s["currency"]),
        Col("bank data as of", lambda s: stamp(s["lastUpdatedAt"]), drop=1),
        Col("carried", lambda s: "carried" if s["carried"] else "", drop=3),
    ]
    listing(
        out,
        doc["snapshots"],
        cols,
        form,
        doc,
        title=f"{doc['name']} ({account}), {doc['from']} to {doc['to']}",
        empty=f"no snapshot of {account} in the last {days} days",
    )


def _grouped(amount: str | None) -> str:
    """An amount string (already at its currency's scale) grouped by thousands for a table."""
    if amount is None:
        return ""
    from decimal import Decimal

    return format(Decimal(amount), ",f")


@connections_cli.command("list")
def connections_list(tenant: TenantOpt, fmt: FormatOpt = None, json_: JsonOpt = False) -> None:
    """The tenant's bank connections: Powens state and since when, the bank's last update, consent end,
    accounts, and the reconnect command of those that need their user."""
    from app.admin.connections import connection_list

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.CONNECTIONS_LIST, as_json=form is Format.JSON)
    found = or_fail(lambda: connection_list(settings, tenant), as_json=form is Format.JSON)
    cols: list[Col[Row]] = [
        Col("id", lambda c: c["connectionId"], ident=True),
        Col("Powens id", lambda c: str(c["powensConnectionId"]), drop=5),
        Col("state", lambda c: c["state"] or ("ok" if c["active"] else "inactive")),
        Col("since", lambda c: stamp(c["stateSince"], "-"), drop=3),
        Col("bank last update", lambda c: stamp(c["bankLastUpdate"]), drop=2),
        Col(
            "consent ends",
            lambda c: c["consentExpiresAt"].date().isoformat() if c["consentExpiresAt"] else "-",
            drop=4,
        ),
        Col("accounts", lambda c: str(c["accounts"]), justify="right", drop=6),
        Col("what to do", lambda c: c["reconnectCommand"] or "-", drop=1, line=True),
    ]
    listing(
        out,
        found,
        cols,
        form,
        found,
        title=f"Connections of {tenant}",
        empty=f"tenant {tenant} has no connection yet",
    )
