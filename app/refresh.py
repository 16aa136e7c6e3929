"""The command handler of ``openbanking.balances.refresh`` v1.0.0. Plain functions, no Celery inside.

``execute`` runs one attempt and returns its outcome as a value (``app.outcomes``); every terminal
outcome — success, failure, denial — is recorded there exactly once. ``refresh_balances`` is the
same call in the contract's shape (returns the output or raises). See docs/design.md "The refresh".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from app import metrics
from app.contract import (
    REFRESH_OPERATION,
    OpenBankingRefreshBalancesInput,
    OpenBankingRefreshBalancesOutput,
    parse_input,
)
from app.coordination import Throttled
from app.deps import Deps
from app.errors import NotFound, Reason, RefreshError
from app.outcomes import Attempt, Outcome, Requeue, Retry, Subject, record, replay, unwrap
from app.policy import Actor, authorize
from app.powens.client import EP_ACCOUNTS
from app.powens.errors import PowensError, classify_state, is_transient_state
from app.powens.links import needs_user
from app.powens.models import PowensAccount
from app.records import map_balances, to_record
from app.store import repo
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection
from app.store.registry import register_accounts
from app.store.secrets import TokenCipher
from app.store.states import AccountStatus, Trigger

log = logging.getLogger(__name__)


def check_policy(
    raw_input: Any, actor: Actor | str, trigger: Trigger, *, deps: Deps | None = None
) -> tuple[OpenBankingRefreshBalancesInput, Actor]:
    """Validate and authorize before dispatch. A refusal is terminal: it is recorded, then raised."""
    deps = deps or Deps.default()
    started = deps.clock()
    try:
        inp = parse_input(raw_input)
        who = deps.actor(actor)
        authorize(REFRESH_OPERATION, who)
        return inp, who
    except RefreshError as err:
        subject = Subject.of(raw_input, actor, trigger)
        record(deps.settings, subject, Attempt(), attempts=0, started_at=started, clock=deps.clock, error=err)
        raise


def refresh_balances(
    raw_input: Any,
    actor: Actor | str,
    trigger: Trigger | str,
    *,
    attempt: Attempt | None = None,
    deps: Deps | None = None,
) -> OpenBankingRefreshBalancesOutput:
    """The contract's shape: the output, or the failure raised (``RetryLater`` before the last attempt)."""
    return unwrap(execute(raw_input, actor, trigger, attempt=attempt, deps=deps))


def execute(
    raw_input: Any,
    actor: Actor | str,
    trigger: Trigger | str,
    *,
    attempt: Attempt | None = None,
    deps: Deps | None = None,
) -> Outcome:
    attempt = attempt or Attempt()
    deps = deps or Deps.default()
    trigger = Trigger(trigger)
    subject = Subject.of(raw_input, actor, trigger)
    started = deps.clock()
    if attempt.task_id is not None:
        done = replay(deps.settings, attempt.task_id, subject.balance_types)
        if done is not None:
            return done
    t0 = time.perf_counter()
    try:
        inp = parse_input(raw_input)
        who = deps.actor(actor)
        authorize(REFRESH_OPERATION, who)
        read = _read(inp, who, attempt, deps)
        success = record(
            deps.settings,
            subject,
            attempt,
            attempts=attempt.number,
            started_at=read.refreshed_at,
            clock=deps.clock,
            store=lambda session: _store(session, deps, inp, read),
            request_id=read.request_id,
        )
    except Throttled as th:
        return Requeue(th.wait, str(th))
    except RefreshError as err:
        error = err
    except Exception as exc:  # a bug: classified once, here
        log.exception("refresh failed with an unexpected error")
        error = RefreshError(Reason.INTERNAL, f"internal error ({type(exc).__name__})")
    else:
        _observe(trigger, t0)
        return success
    _observe(trigger, t0)
    if error.retryable and not attempt.final:
        metrics.RETRIES.labels(provider=metrics.PROVIDER, reason=error.reason.value).inc()
        return Retry(error)
    return record(
        deps.settings,
        subject,
        attempt,
        attempts=attempt.number,
        started_at=started,
        clock=deps.clock,
        error=error,
    )


