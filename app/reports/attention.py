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

Each rule is a Python function of one row (the lists: a few rows, read with their ids) and, beside it,
the same rule as a SQL expression (the beat's gauges: counted by the database over every row, so a
scrape reads a handful of numbers, never the rows; docs/design.md "Observability"). Both are built from
the same constants, and ``tests/test_service_gauges.py`` holds the two to the same counts row by row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, String, and_, case, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from app.config import Settings
from app.errors import Reason
from app.jsonio import rfc3339
from app.powens.errors import TRANSIENT_STATES, classify_state, is_transient_state
from app.powens.links import reconnect_command
from app.store.models import BankAccount, BankConnection, RefreshRun, RunItem
from app.store.repo import linked_user_pks
from app.store.states import AccountStatus, ItemStatus, RunStatus

# The ``bucket`` label of openbanking_accounts_by_data_age (no ids in labels): bank data younger than
# each limit (days), else older than the last one, else none yet.
AGE_LIMITS = ((1, "under_1d"), (3, "1d_to_3d"), (7, "3d_to_7d"))
AGE_OLDEST, AGE_NEVER = "over_7d", "never"
AGE_BUCKETS = (*(name for _days, name in AGE_LIMITS), AGE_OLDEST, AGE_NEVER)


def age_bucket(last_update: datetime | None, now: datetime) -> str:
    if last_update is None:
        return AGE_NEVER
    for days, name in AGE_LIMITS:
        if now - last_update < timedelta(days=days):
            return name
    return AGE_OLDEST


def age_bucket_sql(now: datetime) -> ColumnElement[str]:
    """``age_bucket`` of an account's bank data asked of the database (same limits, same comparisons)."""
    last_update = BankAccount.powens_last_update
    return case(
        (last_update.is_(None), AGE_NEVER),
        *((last_update > now - timedelta(days=days), name) for days, name in AGE_LIMITS),
        else_=AGE_OLDEST,
    )


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


