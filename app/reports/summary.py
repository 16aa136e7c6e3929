"""Per-tenant summary of a run: totals per currency, day-over-day change, outcomes, and what needs a
person (connections to fix, old bank data, consents ending: ``app.reports.attention``)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.jsonio import rfc3339
from app.money import exact_sum, money_text
from app.reports.attention import tenant_views
from app.store.models import AccountBalance, BalanceSnapshot, BankAccount, RunItem
from app.store.states import AccountStatus, ItemStatus


def active_accounts(tenant_id: str) -> Select[str]:
    """The ids of the tenant's active accounts (a subquery): what totals and forecasts add up."""
    return select(BankAccount.id).where(
        BankAccount.tenant_id == tenant_id, BankAccount.status == AccountStatus.ACTIVE
    )


def build_summary(
    session: Session, settings: Settings, run_id: str, tenant_id: str, day: date
) -> dict[str, Any]:
    active = active_accounts(tenant_id)
    latest = session.execute(
        select(
            AccountBalance.account_id,
            AccountBalance.balance_type,
            AccountBalance.currency,
            AccountBalance.current_balance,
            AccountBalance.available_balance,
        ).where(AccountBalance.tenant_id == tenant_id, AccountBalance.account_id.in_(active))
    ).all()
    totals: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"current": Decimal(0), "available": Decimal(0), "coming": Decimal(0), "accounts": 0}
    )
    with_balance = {acc for acc, btype, *_ in latest if btype == "current"}
    no_balance = [
        {"accountId": acc, "name": name}
        for acc, name in session.execute(
            select(BankAccount.id, BankAccount.name)
            .where(BankAccount.id.in_(active))
            .order_by(BankAccount.id)
        )
        if acc not in with_balance
    ]
    for _acc, btype, ccy, cur, avail in latest:
        t = totals[ccy]
        if btype == "current":
            t["current"] = exact_sum(t["current"], cur)
            t["available"] = exact_sum(t["available"], avail if avail is not None else cur)
            t["accounts"] += 1
        elif btype == "uncleared":
            t["coming"] = exact_sum(t["coming"], cur)

    # Day-over-day: accounts with a current snapshot on both days, so new or lost accounts do not
    # show as money moving.
    snaps = session.execute(
        select(
            BalanceSnapshot.account_id,
            BalanceSnapshot.day,
            BalanceSnapshot.currency,
            BalanceSnapshot.current_balance,
        ).where(
            BalanceSnapshot.tenant_id == tenant_id,
            BalanceSnapshot.balance_type == "current",
            BalanceSnapshot.day.in_((day, day - timedelta(days=1))),
        )
    ).all()
    by_acc: dict[str, dict[date, tuple[str, Decimal]]] = defaultdict(dict)
    for acc, d, ccy, cur in snaps:
        by_acc[acc][d] = (ccy, cur)
    change: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"today": Decimal(0), "yesterday": Decimal(0), "accounts": 0}
    )
    for days in by_acc.values():
        if day in days and day - timedelta(days=1) in days:
            ccy = days[day][0]
            change[ccy]["today"] = exact_sum(change[ccy]["today"], days[day][1])
            change[ccy]["yesterday"] = exact_sum(change[ccy]["yesterday"], days[day - timedelta(days=1)][1])
            change[ccy]["accounts"] += 1

    items = session.execute(
        select(RunItem.account_id, RunItem.status, RunItem.reason, BankAccount.name)
        .join(BankAccount, BankAccount.id == RunItem.account_id)
        .where(RunItem.run_id == run_id, RunItem.tenant_id == tenant_id)
        .order_by(RunItem.account_id)
    ).all()
    counts = {"refreshed": 0, "failed": 0, "stale": 0}
    by_reason: dict[str, int] = defaultdict(int)
    failed, stale = [], []
    for acc, status, reason, name in items:
        if status == ItemStatus.SUCCEEDED:
            counts["refreshed"] += 1
        elif status == ItemStatus.FAILED:
            counts["failed"] += 1
            by_reason[reason or "internal"] += 1
            failed.append({"accountId": acc, "name": name, "reason": reason})
        elif status == ItemStatus.STALE:
            counts["stale"] += 1
            stale.append({"accountId": acc, "name": name})

    now = datetime.now(UTC)
    attention = tenant_views(session, settings, tenant_id, now)
    return {
        "runId": run_id,
        "tenantId": tenant_id,
        "businessDay": day.isoformat(),
        "generatedAt": rfc3339(now),
        "totals": [
            {
                "currency": ccy,
                **t,
                "dayOverDay": (
                    {
                        "change": exact_sum(change[ccy]["today"], -change[ccy]["yesterday"]),
                        "yesterday": change[ccy]["yesterday"],
                        "comparableAccounts": change[ccy]["accounts"],
                    }
                    if change.get(ccy, {}).get("accounts")
                    else None
                ),
            }
            for ccy, t in sorted(totals.items())
        ],
        "accounts": {**counts, "failuresByReason": dict(sorted(by_reason.items()))},
        "failedAccounts": failed,
        "staleAccounts": stale,
        # Accounts the bank has not reported a balance for yet: not in the totals, and not a failure.
        "noBalanceYet": no_balance,
        # Connections that need a person (a user-action state, or a transient one that lasts), bank
        # data older than BALANCES_STALE_AFTER_DAYS, consents ending soon (app.reports.attention).
        **attention,
    }


def latest_summary(session: Session, tenant_id: str, run_id: str | None = None) -> dict[str, Any] | None:
    """The tenant's stored summary of a run (default: its latest), as ``present_summary`` shows it."""
    from app.store.models import TenantSummary

    stmt = select(TenantSummary.payload).where(TenantSummary.tenant_id == tenant_id)
    if run_id is not None:
        stmt = stmt.where(TenantSummary.run_id == run_id)
    payload = session.scalar(stmt.order_by(TenantSummary.created_at.desc(), TenantSummary.id.desc()).limit(1))
    return present_summary(payload) if payload is not None else None


def present_summary(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored summary as every reader gets it (the shell's JSON and tables, the run report): each
    amount an exact string at its currency's scale (``"40846.80"``), whatever JSON number was stored,
    and each timestamp RFC 3339 with ``Z``."""

    def text(value: Any, currency: str) -> str:
        return money_text(Decimal(str(value)), currency)

    totals = []
    for t in payload.get("totals", []):
        ccy = t["currency"]
        dod = t.get("dayOverDay")
        totals.append(
            {
                **t,
                **{k: text(t[k], ccy) for k in ("current", "available", "coming")},
                "dayOverDay": {
                    **dod,
                    "change": text(dod["change"], ccy),
                    "yesterday": text(dod["yesterday"], ccy),
                }
                if dod
                else None,
            }
        )
    attention = {
        "connectionsNeedingUser": [
            {**c, "since": _stamp(c.get("since"))} for c in payload.get("connectionsNeedingUser", [])
        ],
        "consentsExpiring": [
            {**c, "consentExpiresAt": _stamp(c.get("consentExpiresAt"))}
            for c in payload.get("consentsExpiring", [])
        ],
        "oldBankData": [
            {**a, "powensLastUpdate": _stamp(a.get("powensLastUpdate"))}
            for a in payload.get("oldBankData", [])
        ],
    }
    return {**payload, "generatedAt": _stamp(payload.get("generatedAt")), "totals": totals, **attention}


def _stamp(value: str | None) -> str | None:
    """A stored timestamp as RFC 3339 with ``Z`` (summaries stored before it was the one format kept
    ``+00:00``)."""
    return rfc3339(datetime.fromisoformat(value)) if value else value
