"""The nightly run's refresh, a batch of whole Powens users at a time. Plain functions, no Celery.

A nightly message carries the run items of a few whole Powens users (about
``BALANCES_REFRESH_BATCH_ACCOUNTS`` accounts). Its worker reads each user's account list once,
several users at once (``BALANCES_REFRESH_BATCH_READERS`` threads: the wait is Powens', not our
CPU), judges every account exactly as a single refresh does (``app.refresh.verdict.judge``), and
records the whole batch through the one writer (``app.refresh.write.record``: one transaction of
set-based statements). Every account keeps its own outcome: its audit row (under its item's task
id), its run item, its counter increment and its telemetry event.

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
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

from sqlalchemy import select

from app.errors import Reason, RefreshError
from app.ops import metrics
from app.policy import SCHEDULER
from app.powens.client import EP_ACCOUNTS
from app.powens.models import PowensAccount, essential
from app.refresh import tokens, write
from app.refresh.coordination import Throttled
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt, Subject
from app.refresh.shared_read import register_listed
from app.refresh.tokens import UserToken
from app.refresh.verdict import Verdict, Where, deleted, judge, pushed_note, pushed_recently, unlinked
from app.retry import as_failure, backoff_seconds, is_infrastructure, say_when
from app.store import writes
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection, PowensUser, RunItem
from app.store.runs import Item
from app.store.states import AccountStatus, ItemStatus, Trigger

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

    def counts(self) -> dict[str, int]:
        """What the task reports of it."""
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "skipped": self.skipped,
            "retry": len(self.retry),
            "requeued": len(self.requeue),
            "single": len(self.single),
        }


def split_by_user(items: Sequence[Item], size: int) -> list[list[Item]]:
    """Consecutive items in parts of at most ``size`` (a user with more accounts alone is larger),
    never splitting one Powens user's items: its accounts are read together, in one call."""
    groups: list[list[Item]] = []
    for item in items:
        if groups and groups[-1][-1].powens_user_pk == item.powens_user_pk:
            groups[-1].append(item)
        else:
            groups.append([item])
    parts: list[list[Item]] = []
    for group in groups:
        if parts and len(parts[-1]) + len(group) <= size:
            parts[-1].extend(group)
        else:
            parts.append(list(group))
    return parts


def refresh_or_hand_over(
    deps: Deps, run_id: str, items: Sequence[Item], business_day: date | None, attempt_number: int = 1
) -> BatchResult:
    """``run_batch``, except that a bug inside it hands every account to the single refresh, where a
    bug is recorded account by account: acknowledged with nothing recorded, the run would wait for
    the sweeper, and a bug that repeats would never finish. Our infrastructure failing still raises
    (the task re-queues the whole batch)."""
    try:
        return run_batch(deps, run_id, items, business_day, attempt_number)
    except Exception as exc:
        if is_infrastructure(exc):
            raise
        log.exception(
            "refresh batch of %d failed with an unexpected error: handed to single refreshes", len(items)
        )
        return BatchResult(single=list(items))


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
    if result.skipped:  # recorded already: perhaps by an earlier delivery whose commit was in doubt
        present = {ld.item.account_id for ld in loaded} | {i.account_id for i in gone}
        write.announce_in_doubt(settings, [i.task_id for i in items if i.account_id not in present])
    attempt = Attempt(
        number=attempt_number, max_attempts=settings.max_attempts, run_id=run_id, business_day=business_day
    )
    started = deps.clock()
    verdicts: list[tuple[Loaded, Verdict]] = []
    to_read: dict[int, list[Loaded]] = {}
    for ld in loaded:
        if ld.account.status == AccountStatus.DELETED:
            verdicts.append((ld, Verdict.failed(started, deleted(ld.account.id))))
            continue
        if ld.account.status == AccountStatus.UNLINKED:  # unlinked since the run was planned
            verdicts.append((ld, Verdict.failed(started, unlinked(ld.account.id))))
            continue
        pushed = pushed_recently(settings, ld.account.pushed_at, ld.connection.state, started)
        if pushed is not None:
            verdicts.append((ld, Verdict(started, notes=(pushed_note(pushed),))))
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
                say_when(settings, answer, attempt.number, deps.clock())
            verdicts.extend((ld, Verdict.failed(started, answer)) for ld in group)
            continue
        raw, request_id = answer
        listed = {str(item.get("id")): item for item in raw if isinstance(item, dict)}
        if not {str(ld.account.external_id) for ld in group} >= set(listed):
            register_listed(deps, group[0].user.id, group[0].user.powens_user_id, raw)
        answered = deps.clock()
        for ld in group:
            entry = listed.get(str(ld.account.external_id))
            if entry is None:
                result.single.append(ld.item)
                continue
            verdicts.append((ld, _judge(deps, ld, entry, request_id, answered, started)))
    if retry_after:
        result.retry_in = max(retry_after)

    _record(deps, attempt, verdicts, started, result)
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
    by_account = {i.account_id: i for i in items}
    with session_scope(deps.settings) as session:
        writes.keyed_only(session)
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
    except Exception as exc:
        return as_failure(exc, "reading a Powens user's accounts")


def _judge(
    deps: Deps, ld: Loaded, entry: dict[str, Any], request_id: str | None, at: datetime, asked: datetime
) -> Verdict:
    """One account's entry of its user's list, judged as every path judges it. Parsed alone: one
    unreadable account fails alone."""
    try:
        # Only the fields a refresh reads, as the single refresh's shared read keeps them: an odd
        # field nobody reads (an over-long account number) never fails the account.
        pacc = PowensAccount.parse(essential(entry), deps.settings.powens_zone, EP_ACCOUNTS)
        where = Where(ld.account.tenant_id, ld.account.id, ld.connection.id, ld.connection.external_id)
        return judge(pacc, where, at=at, request_id=request_id, said_at=asked)
    except Exception as exc:
        return Verdict.failed(at, as_failure(exc, "judging a Powens account"))


def _record(
    deps: Deps,
    attempt: Attempt,
    verdicts: list[tuple[Loaded, Verdict]],
    started: datetime,
    result: BatchResult,
) -> None:
    """Every terminal outcome of the batch through the one write path, in one transaction."""
    if not verdicts:
        return
    entries = [
        write.Entry(
            Subject(ld.account.tenant_id, ld.account.id, SCHEDULER.name, Trigger.SCHEDULED),
            verdict,
            replace(attempt, task_id=ld.item.task_id),
            attempt.number,
            verdict.at if verdict.error is None else started,
        )
        for ld, verdict in verdicts
    ]
    applied = write.record(deps.settings, entries, deps.clock)
    result.emptied_tenants = applied.emptied_tenants
    for done in applied.recorded:
        if done.status != "recorded":
            result.skipped += 1
        elif done.error is None:
            result.succeeded += 1
        else:
            result.failed += 1
