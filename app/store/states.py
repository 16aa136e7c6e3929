"""The values the database stores in its status columns, and the moves a run may make.

Every status column has one enum here; nothing else writes a status as a bare string. The same
enums produce the CHECK constraints of the tables (``check_in``), so the database refuses what the
code never meant to write. The allowed moves of runs, tenants and items are one table each
(``RUN_MOVES``, ``TENANT_MOVES``, ``ITEM_MOVES``); ``app.store.runs`` performs every move as a
conditional UPDATE ``... WHERE status = <from>`` and refuses a move the table does not list.
See docs/design.md "Runs as a state machine".
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import TypeVar


class Trigger(StrEnum):
    """Why a refresh (or a run) happened; also the ``trigger`` label of the refresh metrics."""

    SCHEDULED = "scheduled"  # the nightly pipeline (beat)
    ON_DEMAND = "on_demand"  # an operator, from the admin shell
    WEBHOOK = "webhook"  # a Powens push (app.push)


class AccountStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"  # Powens no longer syncs it
    DELETED = "deleted"
    # Ours, not Powens': its Powens user was unlinked from the tenant (``balances powens unlink``). Out
    # of every refresh, history kept; linking the same user again makes it active again.
    UNLINKED = "unlinked"


def next_account_status(
    status: str, status_at: datetime | None, word: AccountStatus | None, at: datetime
) -> tuple[AccountStatus, datetime] | None:
    """An account's status after Powens' ``word`` about it, said at ``at`` (a read's answer, a push's
    arrival); None when it stays. A deleted account stays deleted — only an explicit account
    discovery (``balances accounts sync``), listing it again, brings it back — and a word older than
    the one that set the current status changes nothing (a replayed ``ACCOUNT_DISABLED`` cannot undo
    a later enable). An unlinked account changes only when its user is linked again: Powens' word
    about it is no longer ours to keep. Every writer of an account's status from Powens' word goes
    through here."""
    if word is None or status in (AccountStatus.DELETED, AccountStatus.UNLINKED):
        return None
    if status_at is not None and at < status_at:
        return None
    return word, at


class AttemptOutcome(StrEnum):
    """The terminal outcome an audit row records."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


class RunKind(StrEnum):
    NIGHTLY = "nightly"


class RunStatus(StrEnum):
    PENDING = "pending"  # created, waiting for its planner
    PLANNING = "planning"  # a planner claimed it
    RUNNING = "running"  # items written and published
    COMPLETED = "completed"  # every tenant summarised and forecast
    STALE = "stale"  # given up by the sweeper

    @property
    def open(self) -> bool:
        return self in (RunStatus.PENDING, RunStatus.PLANNING, RunStatus.RUNNING)


class ReportOutcome(StrEnum):
    """How a run's report delivery ended (``refresh_runs.report_outcome``; the ``outcome`` label of
    ``balances_run_reports_total``). NULL in the column: not ended yet, or no report configured."""

    SENT = "sent"  # the receiver answered 2xx
    FAILED = "failed"  # every attempt failed (connection, timeout, 5xx, 429), or no report could be built
    REFUSED = "refused"  # the receiver answered a 4xx other than 429 (or a redirect): not retried


class TenantStatus(StrEnum):
    REFRESHING = "refreshing"
    SUMMARISING = "summarising"
    FORECASTING = "forecasting"
    DONE = "done"


class ItemStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STALE = "stale"  # its refresh was lost and the sweeper gave up on it


OPEN_RUN_STATUSES = tuple(s for s in RunStatus if s.open)

RUN_MOVES: Mapping[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.PLANNING, RunStatus.STALE}),
    # A planner that died is re-planned: back to pending.
    RunStatus.PLANNING: frozenset({RunStatus.RUNNING, RunStatus.PENDING, RunStatus.STALE}),
    RunStatus.RUNNING: frozenset({RunStatus.COMPLETED, RunStatus.STALE}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.STALE: frozenset(),
}
TENANT_MOVES: Mapping[TenantStatus, frozenset[TenantStatus]] = {
    TenantStatus.REFRESHING: frozenset({TenantStatus.SUMMARISING}),
    TenantStatus.SUMMARISING: frozenset({TenantStatus.FORECASTING}),
    TenantStatus.FORECASTING: frozenset({TenantStatus.DONE}),
    TenantStatus.DONE: frozenset(),
}
ITEM_MOVES: Mapping[ItemStatus, frozenset[ItemStatus]] = {
    ItemStatus.PENDING: frozenset({ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.STALE}),
    ItemStatus.SUCCEEDED: frozenset(),
    ItemStatus.FAILED: frozenset(),
    ItemStatus.STALE: frozenset(),
}


S = TypeVar("S", bound=StrEnum)


def check_move(moves: Mapping[S, frozenset[S]], frm: S, to: S) -> None:
    if to not in moves[frm]:
        raise ValueError(f"{type(frm).__name__} cannot move from {frm.value} to {to.value}")


def check_in(column: str, values: type[StrEnum]) -> str:
    """The SQL of a CHECK constraint admitting exactly the enum's values."""
    listed = ", ".join(f"'{v.value}'" for v in values)
    return f"{column} IN ({listed})"
