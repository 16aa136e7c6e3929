"""Thin Celery tasks: each calls plain functions and turns what they return into a Celery action.

Every task has the same base (``app.taskbase.BalancesTask``: metrics, declared retry policy); queues
come from the one router (``app.queues``), never from a call site.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Task

from app import metrics, pipeline
from app.celery import app
from app.config import Settings, get_settings
from app.contract import OpenBankingRefreshBalancesInput
from app.outcomes import Attempt
from app.policy import SCHEDULER
from app.queues import REFRESH_TASK, ROUTES
from app.refresh import execute, give_up_refresh
from app.reports import jobs
from app.store import runs
from app.store.states import Trigger
from app.taskbase import Again, BalancesTask, Finish, action_for

log = logging.getLogger(__name__)
_rng = random.SystemRandom()  # retry jitter


class RefreshTask(BalancesTask):
    def give_up(self, deliveries: int, *args: Any, **kwargs: Any) -> Any:
        """A refresh whose worker died every time it ran it ends as a recorded failure."""
        input, actor, trigger = args[:3]
        run_id = kwargs.get("run_id")
        outcome = give_up_refresh(get_settings(), self.request.id, run_id, input, actor, trigger, deliveries)
        _after_terminal(get_settings(), run_id, input)
        action = action_for(outcome, Attempt(), get_settings(), _rng)
        assert isinstance(action, Finish)  # a recorded outcome is terminal
        return action.result


@app.task(bind=True, base=RefreshTask, name=REFRESH_TASK, max_retries=None, ignore_result=False)
def refresh_account(
    self: Task,
    input: dict[str, Any],
    actor: str,
    trigger: str,
    run_id: str | None = None,
    throttled: int = 0,
    infra: int = 0,
) -> dict[str, Any]:
    """One refresh attempt. BALANCES_MAX_ATTEMPTS bounds the attempts; re-queues (``throttled``: the
    rate limiter, a busy account, or our own infrastructure — ``infra`` of them) are not attempts."""
    settings = get_settings()
    attempt = Attempt(
        number=self.request.retries - throttled + 1,
        max_attempts=settings.max_attempts,
        task_id=self.request.id,
        run_id=run_id,
        infra_failures=infra,
    )
    extra = {"tenant_id": input.get("tenantId"), "account_id": input.get("accountId"), "run_id": run_id}
    action = action_for(execute(input, actor, trigger, attempt=attempt), attempt, settings, _rng)
    if isinstance(action, Again):
        if action.infrastructure and infra >= settings.infra_max_requeues:
            log.critical("refresh dropped: infrastructure unavailable for too long", extra=extra)
            return {"ok": False, "error": {"reason": "internal", "message": action.reason}}
        if action.counts_attempt:
            log.info(
                "refresh attempt %d/%d failed (%s); retrying in %.1fs",
                attempt.number,
                attempt.max_attempts,
                action.reason,
                action.countdown,
                extra={**extra, "reason": action.reason, "attempt": attempt.number},
            )
        raise self.retry(
            countdown=action.countdown,
            kwargs={
                "run_id": run_id,
                "throttled": throttled + (0 if action.counts_attempt else 1),
                "infra": infra + int(action.infrastructure),
            },
        )
    result = action.result
    if result["ok"]:
        log.info("refresh succeeded (%d balances)", len(result["output"]["balances"]), extra=extra)
    else:
        log.info(
            "refresh failed: %s",
            result["error"]["message"],
            extra={**extra, "reason": result["error"]["reason"], "attempt": attempt.number},
        )
    _after_terminal(settings, run_id, input)
    return result


def _after_terminal(settings: Settings, run_id: str | None, input: Any) -> None:
    """The last refresh of a tenant to finish moves it on to its summary (one winner, in the DB)."""
    if run_id is not None and isinstance(input, dict) and isinstance(input.get("tenantId"), str):
        pipeline.claim_summary_and_enqueue(settings, run_id, input["tenantId"], enqueue_summary)


def dispatch_refresh(
    inp: OpenBankingRefreshBalancesInput, actor: str, trigger: Trigger, *, task_id: str | None = None
) -> str:
    """Publish one refresh carrying the input's JSON; returns its task id (the audit row will carry it)."""
    task_id = task_id or str(uuid.uuid4())
    wire = inp.model_dump(mode="json", exclude_none=True)
    refresh_account.apply_async(args=(wire, actor, Trigger(trigger).value), task_id=task_id)
    return task_id


