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

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Reason
from app.powens.errors import classify_state, is_transient_state
from app.powens.links import reconnect_command
from app.store.models import BankAccount, BankConnection
from app.store.repo import linked_user_pks
from app.store.states import AccountStatus

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
    old = [
        {
            "accountId": acc_id,
            "name": name,
            "powensLastUpdate": last.isoformat() if last else None,
            "age": age_text(last, now),
        }
        for acc_id, name, last in session.execute(
            select(BankAccount.id, BankAccount.name, BankAccount.powens_last_update)
            .where(BankAccount.tenant_id == tenant_id, BankAccount.status == AccountStatus.ACTIVE)
            .order_by(BankAccount.powens_last_update.asc().nulls_first(), BankAccount.id)
        )
        if is_old(settings, last, now)
    ]
    conns = session.scalars(
        select(BankConnection)
        .where(
            BankConnection.tenant_id == tenant_id,
            BankConnection.powens_user_pk.in_(linked_user_pks()),  # an unlinked user's: nobody's to fix
        )
        .order_by(BankConnection.id)
    ).all()
    needing, expiring = [], []
    horizon = now + timedelta(days=settings.consent_warning_days)
    for c in conns:
        why = needs_attention(settings, c.state, c.state_since, now) if c.active else None
        if why is not None:
            needing.append(
                {
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "state": c.state,
                    "since": c.state_since.isoformat() if c.state_since else None,
                    "why": why,
                    # A link needs a fresh temporary code: made when a person asks, never stored here.
                    "reconnectCommand": reconnect_command(tenant_id, c.id),
                }
            )
        if c.active and c.consent_expires_at is not None and c.consent_expires_at <= horizon:
            expiring.append(
                {
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "consentExpiresAt": c.consent_expires_at.isoformat(),
                    "daysLeft": round((c.consent_expires_at - now).total_seconds() / 86_400, 1),
                    "reconnectCommand": reconnect_command(tenant_id, c.id),
                }
            )
    return {"oldBankData": old, "connectionsNeedingUser": needing, "consentsExpiring": expiring}


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
