"""Thin Celery tasks: each calls plain functions and turns what they return into a Celery action.

Every task has the same base (``app.worker.taskbase.BalancesTask``: metrics, declared retry policy); queues
come from the one router (``app.worker.queues``), never from a call site.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from app.celery import app
from app.config import Settings, get_settings
from app.contract import OpenBankingRefreshBalancesInput
from app.nightly import batch, pipeline
from app.ops import metrics
from app.policy import SCHEDULER
from app.push.apply import apply
from app.refresh.deps import Deps
from app.refresh.handler import deny_refresh, execute, give_up_refresh
from app.refresh.outcomes import Attempt
from app.reports import jobs, notify
from app.retry import requeue_seconds
from app.store import retention, runs
from app.store.states import Trigger
from app.worker import liveness
from app.worker.queues import PRUNE_TASK, PUSH_TASK, REFRESH_TASK, ROUTES, Queue
from app.worker.taskbase import Again, BalancesTask, Finish, action_for

log = logging.getLogger(__name__)
_rng = random.SystemRandom()  # retry jitter


class RefreshTask(BalancesTask):
    def deny(self, *args: Any, **kwargs: Any) -> Any:
        """A forged refresh (not signed by the service): denied, audited and counted, no Powens call.
        Recorded without its claimed task id, so a forger cannot pre-empt a real task's outcome."""
        input, actor, trigger = [*args, None, None, None][:3]
        outcome = deny_refresh(get_settings(), self.request.id, input, actor, trigger)
        log.error("refresh denied: %s", outcome.error.message)
        return {"ok": False, **outcome.error.as_json()}

    def give_up(self, deliveries: int, *args: Any, **kwargs: Any) -> Any:
        """A refresh whose worker died every time it ran it ends as a recorded failure."""
        why = f"given up after {deliveries} deliveries: the worker running it died each time"
        return self.end_failed(why, *args, **kwargs)

    def end_failed(self, why: str, *args: Any, **kwargs: Any) -> Any:
        input, actor, trigger = args[:3]
        run_id = kwargs.get("run_id")
        settings = get_settings()
        outcome = give_up_refresh(settings, self.request.id, run_id, input, actor, trigger, why)
        _after_terminal(settings, run_id, input)
        action = action_for(outcome, Attempt(), settings, _rng)
        assert isinstance(action, Finish)  # a recorded outcome is terminal
        return action.result

    def infra_retry_kwargs(self) -> dict[str, Any]:
        """An infrastructure error outside the handler re-queues without using up an attempt."""
        kwargs = dict(self.request.kwargs or {})
        return {**kwargs, **RetryState.of(kwargs).requeued(infrastructure=True).kwargs()}


@dataclass(frozen=True)
class RetryState:
    """Where a refresh message stands in its retries: one value, carried as three keyword arguments
    (the message format does not change). ``requeues``: re-publishes that were not attempts (the rate
    limiter, a busy account, our infrastructure), ``infra`` of them for our infrastructure;
    ``first_attempt``: the attempt a refresh batch handed the account over at."""

    requeues: int = 0
    infra: int = 0
    first_attempt: int = 1

    @classmethod
    def of(cls, kwargs: dict[str, Any]) -> RetryState:
        return cls(
            int(kwargs.get("throttled", 0)), int(kwargs.get("infra", 0)), int(kwargs.get("first_attempt", 1))
        )

    def attempt_number(self, retries: int) -> int:
        """Celery counts every re-publish as a retry; only the attempts count here."""
        return self.first_attempt + retries - self.requeues

    def requeued(self, *, infrastructure: bool) -> RetryState:
        return replace(self, requeues=self.requeues + 1, infra=self.infra + int(infrastructure))

    def kwargs(self) -> dict[str, Any]:
        """As the message carries it (``first_attempt`` only when a batch handed it over)."""
        out: dict[str, Any] = {"throttled": self.requeues, "infra": self.infra}
        if self.first_attempt != 1:
            out["first_attempt"] = self.first_attempt
        return out


