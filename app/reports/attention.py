"""What needs an operator's attention before a user notices: old bank data, consents about to end,
transient connection states that do not pass. Read by the summaries, the admin shell and the beat's
gauges, so the three always agree.

- An account's age is Powens' own ``last_update`` (when the bank last answered Powens), not our
  refresh time: a refresh of a connection the bank no longer updates is recent and still old data.
- A connection's PSD2 consent ends at ``expire`` / ``sources[].access_expire``; one ending within
  ``BALANCES_CONSENT_WARNING_DAYS`` is listed with the command that makes a reconnect link.
- A transient state (``validating``, ``rateLimiting``, ``websiteUnavailable``, ``bug``) is Powens' to
  retry; one lasting longer than ``BALANCES_TRANSIENT_STATE_DAYS`` is escalated like a state that
  needs the user.
- Only what is still refreshed counts: active accounts (an unlinked user's are ``unlinked``), the
  connections of linked Powens users.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Reason
from app.jsonio import rfc3339
from app.powens.errors import classify_state, is_transient_state
from app.powens.links import reconnect_command
from app.store.models import BankAccount, BankConnection, RefreshRun, RunItem
from app.store.repo import linked_user_pks
from app.store.states import AccountStatus, ItemStatus, RunStatus

# The ``bucket`` label of openbanking_accounts_by_data_age (no ids in labels).
AGE_BUCKETS = ("under_1d", "1d_to_3d", "3d_to_7d", "over_7d", "never")


def age_bucket(last_update: datetime | None, now: datetime) -> str:
    if last_update is None:
        return "never"
    days = (now - last_update).total_seconds() / 86_400
    return "under_1d" if days < 1 else "1d_to_3d" if days < 3 else "3d_to_7d" if days < 7 else "over_7d"


def age_text(last_update: datetime | None, now: datetime) -> str:
    """``42 min``, ``5.0 h``, ``3.2 d``; ``never`` when the bank has not answered yet."""
    if last_update is None:
        return "never"
    seconds = max(0.0, (now - last_update).total_seconds())
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def is_old(settings: Settings, last_update: datetime | None, now: datetime) -> bool:
    return last_update is None or now - last_update > timedelta(days=settings.stale_after_days)


def needs_attention(
    settings: Settings, state: str | None, since: datetime | None, now: datetime
) -> str | None:
    """Why a connection needs a person: ``user_action``, ``lasting_transient``, or None."""
    if classify_state(state) is Reason.NEEDS_USER_ACTION:
        return "user_action"
    lasting = since is not None and now - since > timedelta(days=settings.transient_state_days)
    return "lasting_transient" if is_transient_state(state) and lasting else None


def tenant_views(session: Session, settings: Settings, tenant_id: str, now: datetime) -> dict[str, Any]:
    """The summary's attention lists for one tenant."""
    needing, expiring = connection_views(session, settings, now, tenant_id)
    return {
        "oldBankData": old_bank_data(session, settings, now, tenant_id),
        "connectionsNeedingUser": needing,
        "consentsExpiring": expiring,
    }


