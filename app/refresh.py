"""The command handler of ``openbanking.balances.refresh`` v1.0.0. Plain functions, no Celery inside.

``execute`` runs one attempt and returns its outcome as a value (``app.outcomes``); every terminal
outcome — success, failure, denial — is recorded there exactly once. ``refresh_balances`` is the
same call in the contract's shape (returns the output or raises). See docs/design.md "The refresh".
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from app import metrics, tokens
from app.config import Settings
from app.contract import (
    REFRESH_OPERATION,
    OpenBankingRefreshBalancesInput,
    OpenBankingRefreshBalancesOutput,
    parse_input,
)
from app.coordination import Throttled
from app.deps import Deps
from app.errors import NotFound, PolicyDenied, Reason, RefreshError
from app.forced_sync import force_sync
from app.infra import is_infrastructure
from app.outcomes import (
    Attempt,
    Failed,
    Outcome,
    Requeue,
    Retry,
    Subject,
    Terminal,
    record,
    replay,
    unwrap,
)
from app.policy import Actor, authorize
from app.powens.errors import PowensError, classify_state, is_transient_state
from app.powens.links import needs_user
from app.powens.models import PowensAccount, decimal_places
from app.records import map_balances, to_record
from app.shared_read import shared_account
from app.store import repo
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection
from app.store.states import AccountStatus, Trigger
from app.tokens import UserToken

log = logging.getLogger(__name__)
_rng = random.SystemRandom()


def check_policy(
    raw_input: Any, actor: Actor | str, trigger: Trigger, *, deps: Deps | None = None
) -> tuple[OpenBankingRefreshBalancesInput, Actor]:
    """Validate, authorize and resolve the account before dispatch, so nothing is published for an
    invalid input, a denied actor or an unknown account. A refusal is terminal: recorded, then raised."""
    deps = deps or Deps.default()
    started = deps.clock()
    try:
        inp = parse_input(raw_input)
        who = deps.actor(actor)
        authorize(REFRESH_OPERATION, who)
        with session_scope(deps.settings) as session:
            ctx = repo.find_account(session, inp.tenant_id, inp.account_id)
            if ctx is None or (inp.connection_id is not None and inp.connection_id != ctx.connection.id):
                raise NotFound(f"account {inp.account_id!r} not found for tenant {inp.tenant_id!r}")
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
    """One attempt. A failure of our own infrastructure (database, Redis) is neither the account's
    failure nor a bug: the attempt is re-queued with backoff and does not count."""
    attempt = attempt or Attempt()
    deps = deps or Deps.default()
    trigger = Trigger(trigger)
    try:
        return _attempt(raw_input, actor, trigger, attempt, deps)
    except SoftTimeLimitExceeded as exc:
        # Reading or recording the outcome took too long (the Powens call itself is classified inside
        # the attempt): come back later rather than be acknowledged with nothing recorded.
        log.warning("refresh re-queued: soft time limit reached outside the Powens call")
        return _infra_requeue(deps, attempt, exc)
    except Exception as exc:
        if not is_infrastructure(exc):
            raise
        log.warning("refresh re-queued: infrastructure unavailable (%s)", type(exc).__name__)
        return _infra_requeue(deps, attempt, exc)


def _infra_requeue(deps: Deps, attempt: Attempt, exc: BaseException) -> Requeue:
    ceiling = min(deps.settings.infra_retry_cap_seconds, 2.0 ** (attempt.infra_failures + 1))
    return Requeue(
        _rng.uniform(ceiling / 2, ceiling), f"infrastructure unavailable ({type(exc).__name__})", True
    )


def _attempt(raw_input: Any, actor: Actor | str, trigger: Trigger, attempt: Attempt, deps: Deps) -> Outcome:
    subject = Subject.of(raw_input, actor, trigger)
    started = deps.clock()
    if attempt.task_id is not None:
        done = replay(deps.settings, attempt.task_id, subject.balance_types)
        if done is not None:
            return done
    t0 = time.perf_counter()
    try:
        inp = parse_input(raw_input)
        subject = Subject.of(inp, actor, trigger)  # the validated ids (trimmed), from here on
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
            store=lambda session: _store(session, deps, inp, read, attempt.business_day),
            request_id=read.request_id,
        )
    except Throttled as th:
        return Requeue(th.wait, th.why)
    except RefreshError as err:
        error = err
    except Exception as exc:
        if is_infrastructure(exc):
            raise
        log.exception("refresh failed with an unexpected error")  # a bug: classified once, here
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
    # once) waits here, then takes the fresh result instead of reading Powens again. The lock is a
    # renewed lease: it never expires under the work it guards, and a killed holder frees it quickly.
    with deps.coord.account_lock(
        inp.account_id, lease=settings.lock_lease_seconds, wait=settings.lock_wait_seconds
    ):
        with session_scope(settings) as session:
            ctx = repo.find_account(session, inp.tenant_id, inp.account_id)
            if ctx is None:
                raise NotFound(f"account {inp.account_id!r} not found for tenant {inp.tenant_id!r}")
            if inp.connection_id is not None and inp.connection_id != ctx.connection.id:
                raise NotFound(f"account {inp.account_id!r} not found in connection {inp.connection_id!r}")
            if ctx.account.status == AccountStatus.DELETED:
                raise NotFound(f"account {inp.account_id!r} was deleted at Powens")
            user = UserToken.of(deps, ctx.user)
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
            errors.extend(force_sync(deps, actor, attempt, user, connection_id, connection_external_id))
        pacc: PowensAccount | None = None
        request_id: str | None = None
        if attempt.run_id is not None and not inp.force_refresh:
            pacc, request_id = shared_account(deps, attempt, user, account_external_id)
        if pacc is None:
            # Read the account itself (on demand; or absent from the user's list, which alone never
            # means deleted: only Powens' own answer about this account does).
            try:
                answer = tokens.call(
                    deps, user, lambda t: deps.client.get_account(t, user.powens_user_id, account_external_id)
                )
            except PowensError as err:
                if err.status == 404 and err.reason is Reason.NOT_FOUND:
                    _set_status(deps, inp.account_id, AccountStatus.DELETED)
                raise
            pacc, request_id = answer.value, answer.request_id
        if pacc.deleted is not None:
            _set_status(deps, inp.account_id, AccountStatus.DELETED)
            raise NotFound(f"account {inp.account_id!r} was deleted at Powens")
        if pacc.disabled is not None:
            _set_status(deps, inp.account_id, AccountStatus.DISABLED)
            raise NotFound(f"account {inp.account_id!r} is disabled at Powens (not synced)")
        if classify_state(pacc.error) is Reason.NEEDS_USER_ACTION:
            _record_connection_state(deps, connection_id, pacc.error)
            raise needs_user(inp.tenant_id, connection_id, connection_external_id, pacc.error, request_id)
        if is_transient_state(pacc.error):
            errors.append(
                f"connection state {pacc.error}: Powens will retry; "
                "balances are from its last successful sync"
            )
        return _drafts(inp, pacc, request_id, errors, deps.clock())


def _drafts(
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


def _store(
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
        _update_account(account, pacc, read.refreshed_at)
        conn = session.get(BankConnection, account.connection_id)
        if conn is not None and conn.state != (pacc.error or None):
            conn.state = pacc.error or None
            conn.updated_at = read.refreshed_at
    stored = repo.latest_balances(session, inp.tenant_id, inp.account_id, types or inp.balance_types or None)
    for row, draft in ((r, d) for r in stored for d in read.drafts if d.balance_type == r.balance_type):
        if row.last_updated_at > draft.last_updated_at:
            errors.append(f"Powens returned {draft.balance_type} data older than the stored record; kept it")
    return OpenBankingRefreshBalancesOutput(
        balances=[to_record(r) for r in stored], refreshed_at=read.refreshed_at, errors=errors or None
    )


def _update_account(account: BankAccount, pacc: PowensAccount, now: datetime) -> None:
    """The account row follows Powens, but never back to an older answer than the one it holds."""
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


def _set_status(deps: Deps, account_id: str, status: AccountStatus) -> None:
    """On Powens' word (its answer about this very account): deleted or disabled accounts leave the
    nightly runs until Powens lists them again."""
    with session_scope(deps.settings) as session:
        repo.set_account_status(session, account_id, status, deps.clock())


def _record_connection_state(deps: Deps, connection_id: str, state: str | None) -> None:
    """Keep the connection's state current even when the refresh fails (summaries list it)."""
    with session_scope(deps.settings) as session:
        repo.set_connection_state(session, connection_id, state, deps.clock())