def needs_attention_sql(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """``needs_attention(...) is not None`` asked of the database, from the same state lists:
    ``classify_state`` makes every state that is neither empty nor transient (unknown ones included)
    the user's; a transient state needs a person once it lasts past BALANCES_TRANSIENT_STATE_DAYS."""
    state, since = BankConnection.state, BankConnection.state_since
    transient = _ascii_lower(state).in_(sorted(TRANSIENT_STATES))
    user_action = and_(state.is_not(None), state != "", ~transient)
    lasting = and_(transient, since < now - timedelta(days=settings.transient_state_days))
    return or_(user_action, lasting)


class _ascii_lower(FunctionElement[str]):
    """``str.lower()`` as the state lists need it, in SQL. The lists are ASCII letters, and outside
    ASCII only the Kelvin sign lowers to one in Python ('k', in no list; 'İ' becomes 'i' plus a
    combining dot), so a state is in a list exactly when it is with A-Z lowered and nothing else.
    PostgreSQL's ``lower()`` follows the database's locale ('İ' becomes 'i' under C.UTF-8): under the
    "C" collation it lowers A-Z only. SQLite's ``lower()`` lowers A-Z only already. The premise is
    checked by ``tests/test_service_gauges.py``."""

    type = String()
    name = "lower"
    inherit_cache = True


@compiles(_ascii_lower)
def _lower(element: _ascii_lower, compiler: SQLCompiler, **kw: Any) -> str:
    return f"lower({compiler.process(element.clauses, **kw)})"


@compiles(_ascii_lower, "postgresql")
def _lower_c(element: _ascii_lower, compiler: SQLCompiler, **kw: Any) -> str:
    return f'lower(({compiler.process(element.clauses, **kw)}) COLLATE "C")'


def consent_ending(settings: Settings, expires: datetime | None, now: datetime) -> bool:
    """A PSD2 consent that ends (or ended) within BALANCES_CONSENT_WARNING_DAYS."""
    return expires is not None and expires <= now + timedelta(days=settings.consent_warning_days)


def consent_ending_sql(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """``consent_ending`` asked of the database."""
    return BankConnection.consent_expires_at <= now + timedelta(days=settings.consent_warning_days)


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
    stmt = (
        select(BankConnection)
        .where(BankConnection.active.is_(True))
        .where(BankConnection.powens_user_pk.in_(linked_user_pks()))  # an unlinked user's: nobody's to fix
        .where(or_(BankConnection.state.is_not(None), consent_ending_sql(settings, now)))
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
        expires = c.consent_expires_at
        if expires is not None and consent_ending(settings, expires, now):
            expiring.append(
                {
                    "tenantId": c.tenant_id,
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "consentExpiresAt": rfc3339(expires),
                    "daysLeft": round((expires - now).total_seconds() / 86_400, 1),
                    "reconnectCommand": reconnect_command(c.tenant_id, c.id),
                }
            )
    return needing, expiring


def repeated_failures(
    session: Session, runs: int = 3, tenant_id: str | None = None, limit: int | None = None
) -> tuple[list[str], int, list[dict[str, Any]]]:
    """Accounts that failed in each of the last ``runs`` finished nightly runs (not a bad night: an
    account that needs someone), with their latest reason and what to do: a reconnect link when the
    bank waits for the user, else a refresh to see the error again. Returns (those runs' ids, how many
    accounts in all, the first ``limit`` of them)."""
    last_runs = list(
        session.scalars(
            select(RefreshRun.id)
            .where(RefreshRun.status.in_((RunStatus.COMPLETED, RunStatus.STALE)))
            .order_by(RefreshRun.created_at.desc(), RefreshRun.id.desc())
            .limit(runs)
        )
    )
    if len(last_runs) < runs:
        return last_runs, 0, []
    stmt = (
        select(RunItem.tenant_id, RunItem.account_id)
        .where(RunItem.run_id.in_(last_runs), RunItem.status == ItemStatus.FAILED)
        .group_by(RunItem.tenant_id, RunItem.account_id)
        .having(func.count() == runs)
    )
    if tenant_id is not None:
        stmt = stmt.where(RunItem.tenant_id == tenant_id)
    total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
    failing = session.execute(stmt.order_by(RunItem.tenant_id, RunItem.account_id).limit(limit)).all()
    accounts = [a for _t, a in failing]
    reasons = dict(
        session.execute(
            select(RunItem.account_id, RunItem.reason).where(
                RunItem.run_id == last_runs[0], RunItem.account_id.in_(accounts)
            )
        ).all()
    )
    about = {
        acc: (name, connection)
        for acc, name, connection in session.execute(
            select(BankAccount.id, BankAccount.name, BankAccount.connection_id).where(
                BankAccount.id.in_(accounts)
            )
        )
    }

    def what_to_do(tenant: str, acc: str) -> str:
        if reasons.get(acc) == Reason.NEEDS_USER_ACTION and acc in about:
            return reconnect_command(tenant, about[acc][1])
        return f"balances refresh --tenant {tenant} --account {acc}"

    return (
        last_runs,
        total,
        [
            {
                "tenantId": tenant,
                "accountId": acc,
                "name": about.get(acc, (None, None))[0],
                "failedRuns": runs,
                "reason": reasons.get(acc),
                "command": what_to_do(tenant, acc),
            }
            for tenant, acc in failing
        ],
    )


def service_attention(
    session: Session, settings: Settings, now: datetime, *, limit: int = 100, runs: int = 3
) -> dict[str, Any]:
    """What needs a person across every tenant (``balances attention``): each list at most ``limit``
    long, with its full count, so the answer stays small however big the service is."""
    old = old_bank_data(session, settings, now, limit=limit)
    needing, expiring = connection_views(session, settings, now)
    failed_runs, failing_total, failing = repeated_failures(session, runs, limit=limit)
    old_total = session.scalar(
        select(func.count()).select_from(BankAccount).where(_old_clause(settings, now))
    )
    return {
        "generatedAt": rfc3339(now),
        "oldBankData": {"total": int(old_total or 0), "items": old},
        "connectionsNeedingUser": {"total": len(needing), "items": needing[:limit]},
        "consentsExpiring": {"total": len(expiring), "items": expiring[:limit]},
        "repeatedFailures": {"runs": failed_runs, "total": failing_total, "items": failing},
    }


@dataclass(frozen=True)
class ServiceCounts:
    """Across every tenant, for the beat's gauges: active accounts by the age of their bank data
    (every bucket of ``AGE_BUCKETS``, zeros included), and the active connections of linked users:
    all of them, those that need a person, those whose consent ends soon."""

    ages: dict[str, int]
    needing: int
    expiring: int
    connections: int


def service_counts(session: Session, settings: Settings, now: datetime) -> ServiceCounts:
    """Two aggregates that return a handful of rows whatever the number of accounts: the rules are
    asked of the database (``age_bucket_sql``, ``needs_attention_sql``, ``consent_ending_sql``), so
    the beat's memory does not grow with the service (docs/design.md "Observability")."""
    ages = dict.fromkeys(AGE_BUCKETS, 0)
    bucket = age_bucket_sql(now)
    for name, n in session.execute(
        select(bucket, func.count()).where(BankAccount.status == AccountStatus.ACTIVE).group_by(bucket)
    ):
        ages[str(name)] += int(n)
    counted = session.execute(
        select(
            func.count(),
            func.count().filter(needs_attention_sql(settings, now)),
            func.count().filter(consent_ending_sql(settings, now)),
        )
        .where(BankConnection.active.is_(True))
        .where(BankConnection.powens_user_pk.in_(linked_user_pks()))  # an unlinked user's: nobody's to fix
    ).one()
    connections, needing, expiring = (int(n or 0) for n in counted)
    return ServiceCounts(ages=ages, needing=needing, expiring=expiring, connections=connections)