def _old_clause(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """``is_old`` as the database asks it of an active account: only those rows are read."""
    last = BankAccount.powens_last_update
    return and_(
        BankAccount.status == AccountStatus.ACTIVE,
        or_(last.is_(None), last < now - timedelta(days=settings.stale_after_days)),
    )


def old_bank_data(
    session: Session,
    settings: Settings,
    now: datetime,
    tenant_id: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Active accounts whose bank data is older than BALANCES_STALE_AFTER_DAYS (``is_old``, asked of
    the database so that only those rows are read), oldest first; one tenant's, or every tenant's."""
    last = BankAccount.powens_last_update
    stmt = (
        select(BankAccount.tenant_id, BankAccount.id, BankAccount.name, last)
        .where(_old_clause(settings, now))
        .order_by(last.asc().nulls_first(), BankAccount.tenant_id, BankAccount.id)
        .limit(limit)
    )
    if tenant_id is not None:
        stmt = stmt.where(BankAccount.tenant_id == tenant_id)
    return [
        {
            "tenantId": tenant,
            "accountId": acc_id,
            "name": name,
            "powensLastUpdate": rfc3339(updated) if updated else None,
            "age": age_text(updated, now),
        }
        for tenant, acc_id, name, updated in session.execute(stmt)
        if is_old(settings, updated, now)
    ]


def connection_views(
    session: Session, settings: Settings, now: datetime, tenant_id: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(connections that need a person, consents ending within BALANCES_CONSENT_WARNING_DAYS) of one
    tenant or of every tenant. Only connections in a state or near their consent's end are read."""
    horizon = now + timedelta(days=settings.consent_warning_days)
    stmt = (
        select(BankConnection)
        .where(BankConnection.active.is_(True))
        .where(BankConnection.powens_user_pk.in_(linked_user_pks()))  # an unlinked user's: nobody's to fix
        .where(or_(BankConnection.state.is_not(None), BankConnection.consent_expires_at <= horizon))
        .order_by(BankConnection.tenant_id, BankConnection.id)
    )
    if tenant_id is not None:
        stmt = stmt.where(BankConnection.tenant_id == tenant_id)
    needing, expiring = [], []
    for c in session.scalars(stmt):
        why = needs_attention(settings, c.state, c.state_since, now)
        if why is not None:
            needing.append(
                {
                    "tenantId": c.tenant_id,
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "state": c.state,
                    "since": rfc3339(c.state_since) if c.state_since else None,
                    "why": why,
                    # A link needs a fresh temporary code: made when a person asks, never stored here.
                    "reconnectCommand": reconnect_command(c.tenant_id, c.id),
                }
            )
        if c.consent_expires_at is not None and c.consent_expires_at <= horizon:
            expiring.append(
                {
                    "tenantId": c.tenant_id,
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "consentExpiresAt": rfc3339(c.consent_expires_at),
                    "daysLeft": round((c.consent_expires_at - now).total_seconds() / 86_400, 1),
                    "reconnectCommand": reconnect_command(c.tenant_id, c.id),
                }
            )
    return needing, expiring


def repeated_failures(
    session: Session, runs: int = 3, tenant_id: str | None = None, limit: int | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Accounts that failed in each of the last ``runs`` finished nightly runs (not a bad night: an
    account that needs someone), with their latest reason. Returns (those runs' ids, the accounts)."""
    last_runs = list(
        session.scalars(
            select(RefreshRun.id)
            .where(RefreshRun.status.in_((RunStatus.COMPLETED, RunStatus.STALE)))
            .order_by(RefreshRun.created_at.desc(), RefreshRun.id.desc())
            .limit(runs)
        )
    )
    if len(last_runs) < runs:
        return last_runs, []
    stmt = (
        select(RunItem.tenant_id, RunItem.account_id)
        .where(RunItem.run_id.in_(last_runs), RunItem.status == ItemStatus.FAILED)
        .group_by(RunItem.tenant_id, RunItem.account_id)
        .having(func.count() == runs)
        .order_by(RunItem.tenant_id, RunItem.account_id)
        .limit(limit)
    )
    if tenant_id is not None:
        stmt = stmt.where(RunItem.tenant_id == tenant_id)
    failing = session.execute(stmt).all()
    reasons = dict(
        session.execute(
            select(RunItem.account_id, RunItem.reason).where(
                RunItem.run_id == last_runs[0], RunItem.account_id.in_([a for _t, a in failing])
            )
        ).all()
    )
    names = dict(
        session.execute(
            select(BankAccount.id, BankAccount.name).where(BankAccount.id.in_([a for _t, a in failing]))
        ).all()
    )
    return last_runs, [
        {
            "tenantId": tenant,
            "accountId": acc,
            "name": names.get(acc),
            "failedRuns": runs,
            "reason": reasons.get(acc),
            "refreshCommand": f"balances refresh --tenant {tenant} --account {acc}",
        }
        for tenant, acc in failing
    ]


def service_attention(
    session: Session, settings: Settings, now: datetime, *, limit: int = 100, runs: int = 3
) -> dict[str, Any]:
    """What needs a person across every tenant (``balances attention``): each list at most ``limit``
    long, with its full count, so the answer stays small however big the service is."""
    old = old_bank_data(session, settings, now, limit=limit)
    needing, expiring = connection_views(session, settings, now)
    failed_runs, failing = repeated_failures(session, runs, limit=limit)
    old_total = session.scalar(
        select(func.count()).select_from(BankAccount).where(_old_clause(settings, now))
    )
    return {
        "generatedAt": rfc3339(now),
        "oldBankData": {"total": int(old_total or 0), "items": old},
        "connectionsNeedingUser": {"total": len(needing), "items": needing[:limit]},
        "consentsExpiring": {"total": len(expiring), "items": expiring[:limit]},
        "repeatedFailures": {"runs": failed_runs, "total": len(failing), "items": failing},
    }


def service_counts(session: Session, settings: Settings, now: datetime) -> dict[str, Any]:
    """Across every tenant, for the beat's gauges (read at scrape time)."""
    ages: Counter[str] = Counter({b: 0 for b in AGE_BUCKETS})
    last = BankAccount.powens_last_update
    bucket = case(  # age_bucket, counted by the database: a scrape does not load every account
        (last.is_(None), "never"),
        (last > now - timedelta(days=1), "under_1d"),
        (last > now - timedelta(days=3), "1d_to_3d"),
        (last > now - timedelta(days=7), "3d_to_7d"),
        else_="over_7d",
    )
    for name, n in session.execute(
        select(bucket, func.count()).where(BankAccount.status == AccountStatus.ACTIVE).group_by(bucket)
    ):
        ages[str(name)] += int(n)
    needing = expiring = active = 0
    horizon = now + timedelta(days=settings.consent_warning_days)
    for state, since, expires, is_active in session.execute(
        select(
            BankConnection.state,
            BankConnection.state_since,
            BankConnection.consent_expires_at,
            BankConnection.active,
        ).where(BankConnection.powens_user_pk.in_(linked_user_pks()))
    ):
        active += bool(is_active)
        needing += bool(is_active) and needs_attention(settings, state, since, now) is not None
        expiring += bool(is_active and expires is not None and expires <= horizon)
    return {"ages": dict(ages), "needing": needing, "expiring": expiring, "connections": active}