@app.task(bind=True, base=RefreshTask, name=REFRESH_TASK, max_retries=None, ignore_result=False)
def refresh_account(
    self: RefreshTask,
    input: dict[str, Any],
    actor: str,
    trigger: str,
    run_id: str | None = None,
    throttled: int = 0,
    infra: int = 0,
    day: str | None = None,
    first_attempt: int = 1,
) -> dict[str, Any]:
    """One refresh attempt. BALANCES_MAX_ATTEMPTS bounds the attempts; re-queues are not attempts
    (``throttled``, ``infra`` and ``first_attempt`` are a ``RetryState``). A nightly refresh carries its
    run's business ``day``: its snapshot is that day's. One handed over by a refresh batch carries the
    batch's attempt (``first_attempt``): it goes on from there."""
    settings = get_settings()
    state = RetryState(throttled, infra, first_attempt)
    attempt = Attempt(
        number=state.attempt_number(self.request.retries),
        max_attempts=settings.max_attempts,
        task_id=self.request.id,
        run_id=run_id,
        infra_failures=state.infra,
        business_day=date.fromisoformat(day) if day else None,
    )
    extra = {"tenant_id": input.get("tenantId"), "account_id": input.get("accountId"), "run_id": run_id}
    action = action_for(execute(input, actor, trigger, attempt=attempt), attempt, settings, _rng)
    if isinstance(action, Again):
        if action.infrastructure and state.infra >= settings.infra_max_requeues:
            log.error("refresh ends: infrastructure unavailable for too long", extra=extra)
            why = f"infrastructure unavailable for {state.infra} re-queues ({action.reason})"
            return self.end_failed(why, input, actor, trigger, run_id=run_id)  # re-queued if it cannot
        if action.counts_attempt:
            log.info(
                "refresh attempt %d/%d failed (%s); retrying in %.1fs",
                attempt.number,
                attempt.max_attempts,
                action.reason,
                action.countdown,
                extra={**extra, "reason": action.reason, "attempt": attempt.number},
            )
        after = state if action.counts_attempt else state.requeued(infrastructure=action.infrastructure)
        self.again(action.countdown, {"run_id": run_id, **after.kwargs(), "day": day})
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


def publish_refreshes(run_id: str, items: Sequence[runs.Item], *, attempt: int = 1) -> None:
    """Scheduled refreshes one account each (the single path: an account its user's list lacked, or
    a batch given up), over one broker connection, each carrying its run's day and the attempt the
    batch was at (the single refresh goes on from there: BALANCES_MAX_ATTEMPTS still bounds it)."""
    day = runs.business_day_of(get_settings(), run_id)
    kwargs: dict[str, Any] = {"run_id": run_id, "day": day.isoformat() if day else None}
    if attempt != 1:
        kwargs["first_attempt"] = attempt
    with app.producer_or_acquire() as producer:
        for task_id, tenant_id, account_id, *_ in items:
            refresh_account.apply_async(
                args=(
                    {"tenantId": tenant_id, "accountId": account_id},
                    SCHEDULER.name,
                    Trigger.SCHEDULED.value,
                ),
                kwargs=kwargs,
                task_id=task_id,
                producer=producer,
            )


def publish_batches(
    run_id: str, items: Sequence[runs.Item], *, attempt: int = 1, countdown: float | None = None
) -> int:
    """The items as refresh batches of whole Powens users, about BALANCES_REFRESH_BATCH_ACCOUNTS each
    (items come grouped by user). Returns the number of messages."""
    settings = get_settings()
    day = runs.business_day_of(settings, run_id)
    batches = batch.split_by_user(items, settings.refresh_batch_accounts)
    with app.producer_or_acquire() as producer:
        for part in batches:
            refresh_batch.apply_async(
                args=(run_id, [list(i) for i in part]),
                kwargs={"day": day.isoformat() if day else None, "attempt": attempt},
                countdown=countdown,
                producer=producer,
                # Celery would build a repr of the 50 items for its logs: half the cost of a publish.
                argsrepr=f"({run_id!r}, <{len(part)} accounts>)",
            )
    return len(batches)


