"""The one writer of Powens' word and of terminal outcomes: a batch of entries, one transaction.

An ``Entry`` is one terminal outcome to record: who asked (``Subject``), under which task id, in which
nightly run, and what Powens said (a ``Verdict``). ``apply`` writes a batch of entries inside the
caller's transaction, in set-based statements (``app.store.writes``): the single refresh is a batch
of one, the nightly batch a few dozen accounts, a push the accounts of one event. ``record`` is
``apply`` in a transaction of its own, then counts and announces each outcome after the commit.

In the one transaction, for every entry: its account row locked, its verdict settled against it
(``app.refresh.verdict.settle``: every decision), its run item claimed (only the first terminal
outcome of an item counts: a redelivered batch claims none), then the account rows, the latest
records (those of types Powens stopped sending removed), the day's snapshot (nightly entries only:
carried from the latest record when the run did not read the account itself), the connections'
states, the audit rows (unique per task id) and the tenants' counters. A failure writes its audit
row and Powens' word (a status, a connection state), and nothing else: the previous balances stay.

The day's snapshot is the account's balance as the nightly run of that business day saw it: only a
nightly run writes it, for every account it recorded a success for, from the latest record after its
write — read tonight, or carried (marked ``carried``) when a push kept the account fresh, a concurrent
refresh had just stored it, or Powens had no newer answer. A push or an on-demand refresh updates the
latest record only, so day D holds one point in time for every account.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.contract import REFRESH_OPERATION, OpenBankingRefreshBalancesOutput
from app.errors import Reason, RefreshError
from app.refresh.coordination import get_coordinator
from app.refresh.outcomes import (
    Attempt,
    Failed,
    Subject,
    Succeeded,
    Terminal,
    announce_failed,
    announce_refreshed,
    replay,
)
from app.refresh.records import to_record
from app.refresh.verdict import Change, Verdict, older_notes, settle, shown_types, unsent
from app.retry import as_failure, is_infrastructure
from app.store import writes
from app.store.db import session_scope
from app.store.models import RefreshAttempt
from app.store.repo import BalanceDraft, record_id
from app.store.states import AttemptOutcome, ItemStatus, Trigger
from app.store.writes import Stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One terminal outcome to record."""

    subject: Subject
    verdict: Verdict
    attempt: Attempt  # its task id, run and business day, and which attempt ends here
    attempts: int  # the audit row's attempt count (0: refused before any attempt)
    started_at: datetime


Status = Literal["recorded", "replayed", "skipped", "superseded"]


@dataclass
class Recorded:
    """What became of one entry: ``recorded`` here; ``replayed`` (another delivery recorded it
    first: ``replay`` is that outcome); ``skipped`` (its run item was already finished); or
    ``superseded`` (a push with nothing to add). ``records``: the latest records its outcome shows."""

    entry: Entry
    status: Status
    error: RefreshError | None = None
    notes: list[str] = field(default_factory=list)
    records: list[Stored] = field(default_factory=list)
    replay: Terminal | None = None
    superseded: str | None = None  # why a superseded push writes nothing: "older", "deleted", "unlinked"

    def terminal(self) -> Terminal:
        """The outcome as the single refresh returns it (the contract's output)."""
        if self.replay is not None:
            return self.replay
        if self.error is not None:
            return Failed(self.error, replayed=self.status != "recorded")
        out = OpenBankingRefreshBalancesOutput(
            balances=[to_record(r) for r in self.records],
            refreshed_at=self.entry.verdict.at,
            errors=self.notes or None,
        )
        return Succeeded(out, self.entry.verdict.request_id, replayed=self.status != "recorded")


class Lost(Exception):
    """Another delivery of these task ids committed its outcome first: this transaction rolls back."""

    def __init__(self, task_ids: set[str]) -> None:
        super().__init__(f"{len(task_ids)} outcome(s) already recorded by another delivery")
        self.task_ids = task_ids