def _observe(trigger: Trigger, t0: float) -> None:
    metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=trigger.value).observe(
        time.perf_counter() - t0
    )


@dataclass
class Read:
    """What one attempt learnt from Powens, before it is stored."""

    refreshed_at: datetime
    pacc: PowensAccount | None = None  # None: a concurrent refresh already stored fresh data
    drafts: list[repo.BalanceDraft] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    request_id: str | None = None


def _read(inp: OpenBankingRefreshBalancesInput, actor: Actor, attempt: Attempt, deps: Deps) -> Read:
    settings = deps.settings
    started = deps.clock()
    # Single flight per account: a concurrent refresh of the same account (on-demand and scheduled at
    # once) waits here, then takes the fresh result instead of reading Powens again.
    with deps.coord.account_lock(
        inp.account_id, ttl=settings.powens_call_budget, wait=settings.lock_wait_seconds
    ):
        with session_scope(settings) as session:
            ctx = repo.find_account(session, inp.tenant_id, inp.account_id)
            if ctx is None:
                raise NotFound(f"account {inp.account_id!r} not found for tenant {inp.tenant_id!r}")
            if inp.connection_id is not None and inp.connection_id != ctx.connection.id:
                raise NotFound(f"account {inp.account_id!r} not found in connection {inp.connection_id!r}")
            if ctx.account.status == AccountStatus.DELETED:
                raise NotFound(f"account {inp.account_id!r} was deleted at Powens")
            token = TokenCipher.from_settings(settings).decrypt(ctx.user.token_encrypted)
            powens_user_id = ctx.user.powens_user_id
            user_pk = ctx.user.id
            account_external_id = ctx.account.external_id
            connection_id = ctx.connection.id
            connection_external_id = ctx.connection.external_id
            last = ctx.account.last_refreshed_at
            fresh = last is not None and last >= started
        if fresh:
            note = "coalesced with a concurrent refresh of this account; its result is returned"
            return Read(refreshed_at=started, errors=[note])

        errors: list[str] = []
        if inp.force_refresh:
            errors.extend(
                _force_sync(deps, actor, token, powens_user_id, connection_id, connection_external_id)
            )
        if attempt.run_id is not None and not inp.force_refresh:
            pacc, request_id = _shared_read(
                deps, attempt.run_id, user_pk, powens_user_id, token, account_external_id
            )
        else:
            answer = deps.client.get_account(token, powens_user_id, account_external_id)
            pacc, request_id = answer.value, answer.request_id
        if pacc is None or pacc.deleted is not None:
            raise NotFound(f"account {inp.account_id!r} was deleted at Powens")
        if pacc.disabled is not None:
            raise NotFound(f"account {inp.account_id!r} is disabled at Powens (not synced)")
        if classify_state(pacc.error) is Reason.NEEDS_USER_ACTION:
            _record_connection_state(deps, connection_id, pacc.error)
            raise needs_user(settings, connection_external_id, pacc.error, request_id)
        if is_transient_state(pacc.error):
            errors.append(
                f"connection state {pacc.error}: Powens will retry; "
                "balances are from its last successful sync"
            )

        refreshed_at = deps.clock()
        drafts = map_balances(pacc, refreshed_at)
        wanted = inp.balance_types
        if wanted:
            for missing in [t for t in wanted if t not in {d.balance_type for d in drafts}]:
                errors.append(f"balance type {missing!r} is not provided by Powens for this account")
            drafts = [d for d in drafts if d.balance_type in wanted]
        if pacc.last_update is None:
            errors.append("Powens reports no successful bank sync yet; lastUpdatedAt is the refresh time")
        return Read(refreshed_at, pacc, drafts, errors, request_id)


