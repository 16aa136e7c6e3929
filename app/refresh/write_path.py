"""What Powens' word about one account becomes in the store: the one write path of a refresh (which
read it) and of a push (which Powens sent). Plain functions, no Celery and no Powens call inside.

``judge`` turns a Powens account payload into what will be written, or into the failure a refresh
would record (deleted, disabled, a connection that needs its user); ``store`` writes it inside the
transaction of the outcome's audit row (``app.refresh.outcomes.record``): the latest records and the day's
snapshot, never replacing a record by an older one, then the account and its connection.
See docs/design.md "The refresh" and "The push path".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from sqlalchemy.orm import Session

from app.config import Settings
from app.contract import OpenBankingRefreshBalancesInput, OpenBankingRefreshBalancesOutput
from app.errors import NotFound, Reason, RefreshError
from app.powens.errors import classify_state, is_transient_state
from app.powens.links import needs_user
from app.powens.models import PowensAccount, decimal_places
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt
from app.refresh.records import map_balances, to_record
from app.store import repo
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection
from app.store.states import AccountStatus


@dataclass(frozen=True)
class Where:
    """The connection an account belongs to (canonical id, Powens id)."""

    connection_id: str
    connection_external_id: int


@dataclass
class Read:
    """What Powens said about one account, before it is stored."""

    refreshed_at: datetime
    pacc: PowensAccount | None = None  # None: a concurrent refresh already stored fresh data
    drafts: list[repo.BalanceDraft] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    request_id: str | None = None
    state: str | None = None  # the connection's state as Powens reported it with this account
    pushed: bool = False  # Powens sent it (a webhook) rather than we read it


def judge(
    deps: Deps,
    inp: OpenBankingRefreshBalancesInput,
    where: Where,
    pacc: PowensAccount,
    request_id: str | None,
    errors: list[str],
    *,
    state: str | None = None,
    pushed: bool = False,
) -> Read:
    """Powens' word about the account, checked as a refresh checks it. ``state`` is the connection's
    state when Powens gave it apart from the account (a push); else the account's own ``error``."""
    state = state if state is not None else pacc.error
    if pacc.deleted is not None:
        set_status(deps, inp.account_id, AccountStatus.DELETED)
        raise NotFound(f"account {inp.account_id!r} was deleted at Powens")
    if pacc.disabled is not None:
        set_status(deps, inp.account_id, AccountStatus.DISABLED)
        raise NotFound(f"account {inp.account_id!r} is disabled at Powens (not synced)")
    if classify_state(state) is Reason.NEEDS_USER_ACTION:
        record_connection_state(deps, where.connection_id, state)
        raise needs_user(inp.tenant_id, where.connection_id, where.connection_external_id, state, request_id)
    if is_transient_state(state):
        errors.append(
            f"connection state {state}: Powens will retry; balances are from its last successful sync"
        )
    read = drafts(inp, pacc, request_id, errors, deps.clock())
    read.state, read.pushed = state, pushed
    return read


def drafts(
    inp: OpenBankingRefreshBalancesInput,
    pacc: PowensAccount,
    request_id: str | None,
    errors: list[str],
    refreshed_at: datetime,
) -> Read:
    if pacc.balance is None or pacc.currency is None:
        # Powens (its OpenAPI) may have no balance or currency yet: the bank has not reported. That is
        # "no balance yet", kept visible as such; the stored records, if any, stay as they are.
        errors.append("no balance yet: Powens has no balance for this account (the bank has not reported)")
        return Read(refreshed_at, pacc, [], errors, request_id)
    drafts = map_balances(pacc, refreshed_at)
    wanted = inp.balance_types
    if wanted:
        for missing in [t for t in wanted if t not in {d.balance_type for d in drafts}]:
            errors.append(f"balance type {missing!r} is not provided by Powens for this account")
        drafts = [d for d in drafts if d.balance_type in wanted]
    if pacc.last_update is None:
        errors.append("Powens reports no successful bank sync yet; lastUpdatedAt is the refresh time")
    if pacc.currency_precision is not None and any(
        decimal_places(d.current_balance) > pacc.currency_precision for d in drafts
    ):
        errors.append(
            f"an amount has more decimal places than {pacc.currency}'s precision "
            f"({pacc.currency_precision}); kept exactly as Powens sent it"
        )
    return Read(refreshed_at, pacc, drafts, errors, request_id)