@dataclass
class Applied:
    recorded: list[Recorded]
    emptied_tenants: list[str] = field(default_factory=list)  # run counters at zero: claim summaries


def apply(
    session: Session,
    entries: Sequence[Entry],
    now: datetime,
    *,
    with_news: Callable[[Session], None] | None = None,
) -> Applied:
    """Write every entry's outcome inside the caller's transaction (see the module docstring).
    ``with_news`` writes more in the same transaction, after the accounts are locked (the lock order
    every writer keeps), when at least one entry is news (a push's connection fields). Raises
    ``Lost`` when a task id outside a run was recorded meanwhile by another delivery."""
    runs_of = {e.attempt.run_id for e in entries if e.attempt.run_id is not None}
    accounts = [e.subject.account_id for e in entries if e.subject.account_id]
    if len(runs_of) > 1 or len(accounts) != len(set(accounts)):
        raise ValueError("one write covers at most one nightly run, and one outcome per account")
    run_id = next(iter(runs_of), None)
    writes.keyed_only(session)
    held = writes.lock_accounts(session, accounts)
    out: list[Recorded] = []
    kept: list[tuple[Entry, Change]] = []
    for e in entries:
        row = held.get(e.subject.account_id or "")
        if row is not None and row.tenant_id != e.subject.tenant_id:
            row = None  # another tenant's account: never touched, never named
        change = settle(e.verdict, row, e.subject.account_id)
        if change.superseded:
            out.append(Recorded(e, "superseded", superseded=change.superseded))
        else:
            kept.append((e, change))
    if with_news is not None and kept:
        with_news(session)
    won: dict[str, str] = {}
    if run_id is not None:
        claims = {e.subject.account_id: _item_outcome(c) for e, c in kept if e.subject.account_id is not None}
        won = writes.claim_items(session, run_id, claims, now)
        out.extend(Recorded(e, "skipped") for e, _ in kept if e.subject.account_id not in won)
        kept = [(e, c) for e, c in kept if e.subject.account_id in won]

    writes.update_accounts(session, [c.account for _, c in kept if c.account is not None])
    writes.upsert_latest(session, [_latest_row(e, c, d) for e, c in kept for d in c.drafts])
    if run_id is not None and any(e.attempt.business_day is None for e, c in kept if c.error is None):
        # A nightly entry always knows its run's day; one that does not (a message from before days
        # travelled with refreshes) takes it from the run: the day was fixed when the run started.
        day = writes.run_day(session, run_id)
        kept = [(e if e.attempt.business_day else _on_day(e, day), c) for e, c in kept]
    stored = writes.latest(
        session, [e.subject.account_id for e, c in kept if c.error is None and e.subject.account_id]
    )
    # Read back under the accounts' locks, so what leaves is decided on what is there: in the usual
    # night nothing does, and no statement is sent (a set-based DELETE was 4 ms per batch).
    gone = {r.id for e, c in kept for r in unsent(c, stored.get(e.subject.account_id or "", []))}
    if gone:
        writes.delete_latest(session, sorted(gone))
        stored = {a: [r for r in rs if r.id not in gone] for a, rs in stored.items()}
    writes.upsert_snapshots(session, [row for e, c in kept for row in _snapshot_rows(e, c, stored)])
    writes.set_connection_states(
        session, {c.connection_state[0]: c.connection_state[1] for _, c in kept if c.connection_state}, now
    )
    recorded = [_outcome(e, c, stored) for e, c in kept]
    written = writes.add_attempts(session, [_audit_row(r, now) for r in recorded])
    lost = {
        e.attempt.task_id
        for e, _ in kept
        if e.attempt.task_id is not None and e.attempt.run_id is None and e.attempt.task_id not in written
    }
    if lost:
        raise Lost(lost)
    emptied = writes.count_down_tenants(session, run_id, won) if run_id is not None else []
    return Applied(out + recorded, emptied)


def _on_day(e: Entry, day: date | None) -> Entry:
    return replace(e, attempt=replace(e.attempt, business_day=day))


