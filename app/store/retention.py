"""Retention: how long the history tables keep their rows, and the batched deletes that apply it.

Every nightly run adds a row per account to ``run_items`` and to ``refresh_attempts`` (10 M a night
each at the README's scale), a row per tenant to ``run_tenants`` and ``tenant_summaries``, and per
tenant and currency to ``cashflow_forecasts``. Nothing else removes them. The policy (docs/retention.md):

- items and tenants of a finished run (completed or stale): BALANCES_KEEP_RUN_ITEMS_DAYS after it ended;
- the machine's audit rows (``refresh_attempts`` of a scheduled refresh or a push):
  BALANCES_KEEP_ATTEMPTS_DAYS after they were written. An operator's (``on_demand``) are kept, as
  ``audit_events`` are;
- summaries and forecasts of a finished run: BALANCES_KEEP_REPORTS_DAYS after it ended.
- never a row of an open run (pending, planning, running), whatever its age; the run rows themselves,
  snapshots (partitioned by month: ``app.store.partitions``), audit events and latest records stay.

How, so that it never holds up the hot path: each batch is its own short transaction (a lock wait
of 2 s at most, then the invocation stops and the next one resumes) that deletes at most
BALANCES_PRUNE_BATCH_SIZE rows found by an index — a run's rows by their primary key (or unique key)
from the run's id, the audit rows by ``(finished_at, id)`` (migration 0012) — walking a keyset, so a
batch never reads again what earlier ones deleted. An invocation stops after BALANCES_PRUNE_MAX_ROWS
rows or half the task's soft time limit, whichever comes first, and says whether rows are left
(``Pruned.more``); the task then goes on in a new invocation, unless a run is open (it then resumes
with the next day's). What nobody touches any more is what goes: the rows of runs finished weeks ago.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, text, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.ops.metrics import RETENTION_DELETED, HistoryTable
from app.store import partitions
from app.store.db import rowcount, session_scope
from app.store.models import CashflowForecast, RefreshAttempt, RefreshRun, RunItem, RunTenant, TenantSummary
from app.store.states import OPEN_RUN_STATUSES, RunStatus, Trigger
from app.store.writes import keyed_only

log = logging.getLogger(__name__)

FINISHED = tuple(s for s in RunStatus if not s.open)
Key = tuple[Any, ...]


@dataclass(frozen=True)
class ByRun:
    """A table whose rows belong to a run: deleted run by run, along a unique key led by ``run_id``
    (``keys``: the rest of it), once the run ended more than its window ago."""

    table: HistoryTable
    model: Any
    keys: tuple[str, ...]
    reports: bool  # BALANCES_KEEP_REPORTS_DAYS; else BALANCES_KEEP_RUN_ITEMS_DAYS


BY_RUN = (
    ByRun(
        HistoryTable.RUN_ITEMS, RunItem.__table__, ("account_id",), reports=False
    ),  # pk (run_id, account_id)
    ByRun(
        HistoryTable.RUN_TENANTS, RunTenant.__table__, ("tenant_id",), reports=False
    ),  # pk (run_id, tenant_id)
    ByRun(HistoryTable.TENANT_SUMMARIES, TenantSummary.__table__, ("tenant_id",), reports=True),
    ByRun(
        HistoryTable.CASHFLOW_FORECASTS, CashflowForecast.__table__, ("tenant_id", "currency"), reports=True
    ),
)
_ATTEMPTS: Any = RefreshAttempt.__table__


@dataclass(frozen=True)
class Policy:
    """What one invocation deletes: rows older than these instants, in batches, within bounds."""

    items_before: datetime
    attempts_before: datetime
    reports_before: datetime
    batch: int
    max_rows: int
    seconds: float

    @classmethod
    def of(cls, settings: Settings, now: datetime) -> Policy:
        return cls(
            items_before=now - timedelta(days=settings.keep_run_items_days),
            attempts_before=now - timedelta(days=settings.keep_attempts_days),
            reports_before=now - timedelta(days=settings.keep_reports_days),
            batch=settings.prune_batch_size,
            max_rows=settings.prune_max_rows,
            # Well inside the soft time limit: the invocation ends on its own, between two batches.
            seconds=settings.task_soft_time_limit / 2,
        )


@dataclass
class Pruned:
    """One invocation: rows deleted (or, in a dry run, that would be) per table, batches (each its own
    transaction), whether it stopped on a bound with rows left (``more``) and whether to go on now
    (``resume``: not while a run is open), partitions created (or to be), a maintenance failure."""

    dry_run: bool = False
    deleted: dict[str, int] = field(default_factory=lambda: {t.value: 0 for t in HistoryTable})
    batches: int = 0
    more: bool = False
    resume: bool = False
    stopped: str | None = None  # "rows" or "time": the bound it stopped on
    partitions: list[str] = field(default_factory=list)
    partition_error: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "deleted": dict(self.deleted),
            "total": sum(self.deleted.values()),
            "batches": self.batches,
            "more": self.more,
            "resume": self.resume,
            "stopped": self.stopped,
            "partitionsCreated": list(self.partitions),
            "partitionError": self.partition_error,
            "seconds": round(self.seconds, 3),
        }


class _Budget:
    def __init__(self, policy: Policy, clock: Callable[[], float]) -> None:
        self.policy, self.clock, self.start, self.rows = policy, clock, clock(), 0

    def exhausted(self) -> str | None:
        if self.rows >= self.policy.max_rows:
            return "rows"
        if self.clock() - self.start >= self.policy.seconds:
            return "time"
        return None

    def size(self) -> int:
        return min(self.policy.batch, self.policy.max_rows - self.rows)


def prune(
    settings: Settings,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    clock: Callable[[], float] = time.monotonic,
) -> Pruned:
    """One invocation of the retention policy: the snapshots' partitions made ahead, then the history
    tables pruned in batches until nothing is left or a bound is reached (module docstring)."""
    now = now or datetime.now(UTC)
    policy = Policy.of(settings, now)
    report = Pruned(dry_run=dry_run)
    started = clock()
    try:
        made = partitions.ensure(settings, settings.business_day(now), dry_run=dry_run)
        report.partitions = [c.name for c in made]
    except SQLAlchemyError as exc:  # a lock not granted in time: the DEFAULT partition holds the rows
        report.partition_error = type(getattr(exc, "orig", exc)).__name__
        log.warning("snapshot partitions not made ahead (%s): tried again next time", report.partition_error)
    if dry_run:
        report.deleted = prunable(settings, policy)
    else:
        _apply(settings, policy, report, _Budget(policy, clock))
        report.resume = report.more and not open_runs(settings)
    report.seconds = clock() - started
    _log(report)
    return report


def _apply(settings: Settings, policy: Policy, report: Pruned, budget: _Budget) -> None:
    for spec in BY_RUN:
        for run_id in runs_with_rows(settings, spec, _window(policy, spec)):
            after: Key | None = None
            while True:
                if _stop(report, budget):
                    return
                with session_scope(settings) as session:
                    _short(session)
                    n, after = delete_run_batch(session, spec, run_id, after, budget.size())
                _count(report, budget, spec.table, n)
                if after is None:
                    break
    running = open_runs(settings)
    last: Key | None = None
    while not _stop(report, budget):
        with session_scope(settings) as session:
            _short(session)
            n, last = delete_attempts_batch(session, policy.attempts_before, running, last, budget.size())
        _count(report, budget, HistoryTable.REFRESH_ATTEMPTS, n)
        if last is None:
            return


def _stop(report: Pruned, budget: _Budget) -> bool:
    reason = budget.exhausted()
    if reason is not None:
        report.more, report.stopped = True, reason
    return reason is not None


def _count(report: Pruned, budget: _Budget, table: HistoryTable, n: int) -> None:
    report.batches += 1
    report.deleted[table.value] += n
    budget.rows += n
    RETENTION_DELETED.labels(table=table.value).inc(n)


def _window(policy: Policy, spec: ByRun) -> datetime:
    return policy.reports_before if spec.reports else policy.items_before


def _short(session: Session) -> None:
    """A batch waits 2 s at most for a lock (then the invocation stops, the next one resumes), and finds
    its rows by an index, whatever the planner's statistics say (``writes.keyed_only``)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL lock_timeout = '2s'"))
        session.execute(text("SET LOCAL statement_timeout = '60s'"))
    keyed_only(session)