def store(
    session: Session,
    deps: Deps,
    inp: OpenBankingRefreshBalancesInput,
    read: Read,
    business_day: date | None,
) -> OpenBankingRefreshBalancesOutput:
    """The success's own writes (inside the transaction of its audit row): latest records, the
    snapshot of the business day (a nightly run's own, else today's), account and connection state.
    Returns the output."""
    settings = deps.settings
    errors = list(read.errors)
    account = session.get(BankAccount, inp.account_id, with_for_update=True)
    assert account is not None
    pacc = read.pacc
    types = [d.balance_type for d in read.drafts] if pacc is not None else list(inp.balance_types or [])
    if pacc is not None:
        if read.drafts:
            day = business_day or settings.business_day(read.refreshed_at)
            repo.upsert_balances(session, account, read.drafts, refreshed_at=read.refreshed_at, day=day)
            if not inp.balance_types:
                repo.drop_unsent_types(session, account.id, types, read.drafts[0].last_updated_at)
        if update_account(account, pacc, read.refreshed_at):
            # The connection's state follows the newest word only: an older push does not undo it.
            conn = session.get(BankConnection, account.connection_id)
            if conn is not None:
                conn.set_state(read.state or None, read.refreshed_at)
            if read.pushed and read.drafts:
                account.pushed_at = read.refreshed_at
    stored = repo.latest_balances(session, inp.tenant_id, inp.account_id, types or inp.balance_types or None)
    for row, draft in ((r, d) for r in stored for d in read.drafts if d.balance_type == r.balance_type):
        if row.last_updated_at > draft.last_updated_at:
            errors.append(f"Powens returned {draft.balance_type} data older than the stored record; kept it")
    return OpenBankingRefreshBalancesOutput(
        balances=[to_record(r) for r in stored], refreshed_at=read.refreshed_at, errors=errors or None
    )


def update_account(account: BankAccount, pacc: PowensAccount, now: datetime) -> bool:
    """The account row follows Powens, but never back to an older answer than the one it holds.
    True when this answer is at least as new as the one held."""
    newer = account.powens_last_update is None or (
        pacc.last_update is not None and pacc.last_update >= account.powens_last_update
    )
    if newer:
        account.name = pacc.name
        if pacc.balance is not None and pacc.currency is not None:  # "no balance yet" keeps the last
            account.currency = pacc.currency
            account.balance = pacc.balance
            account.coming = pacc.coming
        if pacc.last_update is not None:
            account.powens_last_update = pacc.last_update
    account.status = AccountStatus.ACTIVE
    account.last_refreshed_at = now
    account.updated_at = now
    return newer


def pushed_recently(
    settings: Settings, pushed_at: datetime | None, connection_state: str | None, now: datetime
) -> datetime | None:
    """When a push stored this account's balances recently enough that a nightly run need not read it.
    Not when the connection's state, as a later push or refresh left it, needs the user: the run
    reads, and records that failure."""
    if pushed_at is None or classify_state(connection_state) is Reason.NEEDS_USER_ACTION:
        return None
    window = settings.push_freshness_seconds
    return pushed_at if window > 0 and (now - pushed_at).total_seconds() <= window else None


def say_when(settings: Settings, error: RefreshError, attempt: Attempt, now: datetime) -> None:
    """A rate-limited refresh says when trying again is allowed: Powens' Retry-After when it sent one,
    else what our next backoff step would have waited."""
    wait = error.retry_after
    if wait is None:
        wait = min(settings.retry_cap_seconds, settings.retry_base_seconds * 2**attempt.number)
    error.next_attempt_at = (now + timedelta(seconds=wait)).replace(microsecond=0)
    error.message += f"; next attempt allowed at {error.next_attempt_at.isoformat().replace('+00:00', 'Z')}"


def set_status(deps: Deps, account_id: str, status: AccountStatus) -> None:
    """On Powens' word (its answer about this very account): deleted or disabled accounts leave the
    nightly runs until Powens lists them again."""
    with session_scope(deps.settings) as session:
        repo.set_account_status(session, account_id, status, deps.clock())


def record_connection_state(deps: Deps, connection_id: str, state: str | None) -> None:
    """Keep the connection's state current even when the refresh fails (summaries list it)."""
    with session_scope(deps.settings) as session:
        repo.set_connection_state(session, connection_id, state, deps.clock())
