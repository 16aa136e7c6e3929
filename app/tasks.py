"""Thin Celery tasks: they call the plain functions and own only retry scheduling and routing."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from celery import Task

from app import metrics, pipeline
from app.celery import app
from app.config import Settings, get_settings
from app.coordination import Throttled
from app.errors import RefreshError
from app.jsonio import to_plain
from app.policy import SCHEDULER
from app.refresh import Attempt, RetryLater, Trigger, refresh_balances
from app.reports import jobs

log = logging.getLogger(__name__)

QUEUE_FOR_TRIGGER = {Trigger.ON_DEMAND: "interactive", Trigger.SCHEDULED: "refresh"}


def backoff_seconds(attempt: int, settings: Settings, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with full jitter, at least Powens' Retry-After, at most the cap.

    The cap keeps every countdown under the broker's visibility timeout (checked in Settings).
    """
    ceiling = min(settings.retry_cap_seconds, settings.retry_base_seconds * (2 ** (attempt - 1)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.retry_cap_seconds)


_rng = random.SystemRandom()


@app.task(
    bind=True,
    name="balances.refresh_account",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # our own Attempt counts; BALANCES_MAX_ATTEMPTS bounds it
    ignore_result=False,
)
def refresh_account(
    self: Task,
    input: dict[str, Any],
    actor: str,
    trigger: str,
    run_id: str | None = None,
    throttled: int = 0,
) -> dict[str, Any]:
    settings = get_settings()
    attempt = Attempt(
        # Re-queues for the cluster-wide rate limit are not failed attempts.
        number=self.request.retries - throttled + 1,
        max_attempts=settings.max_attempts,
        task_id=self.request.id,
        run_id=run_id,
    )
    extra = {"tenant_id": input.get("tenantId"), "account_id": input.get("accountId"), "run_id": run_id}
    try:
        output = refresh_balances(input, actor, trigger, attempt=attempt)
    except Throttled as th:
        # Give the worker slot back and come back when the limiter has room.
        raise self.retry(
            countdown=th.wait + _rng.uniform(0, 0.5),
            kwargs={"run_id": run_id, "throttled": throttled + 1},
        ) from None
    except RetryLater as later:
        countdown = backoff_seconds(attempt.number, settings, later.error.retry_after, _rng)
        log.info(
            "refresh attempt %d/%d failed (%s); retrying in %.1fs",
            attempt.number,
            attempt.max_attempts,
            later.error.reason.value,
            countdown,
            extra={**extra, "reason": later.error.reason.value, "attempt": attempt.number},
        )
        raise self.retry(countdown=countdown) from None
    except RefreshError as err:
        log.info(
            "refresh failed: %s",
            err.message,
            extra={**extra, "reason": err.reason.value, "attempt": attempt.number},
        )
        _after_run_item(settings, run_id, input)
        return {"ok": False, **err.as_json()}
    log.info("refresh succeeded (%d balances)", len(output.balances), extra=extra)
    _after_run_item(settings, run_id, input)
    # Decimals as strings here: a result backend is JSON and must not round money through float.
    return {"ok": True, "output": _stringify(to_plain(output))}


def _after_run_item(settings: Settings, run_id: str | None, input: dict[str, Any]) -> None:
    """The last account of a tenant to finish moves it on to its summary (one winner, in the DB)."""
    if run_id is not None and isinstance(input.get("tenantId"), str):
        pipeline.claim_summary_and_enqueue(settings, run_id, input["tenantId"], enqueue_summary)


def _stringify(obj: Any) -> Any:
    from decimal import Decimal

    if isinstance(obj, Decimal):
        return format(obj, "f")
    if isinstance(obj, dict):
        return {k: _stringify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stringify(v) for v in obj]
    return obj


def dispatch_refresh(
    input: dict[str, Any],
    actor: str,
    trigger: Trigger,
    *,
    run_id: str | None = None,
    task_id: str | None = None,
) -> str:
    """Publish one refresh; returns its task id (the audit row will carry it)."""
    task_id = task_id or str(uuid.uuid4())
    refresh_account.apply_async(
        args=(input, actor, trigger.value),
        kwargs={"run_id": run_id},
        task_id=task_id,
        queue=QUEUE_FOR_TRIGGER[trigger],
    )
    return task_id


# -- the nightly pipeline ----------------------------------------------------------------------------


def publish_refreshes(run_id: str, items: Sequence[tuple[str, str, str]]) -> None:
    """A batch of scheduled refreshes over one broker connection."""

    def call(task_id: str, tenant_id: str, account_id: str) -> dict[str, Any]:
        args = ({"tenantId": tenant_id, "accountId": account_id}, SCHEDULER.name, Trigger.SCHEDULED.value)
        return {"args": args, "kwargs": {"run_id": run_id}, "task_id": task_id}

    if app.conf.task_always_eager:  # the demo without a broker: run them here
        for item in items:
            refresh_account.apply(**call(*item))
        return
    with app.producer_or_acquire() as producer:
        for item in items:
            refresh_account.apply_async(**call(*item), queue="refresh", producer=producer)


def publish_fanout(run_id: str, items: Sequence[tuple[str, str, str]]) -> None:
    """One message per batch: a worker turns it into the batch's refresh tasks, so planning 100,000
    accounts costs the planner 100 publishes and the per-task publishing runs on the workers."""
    fanout_batch.apply_async(args=(run_id, [list(i) for i in items]), queue="refresh")


@app.task(name="balances.fanout_batch", acks_late=True, reject_on_worker_lost=True)
def fanout_batch(run_id: str, items: list[list[str]]) -> int:
    publish_refreshes(run_id, [(i[0], i[1], i[2]) for i in items])
    return len(items)


def enqueue_summary(run_id: str, tenant_id: str) -> None:
    summarize_tenant.apply_async(args=(run_id, tenant_id), queue="reports")


def enqueue_forecast(run_id: str, tenant_id: str) -> None:
    forecast_tenant.apply_async(args=(run_id, tenant_id), queue="reports")


def enqueue_plan(run_id: str) -> None:
    plan_nightly_run.apply_async(args=(run_id,), queue="reports")


@app.task(name="balances.start_nightly_run", acks_late=True, reject_on_worker_lost=True)
def start_nightly_run(tick: str | None = None) -> str:
    """Beat's entry point. The tick (minute or interval slot) makes a re-sent tick the same run."""
    settings = get_settings()
    tick = tick or current_tick(settings)
    run_id, created = pipeline.start_run(settings, trigger="scheduled", actor=SCHEDULER.name, tick=tick)
    if created:
        enqueue_plan(run_id)
    else:
        log.warning(
            "nightly tick %s already started run %s (duplicate tick ignored)",
            tick,
            run_id,
            extra={"run_id": run_id},
        )
    return run_id


def current_tick(settings: Settings, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if settings.nightly_interval_seconds:
        slot = int(now.timestamp()) // settings.nightly_interval_seconds
        return f"every{settings.nightly_interval_seconds}s:{slot}"
    return "cron:" + now.strftime("%Y-%m-%dT%H:%M")


@app.task(name="balances.plan_nightly_run", acks_late=True, reject_on_worker_lost=True)
def plan_nightly_run(run_id: str) -> int:
    settings = get_settings()
    return pipeline.plan_run(settings, run_id, publish_fanout, enqueue_summary)


@app.task(name="balances.summarize_tenant", acks_late=True, reject_on_worker_lost=True)
def summarize_tenant(run_id: str, tenant_id: str) -> bool:
    settings = get_settings()
    done = jobs.summarize_tenant(settings, run_id, tenant_id)
    if done:
        enqueue_forecast(run_id, tenant_id)
    return done


@app.task(name="balances.forecast_tenant", acks_late=True, reject_on_worker_lost=True)
def forecast_tenant(run_id: str, tenant_id: str) -> bool:
    settings = get_settings()
    done = jobs.forecast_tenant(settings, run_id, tenant_id)
    finished = pipeline.finish_run_if_complete(settings, run_id)
    if finished is not None:
        metrics.NIGHTLY_LAST_SUCCESS.set(finished.timestamp())
        log.info("nightly run %s completed", run_id, extra={"run_id": run_id})
    return done


@app.task(name="balances.sweep_runs", acks_late=True, reject_on_worker_lost=True)
def sweep_runs() -> dict[str, Any]:
    settings = get_settings()
    report = pipeline.sweep(
        settings,
        publish=publish_fanout,
        enqueue_summary=enqueue_summary,
        enqueue_plan=enqueue_plan,
        enqueue_forecast=enqueue_forecast,
    )
    for finished in report.finished_at:
        metrics.NIGHTLY_LAST_SUCCESS.set(finished.timestamp())
    return {k: v for k, v in vars(report).items() if k != "finished_at"}