def _item_outcome(change: Change) -> tuple[ItemStatus, str | None]:
    if change.error is None:
        return ItemStatus.SUCCEEDED, None
    return ItemStatus.FAILED, change.error.reason.value


def _latest_row(e: Entry, change: Change, d: BalanceDraft) -> dict[str, Any]:
    account_id = e.subject.account_id
    assert account_id is not None
    return {
        "id": record_id(account_id, d.balance_type),
        "account_id": account_id,
        "tenant_id": e.subject.tenant_id,
        "connection_id": change.connection_id,
        "balance_type": d.balance_type,
        "current_balance": d.current_balance,
        "available_balance": d.available_balance,
        "currency": d.currency,
        "last_updated_at": d.last_updated_at,
        "refreshed_at": e.verdict.at,
        "created_at": e.verdict.at,
        "metadata": d.metadata,
    }


def _snapshot_rows(e: Entry, change: Change, stored: dict[str, list[Stored]]) -> list[dict[str, Any]]:
    """A nightly success's snapshot of its business day: its latest records after the write, marked
    ``carried`` where tonight's answer did not write them."""
    day = e.attempt.business_day
    if change.error is not None or day is None or not e.subject.account_id:
        return []
    read = {d.balance_type: d.last_updated_at for d in change.drafts}
    return [
        writes.snapshot_row(r, day, carried=read.get(r.balance_type) != r.last_updated_at)
        for r in stored[e.subject.account_id]
    ]


def _outcome(e: Entry, change: Change, stored: dict[str, list[Stored]]) -> Recorded:
    if change.error is not None:
        return Recorded(e, "recorded", change.error)
    types = shown_types(e.verdict)
    shown = [r for r in stored.get(e.subject.account_id or "", []) if not types or r.balance_type in types]
    notes = list(e.verdict.notes) + older_notes(
        change.drafts, {r.balance_type: r.last_updated_at for r in shown}
    )
    return Recorded(e, "recorded", None, notes, shown)


def _audit_row(done: Recorded, now: datetime) -> dict[str, Any]:
    e, error = done.entry, done.error
    return {
        "task_id": e.attempt.task_id,
        "run_id": e.attempt.run_id,
        "operation": REFRESH_OPERATION.qualified_name,
        "tenant_id": e.subject.tenant_id,
        "account_id": e.subject.account_id,
        "actor": e.subject.actor,
        "trigger": e.subject.trigger.value,
        "outcome": (AttemptOutcome.SUCCEEDED if error is None else AttemptOutcome.FAILED).value,
        "reason": error.reason.value if error else None,
        "message": error.message if error else None,
        "attempts": e.attempts,
        "balance_count": len(done.records) if error is None else None,
        "force_refresh": e.subject.force_refresh,
        "powens_request_id": error.request_id if error else e.verdict.request_id,
        "errors": done.notes or None,
        "next_attempt_at": error.next_attempt_at if error else None,
        "started_at": e.started_at,
        "finished_at": now,
    }


def record(
    settings: Settings,
    entries: Sequence[Entry],
    clock: Callable[[], datetime],
    *,
    with_news: Callable[[Session], None] | None = None,
) -> Applied:
    """``apply`` in a transaction of its own, then one counter increment and one telemetry event per
    recorded outcome (after the commit: at most once; a crash in between loses the event, never
    duplicates it). Entries another delivery recorded first come back ``replayed``, with that
    delivery's outcome."""
    pending = list(entries)
    replayed: list[Recorded] = []
    bug: RefreshError | None = None
    while True:
        now = clock()
        written = False
        try:
            with session_scope(settings) as session:
                applied = apply(session, pending, now, with_news=None if bug else with_news)
                written = True
            break
        except Lost as lost:
            # Settled in a new transaction without them: each lost id was recorded by its winner.
            replayed.extend(_replayed(settings, e) for e in pending if e.attempt.task_id in lost.task_ids)
            pending = [e for e in pending if e.attempt.task_id not in lost.task_ids]
        except Exception as exc:
            if written and is_infrastructure(exc):
                _note_in_doubt(settings, pending, now)
            if bug is not None:
                raise  # even the failures cannot be recorded: the task fails loudly
            # A bug in writing (our infrastructure failing is raised on: the caller re-queues): each
            # outcome is recorded as that failure instead, so nothing waits for a sweeper.
            bug = as_failure(exc, "recording refresh outcomes")
            pending = [replace(e, verdict=Verdict.failed(e.verdict.at, bug)) for e in pending]
    for done in applied.recorded:
        if done.status == "recorded":
            _announce(done)
    applied.recorded.extend(replayed)
    return applied