def deny_refresh(
    settings: Settings, claimed_task_id: str, raw_input: Any, actor: Any, trigger: Any
) -> Failed:
    """A refresh message the service did not sign: whoever wrote it to the broker is not an actor."""
    deps = Deps(settings)
    error = PolicyDenied(
        f"refresh message {str(claimed_task_id)[:64]!r} is not signed by the service "
        f"(it names actor {str(actor)[:64]!r}): not run"
    )
    named = Trigger(trigger) if trigger in tuple(Trigger) else Trigger.ON_DEMAND
    subject = Subject.of(raw_input, str(actor)[:128] if actor is not None else "unknown", named)
    now = deps.clock()
    outcome = record(settings, subject, Attempt(), attempts=0, started_at=now, clock=deps.clock, error=error)
    assert isinstance(outcome, Failed)
    return outcome


def give_up_refresh(
    settings: Settings,
    task_id: str,
    run_id: str | None,
    raw_input: Any,
    actor: str,
    trigger: str,
    why: str,
) -> Terminal:
    """A refresh that cannot go on (a poison message: its worker died every time it ran it; or our
    infrastructure down for too long) ends as a recorded ``internal`` failure."""
    deps = Deps(settings)
    error = RefreshError(Reason.INTERNAL, why)
    subject = Subject.of(raw_input, actor, Trigger(trigger))
    attempt = Attempt(task_id=task_id, run_id=run_id)
    return record(
        settings, subject, attempt, attempts=0, started_at=deps.clock(), clock=deps.clock, error=error
    )
