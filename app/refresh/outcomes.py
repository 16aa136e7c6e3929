"""A refresh's outcome as a value: what the handler returns, how it is announced, how it is read back.

The handler returns one of four values: ``Succeeded``, ``Failed`` (terminal), ``Retry`` (a retryable
failure before the last attempt: nothing recorded) or ``Requeue`` (the rate limiter or a concurrent
refresh of the account asks to come back later: no attempt consumed). The task turns the value into
a Celery action (``app.worker.taskbase.action_for``).

Terminal outcomes are recorded by ``app.refresh.write.record`` (the one writer: one transaction for
the success's writes, the audit row and the nightly run item), then counted and announced here
(``announce_refreshed`` / ``announce_failed``): one counter increment and one telemetry event per
terminal outcome, after the commit, so at most once. The audit row is unique per task id, so a
second delivery of the same task finds the first one's outcome (``replay``) and writes nothing. The
audit table is also how the admin shell waits for an outcome (``wait_for``), so correctness never
depends on a Celery result backend. See docs/design.md "Outcomes".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from app.config import Settings
from app.contract import (
    ID_MAX_LENGTH,
    REFRESH_OPERATION,
    OpenBankingRefreshBalancesInput,
    OpenBankingRefreshBalancesOutput,
    TelemetryEvents,
)
from app.errors import Reason, RefreshError
from app.ops import metrics, telemetry
from app.refresh.records import to_record
from app.store import repo
from app.store.db import session_scope
from app.store.states import AttemptOutcome, Trigger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attempt:
    """Where this call stands in the task's retry sequence."""

    number: int = 1
    max_attempts: int = 1
    task_id: str | None = None
    run_id: str | None = None
    infra_failures: int = 0  # re-queues so far because our database or Redis was unavailable
    business_day: date | None = None  # a nightly run's own day (its snapshots are that day's)

    @property
    def final(self) -> bool:
        return self.number >= self.max_attempts


@dataclass(frozen=True)
class Subject:
    """Who asked to refresh what: the identity fields of the audit row and of the telemetry event,
    taken from the input as given (even when it does not validate)."""

    tenant_id: str | None
    account_id: str | None
    actor: str
    trigger: Trigger
    force_refresh: bool = False
    balance_types: tuple[str, ...] | None = None

    @classmethod
    def of(cls, raw_input: Any, actor: Any, trigger: Trigger) -> Subject:
        if isinstance(raw_input, OpenBankingRefreshBalancesInput):
            return cls(
                raw_input.tenant_id,
                raw_input.account_id,
                _clip(getattr(actor, "name", actor)) or "",
                trigger,
                bool(raw_input.force_refresh),
                tuple(raw_input.balance_types) if raw_input.balance_types else None,
            )
        raw = raw_input if isinstance(raw_input, dict) else {}
        types = raw.get("balanceTypes")
        return cls(
            _clip(raw.get("tenantId")),
            _clip(raw.get("accountId")),
            _clip(getattr(actor, "name", actor)) or "",
            trigger,
            bool(raw.get("forceRefresh")),
            tuple(_clip(t) or "" for t in types) if isinstance(types, list) and types else None,
        )


def _clip(value: Any) -> str | None:
    """An identity field as given, made safe to store: control characters escaped (PostgreSQL text
    cannot hold NUL, and a raw newline would forge a line in a text log), then clipped."""
    if value is None:
        return None
    text = str(value)[: ID_MAX_LENGTH * 4]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text[:ID_MAX_LENGTH]


@dataclass(frozen=True)
class Succeeded:
    output: OpenBankingRefreshBalancesOutput
    request_id: str | None = None
    replayed: bool = False  # recorded by an earlier delivery of the same task


@dataclass(frozen=True)
class Failed:
    error: RefreshError
    replayed: bool = False


@dataclass(frozen=True)
class Retry:
    """A retryable failure before the last attempt: the task schedules the next attempt."""

    error: RefreshError