def publish_fanout(run_id: str, items: Sequence[runs.Item]) -> None:
    """One message per page: a worker turns it into the page's refresh batches, so planning 100,000
    accounts costs the planner 100 publishes and the per-batch publishing runs on the workers."""
    fanout_batch.apply_async(args=(run_id, [list(i) for i in items]))


@app.task(name="balances.fanout_batch")
def fanout_batch(run_id: str, items: list[list[Any]]) -> int:
    return publish_batches(run_id, [runs.Item.of(i) for i in items])


class BatchTask(BalancesTask):
    def give_up(self, deliveries: int, *args: Any, **kwargs: Any) -> Any:
        """A batch whose worker died every time: each account goes on alone, as a single refresh
        (with its own poison handling), so one bad account cannot hold its batch back."""
        run_id, items = args[0], [runs.Item.of(i) for i in args[1]]
        log.error(
            "refresh batch of %d given up after %d deliveries: handed to single refreshes",
            len(items),
            deliveries,
        )
        publish_refreshes(run_id, items, attempt=int(kwargs.get("attempt", 1)))
        return None


@app.task(bind=True, base=BatchTask, name="balances.refresh_batch", max_retries=None)
def refresh_batch(
    self: BatchTask, run_id: str, items: list[list[Any]], day: str | None = None, attempt: int = 1
) -> dict[str, int]:
    """One attempt at a batch of a nightly run's items (``app.nightly.batch``). Our infrastructure
    failing re-queues the whole message (the base class): whatever it recorded is skipped then."""
    settings = get_settings()
    parsed = [runs.Item.of(i) for i in items]
    result = batch.refresh_or_hand_over(
        Deps.default(settings), run_id, parsed, date.fromisoformat(day) if day else None, attempt
    )
    tenants = set(result.emptied_tenants)
    if result.skipped:
        # A redelivery: the first delivery may have died between its commit and its claims.
        tenants |= {item.tenant_id for item in parsed}
    for tenant_id in sorted(tenants):
        pipeline.claim_summary_and_enqueue(settings, run_id, tenant_id, enqueue_summary)
    if result.retry:
        publish_batches(run_id, result.retry, attempt=attempt + 1, countdown=result.retry_in)
    if result.requeue:
        publish_batches(
            run_id, result.requeue, attempt=attempt, countdown=requeue_seconds(result.requeue_in, _rng)
        )
    if result.single:
        publish_refreshes(run_id, result.single, attempt=attempt)
    return result.counts()


def refresh_queue_depth() -> int:
    """Messages waiting in the ``refresh`` queue (every priority level); 0 when the broker does not
    know the queue (a Redis restarted empty)."""
    with app.connection_for_write() as conn:
        try:
            declared = conn.default_channel.queue_declare(queue=Queue.REFRESH.value, passive=True)
        except conn.channel_errors:
            return 0
        return int(declared.message_count)


def enqueue_summary(run_id: str, tenant_id: str) -> None:
    summarize_tenant.apply_async(args=(run_id, tenant_id))


def enqueue_forecast(run_id: str, tenant_id: str) -> None:
    forecast_tenant.apply_async(args=(run_id, tenant_id))


def enqueue_plan(run_id: str) -> None:
    plan_nightly_run.apply_async(args=(run_id,))


@app.task(name="balances.start_nightly_run")
def start_nightly_run(fired_at: str | None = None) -> str:
    """Beat's entry point. The run is keyed by the schedule slot the beat fired (``fired_at``, its own
    clock), so a redelivered tick, a late worker or a second beat firing the same slot is the same run,
    and the run's business day is the slot's."""
    settings = get_settings()
    tick, day = pipeline.schedule_slot(settings, datetime.fromisoformat(fired_at) if fired_at else None)
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
def plan_nightly_run(run_id: str) -> bool:
    """Claim the run for planning and send its first step (a re-planned run resumes)."""
    return pipeline.begin_planning(get_settings(), run_id, enqueue_plan_step)


