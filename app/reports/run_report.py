"""The report of one finished nightly run, as the notification hook sends it (``app.reports.notify``).

Built from what the store already holds, never derived again: the run's counts are
``runs.run_status`` (what ``balances run status`` shows), each tenant's part is the summary stored for
the run (``app.reports.summary``, whose attention lists are ``app.reports.attention``'s). A tenant the
run ended without summarising (a run given up) says so instead of computing anything.

The document is what Slack and Teams incoming webhooks read — a top-level ``text`` in markdown, the
human report — plus a ``run`` object and a ``tenants`` list for machines. Money is a string at least at
its currency's scale (``"12345.60"`` for EUR; never a float, never rounded); times are RFC 3339 in UTC
with ``Z``. The text lists tenants that need attention first and stops after ``TEXT_TENANTS`` of them;
``tenants`` lists every tenant.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, select

from app.config import Settings
from app.jsonio import rfc3339
from app.money import money_display
from app.reports.summary import present_summary
from app.store import runs
from app.store.db import session_scope
from app.store.models import RefreshRun, RunTenant, TenantSummary

TEXT_TENANTS = 50  # tenants the text lists (tenants needing attention first); ``tenants`` has them all
TEXT_ITEMS = 5  # lines of each kind (connections, consents, old data) per tenant in the text
ATTENTION = ("connectionsNeedingUser", "consentsExpiring", "oldBankData")


def build(settings: Settings, run_id: str) -> dict[str, Any] | None:
    """The report of run ``run_id`` (None: no such run)."""
    status = runs.run_status(settings, run_id)
    if status is None:
        return None
    with session_scope(settings) as session:
        day = session.scalar(select(RefreshRun.business_day).where(RefreshRun.id == run_id))
        rows = session.execute(
            select(RunTenant.tenant_id, RunTenant.status, TenantSummary.payload)
            .outerjoin(
                TenantSummary,
                and_(
                    TenantSummary.run_id == RunTenant.run_id, TenantSummary.tenant_id == RunTenant.tenant_id
                ),
            )
            .where(RunTenant.run_id == run_id)
            .order_by(RunTenant.tenant_id)
        ).all()
    run = _run(status, day.isoformat() if day else None)
    tenants = [
        _tenant(tenant_id, str(state), present_summary(payload) if payload else None)
        for tenant_id, state, payload in rows
    ]
    return {"text": render_text(run, tenants), "run": run, "tenants": tenants}


def summary_line(tenant_id: str, summary: dict[str, Any]) -> str:
    """``demo-acme: 2 refreshed, 0 failed, 0 stale; EUR current 12,345.67``."""
    acc = summary["accounts"]
    line = f"{tenant_id}: {acc['refreshed']} refreshed, {acc['failed']} failed, {acc['stale']} stale"
    totals = summary.get("totals") or []
    if not totals:
        return line + "; no balance yet"
    return line + "".join(
        f"; {t['currency']} current {money_display(Decimal(t['current']), t['currency'])}" for t in totals
    )


def _run(status: dict[str, Any], day: str | None) -> dict[str, Any]:
    acc = status["accounts"]
    return {
        "id": status["runId"],
        "status": str(status["status"]),
        "trigger": str(status["trigger"]),
        "businessDay": day,
        "startedAt": rfc3339(status["createdAt"]),
        "finishedAt": rfc3339(status["finishedAt"]) if status["finishedAt"] else None,
        "durationSeconds": status["durationSeconds"],
        "tenants": status["tenants"]["total"],
        "accounts": {
            "total": acc["total"],
            "refreshed": acc["succeeded"],
            "failed": acc["failed"],
            "stale": acc["stale"],
            "pending": acc["pending"],
        },
        "failuresByReason": dict(sorted(status["failuresByReason"].items())),
        "error": status["error"],
    }


def _tenant(tenant_id: str, state: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    if summary is None:
        return {
            "tenantId": tenant_id,
            "status": state,
            "summarised": False,
            "line": f"{tenant_id}: no summary (the run ended while the tenant was {state})",
            "accounts": None,
            "totals": [],
            **{k: [] for k in ("failedAccounts", "staleAccounts", "noBalanceYet", *ATTENTION)},
        }
    acc = summary["accounts"]
    return {
        "tenantId": tenant_id,
        "status": state,
        "summarised": True,
        "line": summary_line(tenant_id, summary),
        "generatedAt": summary.get("generatedAt"),
        "accounts": {
            "refreshed": acc["refreshed"],
            "failed": acc["failed"],
            "stale": acc["stale"],
            "failuresByReason": acc.get("failuresByReason", {}),
        },
        "totals": summary.get("totals", []),
        "failedAccounts": summary.get("failedAccounts", []),
        "staleAccounts": summary.get("staleAccounts", []),
        "noBalanceYet": summary.get("noBalanceYet", []),
        **{kind: summary.get(kind, []) for kind in ATTENTION},
    }


# -- the text ------------------------------------------------------------------------------------------


def needs_attention(tenant: dict[str, Any]) -> bool:
    acc = tenant["accounts"]
    return (
        not tenant["summarised"]
        or bool(acc["failed"] or acc["stale"])
        or any(tenant[kind] for kind in ATTENTION)
    )


def render_text(run: dict[str, Any], tenants: list[dict[str, Any]]) -> str:
    """The human report, in the markdown Slack and Teams both read: lines, ``-`` lists, code spans."""
    head = f"Nightly run `{run['id']}` {run['status']}"
    if run["businessDay"]:
        head += f": business day {run['businessDay']}"
    lines = [f"{head}, {_duration(run['durationSeconds'])}"]
    acc = run["accounts"]
    counts = f"{acc['refreshed']} refreshed, {acc['failed']} failed, {acc['stale']} stale"
    counts += f" ({acc['total']} accounts, {run['tenants']} tenants)"
    if run["failuresByReason"]:
        counts += "; failures: " + ", ".join(f"{r} {n}" for r, n in run["failuresByReason"].items())
    lines.append(counts)
    if run["error"]:
        lines.append(f"Given up: {run['error']}")
    ordered = sorted(tenants, key=lambda t: (not needs_attention(t), t["tenantId"]))
    for tenant in ordered[:TEXT_TENANTS]:
        lines.append(f"- {tenant['line']}")
        lines.extend(f"  - {item}" for item in _attention_lines(tenant))
    if len(ordered) > TEXT_TENANTS:
        lines.append(f"- … and {len(ordered) - TEXT_TENANTS} more tenants (every tenant is in `tenants`)")
    return "\n".join(_escape(line) for line in lines)


def _attention_lines(tenant: dict[str, Any]) -> Iterable[str]:
    acc = tenant["accounts"]
    if acc and acc["failuresByReason"]:
        yield "failed: " + ", ".join(f"{r} {n}" for r, n in sorted(acc["failuresByReason"].items()))
    needing = [
        f"{'needs the user' if c.get('why') == 'user_action' else 'stuck'}: connection "
        f"{c['powensConnectionId']} ({c['state']}"
        + (f" since {c['since'][:10]}" if c.get("since") else "")
        + f"): `{c['reconnectCommand']}`"
        for c in tenant["connectionsNeedingUser"]
    ]
    consents = [
        f"consent ends {c['consentExpiresAt'][:10]} ({c['daysLeft']} days): connection "
        f"{c['powensConnectionId']}: `{c['reconnectCommand']}`"
        for c in tenant["consentsExpiring"]
    ]
    old = [f"old bank data ({a['age']}): {a['name']} ({a['accountId']})" for a in tenant["oldBankData"]]
    for kind, items in (("connections", needing), ("consents", consents), ("accounts", old)):
        yield from items[:TEXT_ITEMS]
        if len(items) > TEXT_ITEMS:
            yield f"… {len(items) - TEXT_ITEMS} more {kind}"


def _escape(text: str) -> str:
    """What Slack reads as markup it acts on (``<!channel>``, ``<url|links>``) written as text: a
    tenant id, an account name or a connection state from the bank must not ping a channel. Our own
    markup (``-``, backticks) has none of these characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
