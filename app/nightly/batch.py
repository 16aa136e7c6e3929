"""The nightly run's refresh, a batch of whole Powens users at a time. Plain functions, no Celery.

A nightly message carries the run items of a few whole Powens users (about
``BALANCES_REFRESH_BATCH_ACCOUNTS`` accounts). Its worker reads each user's account list once,
several users at once (``BALANCES_REFRESH_BATCH_READERS`` threads: the wait is Powens', not our
CPU), judges every account exactly as a single refresh does (``app.refresh.write_path.judge``), and records
the whole batch in one transaction of set-based statements (``app.store.bulk``). Every account keeps
its own outcome: its audit row (under its item's task id), its run item, its counter increment and
its telemetry event.

What a batch does not finish goes on as a single refresh would:
- a user whose read failed retryably comes back as a batch of its own, at the next attempt, after
  the same backoff (``max_attempts`` bounds the attempts; the last one records the failure);
- a user the cluster rate limiter held back comes back later, the attempt not consumed;
- an account missing from its user's list is handed to the single refresh (``refresh_account``,
  same task id), which reads the account itself: absence from a list never means deleted.

Duplicates cannot write twice: only items still pending are read, and an item's terminal outcome is
claimed by a conditional UPDATE in the recording transaction (a second delivery of the same batch,
or the sweeper re-publishing it, claims nothing). No per-account Redis lock: the run item is the
deduplication; an operator's refresh of the same account at the same moment reads on its own and
the conditional writes keep the newest answer. See docs/performance.md.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import select

from app.backoff import backoff_seconds
from app.contract import REFRESH_OPERATION, OpenBankingRefreshBalancesInput
from app.errors import NotFound, Reason, RefreshError
from app.infra import is_infrastructure
from app.ops import metrics
from app.policy import SCHEDULER
from app.powens.client import EP_ACCOUNTS
from app.powens.models import PowensAccount, essential
from app.refresh import tokens
from app.refresh.coordination import Throttled
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt, Subject, announce_failed, announce_refreshed
from app.refresh.shared_read import register_listed
from app.refresh.tokens import UserToken
from app.refresh.write_path import Read, Where, judge, pushed_recently, say_when
from app.store import bulk
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection, PowensUser, RunItem
from app.store.runs import Item
from app.store.states import AccountStatus, AttemptOutcome, ItemStatus, Trigger

log = logging.getLogger(__name__)
_rng = random.SystemRandom()


@dataclass
class Loaded:
    """One pending item with what reading and judging its account needs (detached rows)."""

    item: Item
    account: BankAccount
    connection: BankConnection
    user: PowensUser


@dataclass
class BatchResult:
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0  # no longer pending: finished by an earlier delivery
    retry: list[Item] = field(default_factory=list)  # next attempt, after ``retry_in``
    retry_in: float = 0.0
    requeue: list[Item] = field(default_factory=list)  # same attempt, after ``requeue_in``
    requeue_in: float = 0.0
    single: list[Item] = field(default_factory=list)  # handed to the single refresh
    emptied_tenants: list[str] = field(default_factory=list)  # counters at zero: claim their summary
    powens_calls: int = 0


@dataclass
class _Verdict:
    """What one account of the batch comes to."""

    loaded: Loaded
    read: Read | None = None
    error: RefreshError | None = None


def run_batch(
    deps: Deps,
    run_id: str,
    items: Sequence[Item],
    business_day: date | None,
    attempt_number: int = 1,
) -> BatchResult:
    """One attempt at a batch of run items. Our own infrastructure failing raises (the task re-queues
    the whole batch: what was recorded is skipped then); every other outcome is in the result."""
    settings = deps.settings
    result = BatchResult()
    t0 = time.perf_counter()
    loaded, gone = _load(deps, run_id, items)
    result.single.extend(gone)
    result.skipped = len(items) - len(loaded) - len(gone)
    attempt = Attempt(
        number=attempt_number, max_attempts=settings.max_attempts, run_id=run_id, business_day=business_day
    )
    started = deps.clock()
    verdicts: list[_Verdict] = []
    to_read: dict[int, list[Loaded]] = {}
    for ld in loaded:
        if ld.account.status == AccountStatus.DELETED:
            err = NotFound(f"account {ld.account.id!r} was deleted at Powens")
            verdicts.append(_Verdict(ld, error=err))
            continue
        pushed = pushed_recently(settings, ld.account.pushed_at, ld.connection.state, started)
        if pushed is not None:
            note = f"refreshed from a Powens push at {pushed.isoformat()}; not read again"
            verdicts.append(_Verdict(ld, read=Read(refreshed_at=started, errors=[note])))
            continue
        to_read.setdefault(ld.user.id, []).append(ld)

    answers = list(
        _readers(settings.refresh_batch_readers).map(lambda g: _read_user(deps, g), to_read.values())
    )
    retry_after: list[float] = []
    for group, answer in zip(to_read.values(), answers, strict=True):
        result.powens_calls += 1
        if isinstance(answer, Throttled):
            result.requeue.extend(ld.item for ld in group)
            result.requeue_in = max(result.requeue_in, answer.wait)
            continue
        if isinstance(answer, RefreshError):
            if answer.retryable and not attempt.final:
                for _ in group:
                    metrics.RETRIES.labels(provider=metrics.PROVIDER, reason=answer.reason.value).inc()
                result.retry.extend(ld.item for ld in group)
                retry_after.append(backoff_seconds(attempt.number, settings, answer.retry_after, _rng))
                continue
            if answer.reason is Reason.RATE_LIMITED:
                say_when(settings, answer, attempt, deps.clock())
            verdicts.extend(_Verdict(ld, error=answer) for ld in group)
            continue
        raw, request_id = answer
        listed = {str(item.get("id")): item for item in raw if isinstance(item, dict)}
        if not {str(ld.account.external_id) for ld in group} >= set(listed):
            register_listed(deps, group[0].user.id, group[0].user.powens_user_id, raw)
        for ld in group:
            entry = listed.get(str(ld.account.external_id))
            if entry is None:
                result.single.append(ld.item)
                continue
            verdicts.append(_judge(deps, ld, entry, request_id))
    if retry_after:
        result.retry_in = max(retry_after)

    _record(deps, run_id, attempt, verdicts, started, result)
    elapsed = time.perf_counter() - t0
    for _ in verdicts:
        metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=Trigger.SCHEDULED.value).observe(elapsed)
    return result


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _readers(size: int) -> ThreadPoolExecutor:
    """The process's Powens readers (threads: the wait is Powens'), made once per process and size
    (a pool child never uses its parent's threads: they do not survive the fork)."""
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[0] != pid or _pool[1] != size:
        _pool = (pid, size, ThreadPoolExecutor(max_workers=size, thread_name_prefix="powens-read"))
    return _pool[2]


def _load(deps: Deps, run_id: str, items: Sequence[Item]) -> tuple[list[Loaded], list[Item]]:
    """The batch's items still pending, with account, connection and user: one statement. Also the
    pending items whose rows are gone (the single refresh records them as not found at once, rather
    than leave them to the sweeper)."""
    by_account = {i[2]: i for i in items}
    with session_scope(deps.settings) as session:
        bulk.keyed_only(session)
        rows = session.execute(
            select(RunItem.account_id, BankAccount, BankConnection, PowensUser)
            .outerjoin(
                BankAccount,
                (BankAccount.id == RunItem.account_id) & (BankAccount.tenant_id == RunItem.tenant_id),
            )
            .outerjoin(BankConnection, BankConnection.id == BankAccount.connection_id)
            .outerjoin(PowensUser, PowensUser.id == BankAccount.powens_user_pk)
            .where(
                RunItem.run_id == run_id,
                RunItem.account_id.in_(list(by_account)),
                RunItem.status == ItemStatus.PENDING,
            )
        ).all()
    loaded = [Loaded(by_account[r[0]], r[1], r[2], r[3]) for r in rows if None not in (r[1], r[2], r[3])]
    gone = [by_account[r[0]] for r in rows if None in (r[1], r[2], r[3])]
    return loaded, gone


def _read_user(deps: Deps, group: list[Loaded]) -> tuple[list[Any], str | None] | RefreshError | Throttled:
    """One Powens call for the user's whole account list (a refused token is renewed once)."""
    try:
        user = UserToken.of(deps, group[0].user)
        return tokens.call(deps, user, lambda t: deps.client.list_accounts_raw(t, user.powens_user_id))
    except Throttled as th:
        return th
    except RefreshError as err:
        return err
    except Exception as exc:
        if is_infrastructure(exc):
            raise
        log.exception("reading a Powens user's accounts failed with an unexpected error")
        return RefreshError(Reason.INTERNAL, f"internal error ({type(exc).__name__})")


def _judge(deps: Deps, ld: Loaded, entry: dict[str, Any], request_id: str | None) -> _Verdict:
    """One account's entry of its user's list, checked as a single refresh checks it. Parsed alone:
    one unreadable account fails alone."""
    inp = OpenBankingRefreshBalancesInput.model_construct(
        tenant_id=ld.account.tenant_id, account_id=ld.account.id, balance_types=None, force_refresh=None
    )
    try:
        # Only the fields a refresh reads, as the single refresh's shared read keeps them: an odd
        # field nobody reads (an over-long account number) never fails the account.
        pacc = PowensAccount.parse(essential(entry), deps.settings.powens_zone, EP_ACCOUNTS)
        where = Where(ld.connection.id, ld.connection.external_id)
        return _Verdict(ld, read=judge(deps, inp, where, pacc, request_id, []))
    except RefreshError as err:
        return _Verdict(ld, error=err)
    except Exception as exc:
        if is_infrastructure(exc):
            raise
        log.exception("judging a Powens account failed with an unexpected error")
        return _Verdict(ld, error=RefreshError(Reason.INTERNAL, f"internal error ({type(exc).__name__})"))


def _record(
    deps: Deps,
    run_id: str,
    attempt: Attempt,
    verdicts: list[_Verdict],
    started: datetime,
    result: BatchResult,
) -> None:
    """Every terminal outcome of the batch in one transaction, then announced (after the commit)."""
    if not verdicts:
        return
    settings = deps.settings
    now = deps.clock()
    by_account = {v.loaded.account.id: v for v in verdicts}
    outcomes: dict[str, tuple[ItemStatus, str | None]] = {
        a: (ItemStatus.SUCCEEDED, None) if v.error is None else (ItemStatus.FAILED, v.error.reason.value)
        for a, v in by_account.items()
    }
    counts: dict[str, int] = {}
    notes: dict[str, list[str]] = {}
    with session_scope(settings) as session:
        bulk.keyed_only(session)
        won = bulk.claim_items(session, run_id, outcomes, now)
        reads: dict[str, Read] = {}
        for a in won:
            read = by_account[a].read
            if read is not None:
                reads[a] = read
        written = {a: r for a, r in reads.items() if r.pacc is not None}
        newer = bulk.update_accounts(session, {a: _answer(r) for a, r in written.items()})
        drafts = {a: r.drafts for a, r in written.items() if r.drafts}
        where = {
            a: (by_account[a].loaded.account.tenant_id, by_account[a].loaded.account.connection_id)
            for a in drafts
        }
        answered = {a: written[a].refreshed_at for a in drafts}
        # The snapshot's day: the run's own (a nightly run fixes it), else the day of the answer.
        days = {a: attempt.business_day or settings.business_day(answered[a]) for a in drafts}
        bulk.upsert_balances(session, where, drafts, answered, days)
        bulk.drop_unsent_types(
            session,
            {a: ([d.balance_type for d in ds], ds[0].last_updated_at) for a, ds in drafts.items()},
        )
        # The connection's state follows the newest word only, as in a single refresh: read again
        # under its lock now (another refresh may have changed it since this batch loaded it).
        conns = bulk.lock_connections(session, {by_account[a].loaded.account.connection_id for a in newer})
        for account_id in sorted(newer):
            read, conn = written[account_id], conns.get(by_account[account_id].loaded.account.connection_id)
            if conn is not None:
                conn.set_state(read.state or None, read.refreshed_at)
        stored = bulk.latest(session, list(reads))
        for account_id, read in reads.items():
            held = stored[account_id]
            # Counted as a single refresh counts its output: the types it sent, when it sent any.
            sent = {d.balance_type for d in read.drafts}
            counts[account_id] = len([t for t in held if t in sent]) if sent else len(held)
            notes[account_id] = list(read.errors) + [
                f"Powens returned {d.balance_type} data older than the stored record; kept it"
                for d in read.drafts
                if d.balance_type in held and held[d.balance_type] > d.last_updated_at
            ]
        bulk.add_attempts(
            session,
            [
                _audit_row(by_account[a], counts.get(a), notes.get(a), attempt, run_id, started, now)
                for a in won
            ],
        )
        result.emptied_tenants = bulk.count_down_tenants(session, run_id, won)
    for account_id in won:
        verdict = by_account[account_id]
        subject = Subject(verdict.loaded.account.tenant_id, account_id, SCHEDULER.name, Trigger.SCHEDULED)
        at = Attempt(attempt.number, attempt.max_attempts, verdict.loaded.item[0], run_id)
        if verdict.error is None:
            assert verdict.read is not None
            read = verdict.read
            announce_refreshed(
                subject, at, attempt.number, read.refreshed_at, counts[account_id], read.request_id
            )
            result.succeeded += 1
        else:
            announce_failed(subject, at, attempt.number, verdict.error)
            result.failed += 1
    result.skipped += len(verdicts) - len(won)


def _answer(read: Read) -> bulk.AccountAnswer:
    pacc = read.pacc
    assert pacc is not None
    return bulk.AccountAnswer(
        pacc.name, pacc.currency, pacc.balance, pacc.coming, pacc.last_update, read.refreshed_at
    )


def _audit_row(
    verdict: _Verdict,
    balance_count: int | None,
    errors: list[str] | None,
    attempt: Attempt,
    run_id: str,
    started: datetime,
    now: datetime,
) -> dict[str, Any]:
    error = verdict.error
    read = verdict.read
    return {
        "task_id": verdict.loaded.item[0],
        "run_id": run_id,
        "operation": REFRESH_OPERATION.qualified_name,
        "tenant_id": verdict.loaded.account.tenant_id,
        "account_id": verdict.loaded.account.id,
        "actor": SCHEDULER.name,
        "trigger": Trigger.SCHEDULED.value,
        "outcome": (AttemptOutcome.SUCCEEDED if error is None else AttemptOutcome.FAILED).value,
        "reason": error.reason.value if error else None,
        "message": error.message if error else None,
        "attempts": attempt.number,
        "balance_count": balance_count,
        "force_refresh": False,
        "powens_request_id": error.request_id if error else (read.request_id if read else None),
        "errors": errors or None,
        "next_attempt_at": error.next_attempt_at if error else None,
        "started_at": read.refreshed_at if read is not None else started,
        "finished_at": now,
    }
