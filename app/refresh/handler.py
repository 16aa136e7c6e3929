"""The command handler of ``openbanking.balances.refresh`` v1.0.0. Plain functions, no Celery inside.

``execute`` runs one attempt and returns its outcome as a value (``app.refresh.outcomes``). It reads
Powens, judges the answer (``app.refresh.verdict``) and records the outcome through the one write path
(``app.refresh.write``): a single refresh is a batch of one, written by the same statements as a
nightly batch or a push. ``refresh_balances`` is the same call in the contract's shape (returns the
output or raises). See docs/design.md "The refresh".
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from app.config import Settings
from app.contract import (
    REFRESH_OPERATION,
    OpenBankingRefreshBalancesInput,
    OpenBankingRefreshBalancesOutput,
    parse_input,
)
from app.errors import NotFound, PolicyDenied, Reason, RefreshError
from app.ops import metrics
from app.policy import Actor, authorize
from app.powens.errors import PowensError
from app.powens.models import PowensAccount
from app.refresh import tokens, write
from app.refresh.coordination import Throttled
from app.refresh.deps import Deps
from app.refresh.forced_sync import force_sync
from app.refresh.outcomes import (
    Attempt,
    Failed,
    Outcome,
    Requeue,
    Retry,
    Subject,
    Terminal,
    replay,
    unwrap,
)
from app.refresh.records import check_balance_types
from app.refresh.shared_read import shared_account
from app.refresh.tokens import UserToken
from app.refresh.verdict import (
    Verdict,
    Where,
    connection_needs_user,
    deleted,
    judge,
    pushed_note,
    pushed_recently,
    unlinked,
)
from app.retry import as_failure, infra_requeue_seconds, is_infrastructure, say_when
from app.store import repo
from app.store.db import session_scope
from app.store.states import AccountStatus, Trigger

log = logging.getLogger(__name__)
_rng = random.SystemRandom()


def record_one(deps: Deps, subject: Subject, verdict: Verdict, attempt: Attempt, attempts: int) -> Terminal:
    """One terminal outcome through the write path (a batch of one), as the handler returns it."""
    started = verdict.at
    entry = write.Entry(subject, verdict, attempt, attempts, started)
    [done] = write.record(deps.settings, [entry], deps.clock).recorded
    if done.status == "skipped":
        # Its run item was finished already: by another delivery (its outcome stands) or the sweeper.
        found = replay(deps.settings, attempt.task_id, subject.balance_types) if attempt.task_id else None
        return found or Failed(
            RefreshError(
                Reason.INTERNAL, "the run's item for this account was already finished: not recorded"
            ),
            replayed=True,
        )
    return done.terminal()


def check_policy(
    raw_input: Any, actor: Actor | str, trigger: Trigger, *, deps: Deps | None = None
) -> tuple[OpenBankingRefreshBalancesInput, Actor]:
    """Validate, authorize and resolve the account before dispatch, so nothing is published for an
    invalid input, a denied actor or an unknown account. A refusal is terminal: recorded, then raised."""
    deps = deps or Deps.default()
    started = deps.clock()
    try:
        inp = parse_input(raw_input)
        check_balance_types(inp.balance_types)
        who = deps.actor(actor)
        authorize(REFRESH_OPERATION, who)
        with session_scope(deps.settings) as session:
            ctx = repo.require_account(session, inp.tenant_id, inp.account_id)
            if inp.connection_id is not None and inp.connection_id != ctx.connection.id:
                raise NotFound(f"account {inp.account_id!r} not found for tenant {inp.tenant_id!r}")
        return inp, who
    except RefreshError as err:
        subject = Subject.of(raw_input, actor, trigger)
        record_one(deps, subject, Verdict.failed(started, err), Attempt(), attempts=0)
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
    wait = infra_requeue_seconds(attempt.infra_failures, deps.settings, _rng)
    return Requeue(wait, f"infrastructure unavailable ({type(exc).__name__})", True)


def _attempt(raw_input: Any, actor: Actor | str, trigger: Trigger, attempt: Attempt, deps: Deps) -> Outcome:
    subject = Subject.of(raw_input, actor, trigger)
    started = deps.clock()
    if attempt.task_id is not None:
        done = replay(deps.settings, attempt.task_id, subject.balance_types)
        if done is not None:
            write.announce_in_doubt(deps.settings, [attempt.task_id])  # an earlier commit in doubt?
            return done
    t0 = time.perf_counter()
    try:
        inp = parse_input(raw_input)
        subject = Subject.of(inp, actor, trigger)  # the validated ids (trimmed), from here on
        who = deps.actor(actor)
        authorize(REFRESH_OPERATION, who)
    except Exception as exc:
        return _decide(deps, subject, Verdict.failed(started, as_failure(exc, "refresh")), attempt, t0)
    settings = deps.settings
    # Single flight per account, across the read and its recording: a concurrent refresh of the same
    # account (on-demand and scheduled at once) waits here, then finds the fresh result recorded and
    # takes it instead of reading Powens again. The lock is a renewed lease: it never expires under
    # the work it guards, and a killed holder frees it quickly.
    with deps.coord.account_lock(
        inp.account_id, lease=settings.lock_lease_seconds, wait=settings.lock_wait_seconds
    ):
        try:
            verdict = _read(inp, who, attempt, deps, started)
        except Throttled as th:
            return Requeue(th.wait, th.why)
        except Exception as exc:
            verdict = Verdict.failed(started, as_failure(exc, "refresh"))  # infrastructure: raised on
        return _decide(deps, subject, verdict, attempt, t0)


def _decide(deps: Deps, subject: Subject, verdict: Verdict, attempt: Attempt, t0: float) -> Outcome:
    """Retry a failure that may pass before the last attempt (nothing recorded); else record."""
    metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=subject.trigger.value).observe(
        time.perf_counter() - t0
    )
    error = verdict.error
    if error is not None and error.retryable and not attempt.final:
        metrics.RETRIES.labels(provider=metrics.PROVIDER, reason=error.reason.value).inc()
        return Retry(error)
    if error is not None and error.reason is Reason.RATE_LIMITED:
        say_when(deps.settings, error, attempt.number, deps.clock())
    return record_one(deps, subject, verdict, attempt, attempt.number)


def _pushed_recently(
    settings: Settings,
    attempt: Attempt,
    inp: OpenBankingRefreshBalancesInput,
    pushed_at: datetime | None,
    connection_state: str | None,
    now: datetime,
) -> datetime | None:
    """The nightly skip of a push-fresh account (``verdict.pushed_recently``); on demand, or forcing
    a sync, an operator always gets a read."""
    if attempt.run_id is None or inp.force_refresh:
        return None
    return pushed_recently(settings, pushed_at, connection_state, now)


def _read(
    inp: OpenBankingRefreshBalancesInput, actor: Actor, attempt: Attempt, deps: Deps, started: datetime
) -> Verdict:
    """Read the account from Powens and judge the answer (called under the account's lock, taken
    after ``started``: a refresh recorded since then is fresh enough to return)."""
    settings = deps.settings
    with session_scope(settings) as session:
        ctx = repo.find_account(session, inp.tenant_id, inp.account_id)
        if ctx is None:
            raise NotFound(f"account {inp.account_id!r} not found for tenant {inp.tenant_id!r}")
        if inp.connection_id is not None and inp.connection_id != ctx.connection.id:
            raise NotFound(f"account {inp.account_id!r} not found in connection {inp.connection_id!r}")
        if ctx.account.status == AccountStatus.DELETED:
            return Verdict.failed(started, deleted(inp.account_id))  # no Powens call for it
        if ctx.account.status == AccountStatus.UNLINKED:
            return Verdict.failed(started, unlinked(inp.account_id))  # no token, no Powens call
        user = UserToken.of(deps, ctx.user)
        account_external_id = ctx.account.external_id
        where = Where(inp.tenant_id, inp.account_id, ctx.connection.id, ctx.connection.external_id)
        last = ctx.account.last_refreshed_at
        fresh = last is not None and last >= started
        pushed = _pushed_recently(
            settings, attempt, inp, ctx.account.pushed_at, ctx.connection.state, started
        )
    types = tuple(inp.balance_types) if inp.balance_types else None
    if fresh:
        note = "coalesced with a concurrent refresh of this account; its result is returned"
        return Verdict(started, notes=(note,), balance_types=types)
    if pushed is not None:
        # The push path made it fresh: the nightly run is the reconciliation, not a second read.
        return Verdict(started, notes=(pushed_note(pushed),), balance_types=types)

    notes: list[str] = []
    if inp.force_refresh:
        forced, state = force_sync(
            deps, actor, attempt, user, where.connection_id, where.connection_external_id
        )
        notes.extend(forced)
        stuck = connection_needs_user(where, state, at=deps.clock())
        if stuck is not None:
            return stuck
    pacc: PowensAccount | None = None
    request_id: str | None = None
    asked = deps.clock()  # what the answer says held at least from then on (its status word)
    if attempt.run_id is not None and not inp.force_refresh:
        pacc, request_id, listed_at = shared_account(deps, attempt, user, account_external_id)
        asked = listed_at or asked
    if pacc is None:
        asked = deps.clock()
        # Read the account itself (on demand; or absent from the user's list, which alone never
        # means deleted: only Powens' own answer about this account does).
        try:
            answer = tokens.call(
                deps, user, lambda t: deps.client.get_account(t, user.powens_user_id, account_external_id)
            )
        except PowensError as err:
            if err.status == 404 and err.reason is Reason.NOT_FOUND:
                return Verdict.failed(deps.clock(), err, word=AccountStatus.DELETED, said_at=asked)
            raise
        pacc, request_id = answer.value, answer.request_id
    return judge(
        pacc,
        where,
        at=deps.clock(),
        request_id=request_id,
        notes=tuple(notes),
        balance_types=types,
        said_at=asked,
    )


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
    outcome = record_one(deps, subject, Verdict.failed(deps.clock(), error), Attempt(), attempts=0)
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
    return record_one(deps, subject, Verdict.failed(deps.clock(), error), attempt, attempts=0)
