"""Prometheus objects (fixed names: docs/design.md "Observability"). Export: ``app.ops.exporter``.

No tenant or account id ever goes into a label: cardinality stays bounded by the taxonomy.
Label sets known in advance are created at import with value 0, so ``rate()`` sees the first failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram

from app.errors import Reason
from app.store.states import ReportOutcome, Trigger

PROVIDER = "powens"


class TaskOutcome(StrEnum):
    """The ``outcome`` label of ``balances_task_executions_total``."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    GIVEN_UP = "given_up"  # a poison message: redelivered too often, ended without running
    DENIED = "denied"  # its message was not signed by the service: not run


class PushOutcome(StrEnum):
    """The ``outcome`` label of ``powens_webhooks_received_total``. The receiver counts requests (the
    first seven); the worker counts each account a queued event carries (the rest)."""

    QUEUED = "queued"  # verified and durably on the broker: answered 202
    REJECTED_SIGNATURE = "rejected_signature"  # 401
    REJECTED_STALE = "rejected_stale"  # 401: authentic but dated outside the window (a replay)
    REJECTED_SIZE = "rejected_size"  # 413
    INVALID_PAYLOAD = "invalid_payload"  # 400 at the receiver; an unreadable account at the worker
    UNKNOWN_EVENT = "unknown_event"  # 202, ignored
    UNAVAILABLE = "unavailable"  # 503: the broker could not take it (Powens retries)
    STORED = "stored"  # balances written through the refresh's write path
    REGISTERED = "registered"  # an account Powens found, registered from the push, and its balances stored
    DELETED = "deleted"  # the account is deleted (CONNECTION_DELETED, or Powens said so): nothing written
    DUPLICATE = "duplicate"  # this account at this last_update and state was already applied
    OUT_OF_ORDER = "out_of_order"  # older than what is stored: nothing written
    NEEDS_USER = "needs_user"  # the connection needs its user: recorded as a refresh would
    FAILED = "failed"  # recorded as a failed refresh (e.g. the account is deleted at Powens)
    STATUS_UPDATED = "status_updated"  # ACCOUNT_DISABLED/ENABLED, CONNECTION_DELETED
    UNKNOWN_USER = "unknown_user"  # a Powens user no tenant has linked
    UNKNOWN_ACCOUNT = "unknown_account"  # a connection we have not registered (a status event)


class HistoryTable(StrEnum):
    """The ``table`` label of ``balances_retention_deleted_rows_total``: the tables retention prunes
    (``app.store.retention``, docs/retention.md)."""

    RUN_ITEMS = "run_items"
    RUN_TENANTS = "run_tenants"
    TENANT_SUMMARIES = "tenant_summaries"
    CASHFLOW_FORECASTS = "cashflow_forecasts"
    REFRESH_ATTEMPTS = "refresh_attempts"


PUSH_EVENTS = (
    "CONNECTION_SYNCED",
    "ACCOUNT_SYNCED",
    "ACCOUNT_DISABLED",
    "ACCOUNT_ENABLED",
    "CONNECTION_DELETED",
    "unknown",
)

REFRESHED = Counter(
    "openbanking_balances_refreshed",
    "Balance refreshes that succeeded (terminal outcome, after retries).",
    ["provider", "trigger"],
)
REFRESH_FAILED = Counter(
    "openbanking_balances_refresh_failed",
    "Balance refreshes that failed (terminal outcome, after retries), by reason.",
    ["provider", "trigger", "reason"],
)
RETRIES = Counter(
    "openbanking_balance_refresh_retries",
    "Refresh attempts that failed with a retryable reason and were scheduled again.",
    ["provider", "reason"],
)
DURATION = Histogram(
    "openbanking_balance_refresh_duration_seconds",
    "Wall time of one refresh attempt, from validation to commit.",
    ["provider", "trigger"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
LAST_SUCCESS = Gauge(
    "openbanking_balances_last_success_timestamp_seconds",
    "Unix time of the last successful refresh.",
    ["provider"],
    multiprocess_mode="max",
)
NIGHTLY_LAST_SUCCESS = Gauge(
    "openbanking_nightly_run_last_success_timestamp_seconds",
    "Unix time at which the last nightly run finished with every tenant summarised.",
    multiprocess_mode="max",
)
POWENS_HTTP_REQUESTS = Counter(
    "powens_http_requests",
    "HTTP calls to Powens by route template and status (timeout/error when no answer came).",
    ["endpoint", "status"],
)
POWENS_HTTP_DURATION = Histogram(
    "powens_http_request_duration_seconds",
    "Latency of HTTP calls to Powens by route template.",
    ["endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30),
)
TASK_DURATION = Histogram(
    "balances_task_duration_seconds",
    "Wall time of one execution of a Celery task, by task name.",
    ["task"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
)
TASK_OUTCOMES = Counter(
    "balances_task_executions",
    "Executions of Celery tasks by task name and outcome (succeeded, failed, retried, given_up, denied).",
    ["task", "outcome"],
)

DB_STATEMENTS = Counter(
    "balances_db_statements",
    "SQL statements sent to the database by this process (an executemany counts once per row).",
)
MESSAGES_RECLAIMED = Counter(
    "balances_messages_reclaimed",
    "Messages a dead worker held, put back on their queue by a live worker (app.worker.liveness).",
)

WEBHOOKS = Counter(
    "powens_webhooks_received",
    "Powens webhooks by event and outcome: requests at the receiver, accounts at the worker.",
    ["event", "outcome"],
)
WEBHOOK_DURATION = Histogram(
    "powens_webhook_receive_duration_seconds",
    "Time from a webhook request's arrival to its answer, broker write included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
WEBHOOK_ENQUEUE = Histogram(
    "powens_webhook_enqueue_duration_seconds",
    "Time the receiver spent putting a verified event on the broker.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

RUN_REPORTS = Counter(
    "balances_run_reports",
    "Nightly run reports delivered by the notification hook (BALANCES_NOTIFY_URL), by how their "
    "delivery ended: sent (2xx), failed (every attempt failed), refused (a 4xx other than 429).",
    ["outcome"],
)
RETENTION_DELETED = Counter(
    "balances_retention_deleted_rows",
    "Rows the retention task deleted from the history tables, by table (docs/retention.md).",
    ["table"],
)


def preinitialise_tasks(names: Iterable[str]) -> None:
    for name in names:
        TASK_DURATION.labels(task=name)
        for outcome in TaskOutcome:
            TASK_OUTCOMES.labels(task=name, outcome=outcome.value)


def _preinitialise() -> None:
    for trigger in (t.value for t in Trigger):
        REFRESHED.labels(provider=PROVIDER, trigger=trigger)
        DURATION.labels(provider=PROVIDER, trigger=trigger)
        for reason in Reason:
            REFRESH_FAILED.labels(provider=PROVIDER, trigger=trigger, reason=reason.value)
    for reason in Reason:
        if reason.retryable:
            RETRIES.labels(provider=PROVIDER, reason=reason.value)
    for report in ReportOutcome:
        RUN_REPORTS.labels(outcome=report.value)
    for table in HistoryTable:
        RETENTION_DELETED.labels(table=table.value)
    for event in PUSH_EVENTS:
        for push in (PushOutcome.QUEUED, PushOutcome.STORED, PushOutcome.REJECTED_SIGNATURE):
            WEBHOOKS.labels(event=event, outcome=push.value)


_preinitialise()
