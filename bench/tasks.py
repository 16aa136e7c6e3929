"""Tasks for the benchmark's workers only (loaded with ``--include bench.tasks``, as the fault suite
loads ``tests.poison_tasks``): nothing of production imports them."""

from __future__ import annotations

from app.celery import app
from app.worker.queues import Queue


@app.task(name="balances.noop", queue=Queue.REFRESH.value)
def noop() -> None:
    """Does nothing: the benchmark's ceiling (what Celery itself costs per task, same configuration)."""