def open_runs(settings: Settings) -> list[str]:
    with session_scope(settings) as session:
        return list(session.scalars(select(RefreshRun.id).where(RefreshRun.status.in_(OPEN_RUN_STATUSES))))


def runs_with_rows(settings: Settings, spec: ByRun, before: datetime) -> list[str]:
    """The finished runs that ended before ``before`` and still have rows in ``spec``'s table, oldest
    first (one row a night in refresh_runs; the EXISTS is one probe of the table's key per run)."""
    r = RefreshRun
    with session_scope(settings) as session:
        return list(
            session.scalars(
                select(r.id)
                .where(
                    r.status.in_(FINISHED),
                    func.coalesce(r.finished_at, r.created_at) < before,
                    exists().where(spec.model.c.run_id == r.id),
                )
                .order_by(r.created_at, r.id)
            )
        )


def _key(cols: Sequence[Any]) -> Any:
    return cols[0] if len(cols) == 1 else tuple_(*cols)


def _value(key: Key) -> Any:
    return key[0] if len(key) == 1 else key


def delete_run_batch(
    session: Session, spec: ByRun, run_id: str, after: Key | None, size: int
) -> tuple[int, Key | None]:
    """Delete up to ``size`` of the run's rows after ``after`` in key order: (rows deleted, the last
    key deleted, or None when none of the run's rows is left after it). One range of the key's
    index; nothing is deleted unless the run is finished (checked in the same statement)."""
    t = spec.model
    cols = [t.c[k] for k in spec.keys]
    key = _key(cols)
    where = [t.c.run_id == run_id]
    if after is not None:
        where.append(key > _value(after))
    upto = session.execute(select(*cols).where(*where).order_by(*cols).offset(size - 1).limit(1)).first()
    if upto is not None:
        where.append(key <= _value(tuple(upto)))
    finished = exists().where(RefreshRun.id == run_id, RefreshRun.status.in_(FINISHED))
    n = rowcount(session.execute(delete(t).where(*where, finished)))
    return n, (tuple(upto) if upto is not None and n else None)