def _store(
    session: Session, deps: Deps, inp: OpenBankingRefreshBalancesInput, read: Read
) -> OpenBankingRefreshBalancesOutput:
    """The success's own writes (inside the transaction of its audit row): latest records, today's
    snapshot, account and connection state. Returns the output."""
    settings = deps.settings
    errors = list(read.errors)
    account = session.get(BankAccount, inp.account_id, with_for_update=True)
    assert account is not None
    pacc = read.pacc
    if pacc is not None:
        day = settings.business_day(read.refreshed_at)
        repo.upsert_balances(session, account, read.drafts, refreshed_at=read.refreshed_at, day=day)
        _update_account(account, pacc, read.refreshed_at)
        conn = session.get(BankConnection, account.connection_id)
        if conn is not None and conn.state != (pacc.error or None):
            conn.state = pacc.error or None
            conn.updated_at = read.refreshed_at
        types = [d.balance_type for d in read.drafts]
    else:
        types = list(inp.balance_types or [])
    stored = repo.latest_balances(session, inp.tenant_id, inp.account_id, types or None)
    for row, draft in ((r, d) for r in stored for d in read.drafts if d.balance_type == r.balance_type):
        if row.last_updated_at > draft.last_updated_at:
            errors.append(f"Powens returned {draft.balance_type} data older than the stored record; kept it")
    return OpenBankingRefreshBalancesOutput(
        balances=[to_record(r) for r in stored], refreshed_at=read.refreshed_at, errors=errors or None
    )


def _shared_read(
    deps: Deps, run_id: str, user_pk: int, powens_user_id: int, token: str, account_external_id: int
) -> tuple[PowensAccount | None, str | None]:
    """All accounts of one Powens user, read once per run and shared by its accounts' tasks."""
    settings = deps.settings

    def fetch() -> dict[str, Any]:
        raw, rid = deps.client.list_accounts_raw(token, powens_user_id)
        parsed = [PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS) for item in raw]
        # New accounts found at Powens during the run are registered (refreshed from the next run).
        with session_scope(settings) as session:
            register_accounts(session, user_pk, [], parsed, deps.clock(), update_existing=False)
        return {"accounts": raw, "request_id": rid}

    shared = deps.coord.shared(
        f"accounts:{run_id}:{powens_user_id}",
        fetch,
        ttl=settings.shared_read_ttl,
        wait=settings.powens_call_budget,
    )
    for item in shared["accounts"]:
        if isinstance(item, dict) and str(item.get("id")) == str(account_external_id):
            return PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS), shared.get("request_id")
    return None, shared.get("request_id")


def _update_account(account: BankAccount, pacc: PowensAccount, now: datetime) -> None:
    account.name = pacc.name
    account.currency = pacc.currency
    account.balance = pacc.balance
    account.coming = pacc.coming
    if account.powens_last_update is None or (
        pacc.last_update is not None and pacc.last_update >= account.powens_last_update
    ):
        account.powens_last_update = pacc.last_update
    account.last_refreshed_at = now
    account.updated_at = now


def _record_connection_state(deps: Deps, connection_id: str, state: str | None) -> None:
    """Keep the connection's state current even when the refresh fails (summaries list it)."""
    with session_scope(deps.settings) as session:
        conn = session.get(BankConnection, connection_id)
        if conn is not None:
            conn.state = state
            conn.updated_at = deps.clock()


def _force_sync(
    deps: Deps, actor: Actor, token: str, powens_user_id: int, connection_id: str, connection_external_id: int
) -> list[str]:
    """Force a bank sync within the PSD2 quota; past it, say so and read what Powens has."""
    settings = deps.settings
    now = deps.clock()
    with session_scope(settings) as session:
        # Row lock: two workers forcing the same connection cannot both take the last slot.
        repo.lock_connection(session, connection_id)
        used = repo.forced_syncs_since(session, connection_id, now - timedelta(hours=24))
        if used >= settings.force_sync_quota:
            return [
                f"forced sync skipped: quota of {settings.force_sync_quota} background syncs per 24 h "
                f"reached for connection {connection_external_id}; read the last synced data"
            ]
        repo.record_forced_sync(session, connection_id, now, actor.name)
    try:
        answer = deps.client.sync_connection(token, powens_user_id, connection_external_id)
    except PowensError as err:
        if err.status == 409:
            return ["forced sync not started: a sync of this connection is already running"]
        raise
    conn = answer.value
    _record_connection_state(deps, connection_id, conn.state)
    if classify_state(conn.state) is Reason.NEEDS_USER_ACTION:
        raise needs_user(settings, connection_external_id, conn.state, answer.request_id)
    return []