@dataclass(frozen=True)
class Requeue:
    """Come back in ``seconds`` (rate limit reached, account busy, our database or Redis unavailable).
    Not a failure, not an attempt."""

    seconds: float
    why: str
    infrastructure: bool = False


Terminal = Succeeded | Failed
Outcome = Succeeded | Failed | Retry | Requeue


class RetryLater(Exception):
    """``unwrap`` of a ``Retry``: for callers that want the contract's return-or-raise shape."""

    def __init__(self, error: RefreshError) -> None:
        super().__init__(error.message)
        self.error = error


def unwrap(outcome: Outcome) -> OpenBankingRefreshBalancesOutput:
    """The contract's shape: the output, or the failure raised."""
    if isinstance(outcome, Succeeded):
        return outcome.output
    if isinstance(outcome, Failed):
        raise outcome.error
    if isinstance(outcome, Retry):
        raise RetryLater(outcome.error)
    from app.refresh.coordination import Throttled

    raise Throttled(outcome.seconds, outcome.why)


# -- announcing (after the commit of ``app.refresh.write.record``) ------------------------------------


def _context(subject: Subject, attempt: Attempt, attempts: int) -> dict[str, Any]:
    return {
        "operation": REFRESH_OPERATION.qualified_name,
        "trigger": subject.trigger.value,
        "actor": subject.actor,
        "taskId": attempt.task_id,
        "runId": attempt.run_id,
        "attempts": attempts,
    }


def announce_refreshed(
    subject: Subject,
    attempt: Attempt,
    attempts: int,
    refreshed_at: datetime,
    balance_count: int,
    request_id: str | None,
) -> None:
    metrics.REFRESHED.labels(provider=metrics.PROVIDER, trigger=subject.trigger.value).inc()
    metrics.LAST_SUCCESS.labels(provider=metrics.PROVIDER).set(refreshed_at.timestamp())
    telemetry.emit(
        TelemetryEvents.BALANCES_REFRESHED,
        {
            "tenantId": subject.tenant_id,
            "accountId": subject.account_id,
            "refreshedAt": refreshed_at,
            "balanceCount": balance_count,
        },
        powensRequestId=request_id,
        **_context(subject, attempt, attempts),
    )


def announce_failed(subject: Subject, attempt: Attempt, attempts: int, err: RefreshError) -> None:
    metrics.REFRESH_FAILED.labels(
        provider=metrics.PROVIDER, trigger=subject.trigger.value, reason=err.reason.value
    ).inc()
    telemetry.emit(
        TelemetryEvents.BALANCES_REFRESH_FAILED,
        {"tenantId": subject.tenant_id, "accountId": subject.account_id, "error": err.message},
        reason=err.reason.value,
        powensRequestId=err.request_id,
        **_context(subject, attempt, attempts),
    )


# -- reading -----------------------------------------------------------------------------------------


def replay(settings: Settings, task_id: str, balance_types: Sequence[str] | None = None) -> Terminal | None:
    """The stored terminal outcome of a task, or None when it has none yet."""
    with session_scope(settings) as session:
        row = repo.attempt_for_task(session, task_id)
        if row is None:
            return None
        if row.outcome != AttemptOutcome.SUCCEEDED:
            error = RefreshError(
                Reason(row.reason or Reason.INTERNAL),
                row.message or "failed",
                next_attempt_at=row.next_attempt_at,
            )
            return Failed(error, replayed=True)
        stored = repo.latest_balances(session, row.tenant_id or "", row.account_id)
        records = [to_record(r) for r in stored if not balance_types or r.balance_type in balance_types]
        output = OpenBankingRefreshBalancesOutput(
            balances=records, refreshed_at=row.started_at, errors=row.errors or None
        )
        return Succeeded(output, row.powens_request_id, replayed=True)


def wait_for(
    settings: Settings,
    task_id: str,
    balance_types: Sequence[str] | None,
    timeout: float,
    poll: float = 0.2,
) -> Terminal | None:
    """Poll the audit table until the task's terminal outcome is there, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        found = replay(settings, task_id, balance_types)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(poll)
