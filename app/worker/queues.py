"""The service's queues and the one router that places every task on one of them.

No call site names a queue: ``celeryconfig.task_routes`` points here. On-demand refreshes go to
``interactive`` (drained first by every worker, so the nightly flood never starves an operator),
Powens pushes to ``push`` (next: a push is as fresh as data gets, and cheap to apply),
planning, reports (summaries, forecasts, the run report), the sweeper and retention to ``reports``,
scheduled refreshes and their fan-out to ``refresh``. Imports nothing heavy: ``celeryconfig`` and the beat's
exporter use it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from app.config import Settings
from app.store.states import Trigger


class Queue(StrEnum):
    """In the order a worker drains them (strict priority): an operator's refresh first, then the
    few short report and planning tasks, then the nightly flood — so planning, summaries and the
    sweeper never wait behind 100,000 refreshes."""

    INTERACTIVE = "interactive"
    PUSH = "push"
    REPORTS = "reports"
    REFRESH = "refresh"


REFRESH_TASK = "balances.refresh_account"
PUSH_TASK = "balances.apply_push"
PRUNE_TASK = "balances.prune_history"  # retention (docs/retention.md): daily, on reports
ROUTES: dict[str, Queue] = {
    PUSH_TASK: Queue.PUSH,
    "balances.fanout_batch": Queue.REFRESH,
    "balances.refresh_batch": Queue.REFRESH,
    "balances.start_nightly_run": Queue.REPORTS,
    "balances.plan_nightly_run": Queue.REPORTS,
    "balances.plan_nightly_step": Queue.REPORTS,
    "balances.summarize_tenant": Queue.REPORTS,
    "balances.forecast_tenant": Queue.REPORTS,
    "balances.sweep_runs": Queue.REPORTS,
    "balances.send_run_report": Queue.REPORTS,
    PRUNE_TASK: Queue.REPORTS,
}


class Unrouted(LookupError):
    """A task of the service the router does not place: it must be added to ``ROUTES``."""


def queue_for(name: str, args: Any = (), kwargs: Any = None, task: Any = None) -> Queue:
    """The queue of a task. A task of the service missing from ``ROUTES`` is refused (it would land
    on the default queue, ``interactive``, and compete with operators); a task brought in for
    development (the benchmark's no-op) declares its own queue."""
    if name == REFRESH_TASK:
        trigger = args[2] if args and len(args) > 2 else (kwargs or {}).get("trigger")
        return Queue.INTERACTIVE if trigger == Trigger.ON_DEMAND else Queue.REFRESH
    if name in ROUTES:
        return ROUTES[name]
    declared = getattr(task, "queue", None)
    if declared in tuple(Queue):
        return Queue(declared)
    if name.startswith("balances."):
        raise Unrouted(f"task {name} has no queue: add it to app.worker.queues.ROUTES")
    return Queue.INTERACTIVE  # Celery's own (none is used by the service)


def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any) -> dict[str, str]:
    """A Celery router (``task_routes``)."""
    return {"queue": queue_for(name, args, kwargs, task).value}


# Planning steps have their own time limits (BALANCES_PLAN_*): a step is a page of accounts, well
# inside them; every other task keeps the service's task limits (BALANCES_TASK_*).
PLAN_TASKS = ("balances.plan_nightly_run", "balances.plan_nightly_step")


def time_limits(settings: Settings) -> dict[str, dict[str, float]]:
    """Each task's soft and hard time limits (``task_annotations``): declared per task."""
    plan = {"soft_time_limit": settings.plan_soft_time_limit, "time_limit": settings.plan_time_limit}
    task = {"soft_time_limit": settings.task_soft_time_limit, "time_limit": settings.task_time_limit}
    return {name: dict(plan if name in PLAN_TASKS else task) for name in (REFRESH_TASK, *ROUTES)}
