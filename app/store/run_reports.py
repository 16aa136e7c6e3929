"""The run report's delivery state, on the run's own row: one delivery sequence per finished run.

A report is delivered by one task at a time. Each attempt starts with one conditional UPDATE
(``claim_attempt``) that succeeds only while the run is finished, its report has not ended, and no
other task holds it: the finishing code may run twice (a redelivered task, the sweeper), and the two
messages it sends make one sequence, never two. The holder keeps a lease (``report_lease_until``)
that each attempt and each scheduled retry extends; a holder whose lease ran out (its message was
lost with a Redis that restarted empty) is released by the sweeper (``claim_resends``), which sends
another message: whichever of the two claims it first holds it, the other finds it held. How the
sequence ended is recorded once (``finish``), by the holder only. Every function is one transaction.
See docs/design.md "The run report".
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, and_, or_, update

from app.config import Settings
from app.store.db import rowcount, session_scope
from app.store.models import RefreshRun
from app.store.states import ReportOutcome, RunStatus

FINISHED = (RunStatus.COMPLETED, RunStatus.STALE)


def _open(run_id: str) -> list[ColumnElement[bool]]:
    """The run is finished and its report has not ended."""
    return [
        RefreshRun.id == run_id,
        RefreshRun.status.in_(FINISHED),
        RefreshRun.report_outcome.is_(None),
    ]


def claim_attempt(settings: Settings, run_id: str, owner: str, lease_until: datetime) -> int | None:
    """Start the next attempt of the run's report as ``owner`` (a task id): its number (1 for the
    first), or None when the report is not this task's to send — the run is not finished, its report
    ended, or another task holds it."""
    with session_scope(settings) as session:
        return session.scalar(
            update(RefreshRun)
            .where(
                *_open(run_id),
                or_(RefreshRun.report_owner.is_(None), RefreshRun.report_owner == owner),
            )
            .values(
                report_owner=owner,
                report_attempts=RefreshRun.report_attempts + 1,
                report_lease_until=lease_until,
            )
            .returning(RefreshRun.report_attempts)
        )


def extend(settings: Settings, run_id: str, owner: str, lease_until: datetime) -> bool:
    """Keep the report for ``owner`` until ``lease_until`` (its retry is due before then). False when
    it is no longer this task's (the sweeper handed it over)."""
    with session_scope(settings) as session:
        return bool(
            rowcount(
                session.execute(
                    update(RefreshRun)
                    .where(*_open(run_id), RefreshRun.report_owner == owner)
                    .values(report_lease_until=lease_until)
                )
            )
        )


def finish(settings: Settings, run_id: str, owner: str, outcome: ReportOutcome, at: datetime) -> bool:
    """Record how the delivery ended. True for the one holder that records it (it counts the outcome)."""
    with session_scope(settings) as session:
        return bool(
            rowcount(
                session.execute(
                    update(RefreshRun)
                    .where(*_open(run_id), RefreshRun.report_owner == owner)
                    .values(report_outcome=outcome, report_finished_at=at, report_lease_until=None)
                )
            )
        )


def claim_resends(
    settings: Settings,
    now: datetime,
    *,
    finished_since: datetime,
    unclaimed_before: datetime,
    max_resends: int,
    lease_until: datetime,
) -> list[str]:
    """Finished runs whose report message was lost, each claimed for one more send (counted, at most
    ``max_resends``): runs finished since ``finished_since`` whose report has not ended and that either
    no task claimed although they finished before ``unclaimed_before``, or whose holder's lease ran out
    (a holder's lease outlasts its attempt and its retry's countdown, so a live holder is never
    replaced). Each is released (the next message to arrive claims it) and given ``lease_until`` to do
    so, so the next sweep does not send it again meanwhile."""
    with session_scope(settings) as session:
        return list(
            session.scalars(
                update(RefreshRun)
                .where(
                    RefreshRun.status.in_(FINISHED),
                    RefreshRun.report_outcome.is_(None),
                    RefreshRun.finished_at >= finished_since,
                    RefreshRun.report_resends < max_resends,
                    or_(
                        and_(
                            RefreshRun.report_lease_until.is_(None),
                            RefreshRun.finished_at < unclaimed_before,
                        ),
                        RefreshRun.report_lease_until < now,
                    ),
                )
                .values(
                    report_owner=None,
                    report_lease_until=lease_until,
                    report_resends=RefreshRun.report_resends + 1,
                )
                .returning(RefreshRun.id)
            )
        )