@app.task(name="balances.plan_nightly_step")
def plan_nightly_step(run_id: str, after: list[Any] | None, generation: int) -> bool:
    """One step of planning: a page of accounts written as items and published as refresh batches,
    under the planning time limits (BALANCES_PLAN_*), bounded whatever the number of accounts."""
    return pipeline.plan_step(
        get_settings(),
        run_id,
        pipeline.Step((str(after[0]), int(after[1]), str(after[2])) if after else None, int(generation)),
        publish=publish_page,
        enqueue_step=enqueue_plan_step,
        enqueue_summary=enqueue_summary,
        queued=refresh_queue_depth,
    )


def publish_page(run_id: str, items: Sequence[runs.Item]) -> None:
    """A planned page as refresh batches, straight from the planner: a page is a few dozen messages."""
    publish_batches(run_id, items)


def enqueue_plan_step(run_id: str, step: pipeline.Step, countdown: float | None) -> None:
    plan_nightly_step.apply_async(
        args=(run_id, list(step.after) if step.after else None, step.generation), countdown=countdown
    )


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
        enqueue_report(run_id)
    return done


def enqueue_report(run_id: str) -> None:
    """A finished run's report, sent after the run's last move and never in its way: when even the
    publish fails, it is logged and the sweeper sends the report later."""
    if get_settings().notify_url is None:
        return
    try:
        send_run_report.apply_async(args=(run_id,))
    except Exception as exc:
        log.warning(
            "run report of %s not queued (%s): the sweeper sends it later",
            run_id,
            type(exc).__name__,
            extra={"run_id": run_id},
        )


@app.task(bind=True, name="balances.send_run_report")
def send_run_report(self: BalancesTask, run_id: str) -> str | None:
    """One attempt of a finished run's report (``app.reports.notify.deliver``); a retry is this task
    again, so the same holder of the report."""
    step = notify.deliver(get_settings(), run_id, self.request.id, _rng)
    if isinstance(step, notify.Again):
        self.again(step.countdown)
    return step.outcome.value if step.outcome is not None else None


@app.task(name="balances.sweep_runs")
def sweep_runs() -> dict[str, Any]:
    with app.connection_for_write() as conn:
        lost = liveness.broker_lost_messages(conn)
    if lost:
        log.warning("the broker's Redis restarted (its messages may be lost): open runs re-driven now")
    report = pipeline.sweep(
        get_settings(),
        publish=publish_fanout,
        enqueue_summary=enqueue_summary,
        enqueue_plan=enqueue_plan,
        enqueue_forecast=enqueue_forecast,
        queued=refresh_queue_depth,
        lost_messages=lost,
        enqueue_report=enqueue_report if get_settings().notify_url is not None else None,
    )

    for finished in report.finished_at:
        metrics.NIGHTLY_LAST_SUCCESS.set(finished.timestamp())
    return {k: v for k, v in vars(report).items() if k != "finished_at"}


@app.task(name=PUSH_TASK)
def apply_push(payload: str, received_at: str) -> dict[str, int]:
    """A Powens push the receiver verified and queued (app.push.receiver): applied to the store.
    Idempotent per account, so a redelivery (or Powens sending it twice) writes nothing twice."""
    applied = apply(Deps.default(), payload, datetime.fromisoformat(received_at))
    return dict(Counter(a.outcome.value for a in applied))


# -- retention (docs/retention.md) -------------------------------------------------------------------
RESUME_SECONDS = 5.0


@app.task(name=PRUNE_TASK)
def prune_history() -> dict[str, Any]:
    """One bounded invocation of the retention policy (``app.store.retention.prune``). Rows left and no
    run open: the next invocation is queued at once, so a backlog drains in steps that each give the
    worker back to the queue's other tasks; a run open: tomorrow's goes on."""
    report = retention.prune(get_settings())
    if report.resume:
        prune_history.apply_async(countdown=RESUME_SECONDS)
    return report.as_json()


metrics.preinitialise_tasks([REFRESH_TASK, *ROUTES])