def _attempts_where(before: datetime, running: Sequence[str]) -> list[Any]:
    a = _ATTEMPTS
    where = [a.c.finished_at < before, a.c.trigger != Trigger.ON_DEMAND.value]
    if running:  # a run open for longer than the window (it never is): its audit rows stay too
        where.append(or_(a.c.run_id.is_(None), a.c.run_id.not_in(list(running))))
    return where


def delete_attempts_batch(
    session: Session, before: datetime, running: Sequence[str], after: Key | None, size: int
) -> tuple[int, Key | None]:
    """Delete up to ``size`` of the machine's audit rows finished before ``before``, oldest first after
    ``after`` along ``(finished_at, id)``: (rows deleted, the last key, or None when none is left)."""
    a = _ATTEMPTS
    key = tuple_(a.c.finished_at, a.c.id)
    where = _attempts_where(before, running)
    if after is not None:
        where.append(key > after)
    upto = session.execute(
        select(a.c.finished_at, a.c.id)
        .where(*where)
        .order_by(a.c.finished_at, a.c.id)
        .offset(size - 1)
        .limit(1)
    ).first()
    if upto is not None:
        where.append(key <= tuple(upto))
    n = rowcount(session.execute(delete(a).where(*where)))
    return n, (tuple(upto) if upto is not None and n else None)


def prunable(settings: Settings, policy: Policy) -> dict[str, int]:
    """What an invocation without bounds would delete, per table (a dry run: counted by the same
    indexes, nothing deleted)."""
    counts = {t.value: 0 for t in HistoryTable}
    for spec in BY_RUN:
        for run_id in runs_with_rows(settings, spec, _window(policy, spec)):
            with session_scope(settings) as session:
                keyed_only(session)
                t = spec.model
                counts[spec.table.value] += int(
                    session.scalar(select(func.count()).select_from(t).where(t.c.run_id == run_id)) or 0
                )
    running = open_runs(settings)
    with session_scope(settings) as session:
        keyed_only(session)
        where = _attempts_where(policy.attempts_before, running)
        counts[HistoryTable.REFRESH_ATTEMPTS.value] = int(
            session.scalar(select(func.count()).select_from(_ATTEMPTS).where(*where)) or 0
        )
    return counts


def _log(report: Pruned) -> None:
    done = ", ".join(f"{n} {t}" for t, n in report.deleted.items() if n) or "nothing"
    verb = "would delete" if report.dry_run else "deleted"
    tail = ""
    if report.more:
        tail = f"; stopped on its {report.stopped} bound, " + (
            "going on now" if report.resume else "resuming next time (a run is open)"
        )
    made = f"; partitions made: {', '.join(report.partitions)}" if report.partitions else ""
    log.info(
        "retention %s %s in %d batches, %.1fs%s%s", verb, done, report.batches, report.seconds, made, tail
    )