# -- a commit in doubt ---------------------------------------------------------------------------------
# The connection lost during COMMIT: the outcomes may be stored, or not, and this delivery cannot know
# (the database is unreachable). It re-queues, as for any infrastructure failure, after noting each
# task id with the ``finished_at`` its commit would have written. The delivery that finds those
# outcomes already recorded (a batch's skipped items, a single refresh's replay) announces the ones
# this commit did store: otherwise they would be stored, never counted, never in telemetry.
IN_DOUBT_TTL = 86_400


def _note_in_doubt(settings: Settings, entries: Sequence[Entry], at: datetime) -> None:
    finished = {e.attempt.task_id: at.isoformat() for e in entries if e.attempt.task_id}
    try:
        get_coordinator(settings).note_in_doubt(finished, IN_DOUBT_TTL)
    except Exception as exc:  # Redis down too: the events may be lost (never duplicated)
        log.warning("a commit in doubt could not be noted (%s)", type(exc).__name__)


def announce_in_doubt(settings: Settings, task_ids: Sequence[str]) -> int:
    """Announce the outcomes among ``task_ids`` that a commit in doubt did store, at most once (a
    note is removed before its outcome is announced, by one taker). Called only where outcomes were
    found already recorded; best effort: a failure here leaves the notes for the next delivery."""
    if not task_ids:
        return 0
    try:
        coord = get_coordinator(settings)
        noted = coord.peek_in_doubt(list(task_ids))
        if not noted:
            return 0
        with session_scope(settings) as session:
            rows = session.scalars(
                select(RefreshAttempt).where(RefreshAttempt.task_id.in_(list(noted)))
            ).all()
        stored = [r for r in rows if r.task_id and r.finished_at == datetime.fromisoformat(noted[r.task_id])]
        mine = coord.take_in_doubt(list(noted))  # the others were recorded by another delivery
    except Exception as exc:
        log.warning("outcomes in doubt not resolved (%s): left for the next delivery", type(exc).__name__)
        return 0
    n = 0
    for row in stored:
        if row.task_id not in mine:
            continue
        subject = Subject(row.tenant_id, row.account_id, row.actor, Trigger(row.trigger), row.force_refresh)
        attempt = Attempt(task_id=row.task_id, run_id=row.run_id)
        if row.outcome == AttemptOutcome.SUCCEEDED:
            announce_refreshed(
                subject, attempt, row.attempts, row.started_at, row.balance_count or 0, row.powens_request_id
            )
        else:
            reason = Reason(row.reason or Reason.INTERNAL)
            error = RefreshError(reason, row.message or "failed", request_id=row.powens_request_id)
            announce_failed(subject, attempt, row.attempts, error)
        n += 1
    if n:
        log.warning("announced %d outcome(s) whose commit was in doubt and did happen", n)
    return n


def _announce(done: Recorded) -> None:
    e = done.entry
    if done.error is not None:
        announce_failed(e.subject, e.attempt, e.attempts, done.error)
    else:
        announce_refreshed(
            e.subject, e.attempt, e.attempts, e.verdict.at, len(done.records), e.verdict.request_id
        )


def _replayed(settings: Settings, e: Entry) -> Recorded:
    found = replay(settings, e.attempt.task_id or "", e.subject.balance_types)
    return Recorded(e, "replayed", found.error if isinstance(found, Failed) else None, replay=found)