# -- the nightly pipeline ----------------------------------------------------------------------------


def publish_refreshes(run_id: str, items: Sequence[runs.Item]) -> None:
    """A batch of scheduled refreshes over one broker connection."""
    with app.producer_or_acquire() as producer:
        for task_id, tenant_id, account_id in items:
            refresh_account.apply_async(
                args=(
                    {"tenantId": tenant_id, "accountId": account_id},
                    SCHEDULER.name,
                    Trigger.SCHEDULED.value,
                ),
                kwargs={"run_id": run_id},
                task_id=task_id,
                producer=producer,
            )


def publish_fanout(run_id: str, items: Sequence[runs.Item]) -> None:
    """One message per batch: a worker turns it into the batch's refresh tasks, so planning 100,000
    accounts costs the planner 100 publishes and the per-task publishing runs on the workers."""
    fanout_batch.apply_async(args=(run_id, [list(i) for i in items]))


@app.task(name="balances.fanout_batch")
def fanout_batch(run_id: str, items: list[list[str]]) -> int:
    publish_refreshes(run_id, [(i[0], i[1], i[2]) for i in items])
    return len(items)


def enqueue_summary(run_id: str, tenant_id: str) -> None:
    summarize_tenant.apply_async(args=(run_id, tenant_id))


def enqueue_forecast(run_id: str, tenant_id: str) -> None:
    forecast_tenant.apply_async(args=(run_id, tenant_id))


def enqueue_plan(run_id: str) -> None:
    plan_nightly_run.apply_async(args=(run_id,))


@app.task(name="balances.start_nightly_run")
def start_nightly_run() -> str:
    """Beat's entry point. The run is keyed by its schedule slot, so a redelivered tick or a second beat
    firing the same slot is the same run, and the run's business day is the slot's."""
    settings = get_settings()
    tick, day = pipeline.schedule_slot(settings)
    run_id, created = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor=SCHEDULER.name, tick=tick, business_day=day
    )
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


@app.task(name="balances.plan_nightly_run")
def plan_nightly_run(run_id: str) -> int:
    return pipeline.plan_run(get_settings(), run_id, publish_fanout, enqueue_summary)


@app.task(name="balances.summarize_tenant")
def summarize_tenant(run_id: str, tenant_id: str) -> bool:
    done = jobs.summarize_tenant(get_settings(), run_id, tenant_id)
    if done:
        enqueue_forecast(run_id, tenant_id)
    return done


@app.task(name="balances.forecast_tenant")
def forecast_tenant(run_id: str, tenant_id: str) -> bool:
    settings = get_settings()
    done = jobs.forecast_tenant(settings, run_id, tenant_id)
    finished = runs.finish_if_complete(settings, run_id)
    if finished is not None:
        metrics.NIGHTLY_LAST_SUCCESS.set(finished.timestamp())
        log.info("nightly run %s completed", run_id, extra={"run_id": run_id})
    return done


@app.task(name="balances.sweep_runs")
def sweep_runs() -> dict[str, Any]:
    report = pipeline.sweep(
        get_settings(),
        publish=publish_fanout,
        enqueue_summary=enqueue_summary,
        enqueue_plan=enqueue_plan,
        enqueue_forecast=enqueue_forecast,
    )
    for finished in report.finished_at:
        metrics.NIGHTLY_LAST_SUCCESS.set(finished.timestamp())
    return {k: v for k, v in vars(report).items() if k != "finished_at"}


metrics.preinitialise_tasks([REFRESH_TASK, *ROUTES])
