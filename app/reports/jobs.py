"""Computing and storing a tenant's summary, then its forecasts, exactly once per run.

Each store happens in the same transaction as the tenant's state transition (summarising →
forecasting → done); a second delivery of the same task finds the transition taken and writes nothing.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.money import exact_sum
from app.reports.forecast import Forecast, daily_totals, present_forecast, project
from app.reports.summary import active_accounts, build_summary
from app.store.db import session_scope
from app.store.models import AccountBalance, BalanceSnapshot, CashflowForecast, RefreshRun, TenantSummary
from app.store.runs import move_tenant
from app.store.states import TenantStatus
from app.store.writes import keyed_only

log = logging.getLogger(__name__)


def run_day(session: Session, settings: Settings, run_id: str) -> date:
    """The run's business day, fixed when it started (older runs: today's)."""
    return (
        session.scalar(select(RefreshRun.business_day).where(RefreshRun.id == run_id))
        or settings.business_day()
    )


def summarize_tenant(settings: Settings, run_id: str, tenant_id: str) -> bool:
    """Store the summary and move the tenant to forecasting. False when already done."""
    with session_scope(settings) as session:
        keyed_only(session)
        moved = move_tenant(
            session,
            run_id,
            tenant_id,
            TenantStatus.SUMMARISING,
            TenantStatus.FORECASTING,
            summary_enqueued_at=datetime.now(UTC),  # the forecast task is sent now
        )
        if not moved:
            return False
        day = run_day(session, settings, run_id)
        payload = build_summary(session, settings, run_id, tenant_id, day)
        session.add(
            TenantSummary(run_id=run_id, tenant_id=tenant_id, created_at=datetime.now(UTC), payload=payload)
        )
    log.info("summary stored", extra={"run_id": run_id, "tenant_id": tenant_id})
    return True


def build_forecasts(session: Session, settings: Settings, tenant_id: str, day: date) -> list[Forecast]:
    start = day - timedelta(days=settings.forecast_history_days - 1)
    active = active_accounts(tenant_id)
    rows = session.execute(
        select(
            BalanceSnapshot.account_id,
            BalanceSnapshot.currency,
            BalanceSnapshot.day,
            BalanceSnapshot.current_balance,
        ).where(
            BalanceSnapshot.tenant_id == tenant_id,
            BalanceSnapshot.balance_type == "current",
            BalanceSnapshot.account_id.in_(active),
            BalanceSnapshot.day <= day,
            # one earlier row per account would do; a week back bounds the carry-forward read
            BalanceSnapshot.day >= start - timedelta(days=7),
        )
    ).all()
    per_ccy: dict[str, dict[str, dict[date, Decimal]]] = defaultdict(lambda: defaultdict(dict))
    for acc, ccy, d, cur in rows:
        per_ccy[ccy][acc][d] = cur
    coming: dict[str, Decimal] = defaultdict(Decimal)
    for ccy, amount in session.execute(
        select(AccountBalance.currency, AccountBalance.current_balance).where(
            AccountBalance.tenant_id == tenant_id,
            AccountBalance.balance_type == "uncleared",
            AccountBalance.account_id.in_(active),
        )
    ).all():
        coming[ccy] = exact_sum(coming[ccy], amount)
    out = []
    for ccy, per_account in sorted(per_ccy.items()):
        history = daily_totals(per_account, start, day)
        if history:
            out.append(
                project(
                    ccy,
                    history,
                    coming=coming.get(ccy, Decimal(0)),
                    horizon=settings.forecast_horizon_days,
                    min_points=settings.forecast_min_points,
                )
            )
    return out


def forecast_tenant(settings: Settings, run_id: str, tenant_id: str) -> bool:
    """Store one forecast per currency and close the tenant. False when already done."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        keyed_only(session)
        if not move_tenant(session, run_id, tenant_id, TenantStatus.FORECASTING, TenantStatus.DONE):
            return False
        day = run_day(session, settings, run_id)
        for fc in build_forecasts(session, settings, tenant_id, day):
            session.add(
                CashflowForecast(
                    run_id=run_id,
                    tenant_id=tenant_id,
                    currency=fc.currency,
                    method=fc.method,
                    created_at=now,
                    payload=fc.as_json(),
                )
            )
    log.info("forecast stored", extra={"run_id": run_id, "tenant_id": tenant_id})
    return True


def latest_forecasts(
    settings: Settings, tenant_id: str, run_id: str | None = None
) -> list[dict[str, object]]:
    with session_scope(settings) as session:
        if run_id is None:
            run_id = session.scalar(
                select(CashflowForecast.run_id)
                .where(CashflowForecast.tenant_id == tenant_id)
                .order_by(CashflowForecast.created_at.desc(), CashflowForecast.id.desc())
                .limit(1)
            )
            if run_id is None:
                return []
        rows = session.scalars(
            select(CashflowForecast)
            .where(CashflowForecast.tenant_id == tenant_id, CashflowForecast.run_id == run_id)
            .order_by(CashflowForecast.currency)
        ).all()
        return [
            present_forecast(
                {"runId": r.run_id, "tenantId": r.tenant_id, "createdAt": r.created_at, **r.payload}
            )
            for r in rows
        ]
