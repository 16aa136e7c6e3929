"""The Celery glue every task shares: one base class, the retry policy, outcome → Celery action.

``BalancesTask`` gives every task the same duration and outcome metrics and a retry policy
declared as exception classes (``retry_on``), so each task states only what differs — the model is
Sentry's ``instrumented_task`` and warehouse's ``WarehouseTask``. The functions below are plain and
unit-tested without a broker: the backoff, and how a refresh outcome becomes a Celery action.
See docs/design.md "Tasks".
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Task
from celery.exceptions import Retry as CeleryRetry

from app.config import Settings, get_settings
from app.jsonio import to_plain

if TYPE_CHECKING:  # imported lazily: this module loads with the Celery app, before prometheus_client may
    from app.outcomes import Attempt, Outcome

_rng = random.SystemRandom()


def backoff_seconds(attempt: int, settings: Settings, retry_after: float | None, rng: random.Random) -> float:
    """Exponential backoff with full jitter, at least Powens' Retry-After, at most the cap.

    The cap keeps every countdown under the broker's visibility timeout (checked in Settings).
    """
    ceiling = min(settings.retry_cap_seconds, settings.retry_base_seconds * (2 ** (attempt - 1)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.retry_cap_seconds)


@dataclass(frozen=True)
class Finish:
    """The task ends with this result (a terminal outcome)."""

    result: dict[str, Any]


@dataclass(frozen=True)
class Again:
    """The task is published again in ``countdown`` seconds; a re-queue consumes no attempt."""

    countdown: float
    counts_attempt: bool
    reason: str


def action_for(outcome: Outcome, attempt: Attempt, settings: Settings, rng: random.Random) -> Finish | Again:
    from app.outcomes import Failed, Requeue, Retry, Succeeded

    if isinstance(outcome, Succeeded):
        # Decimals as strings: a result backend is JSON and must not round money through float.
        return Finish({"ok": True, "output": _stringify(to_plain(outcome.output))})
    if isinstance(outcome, Failed):
        return Finish({"ok": False, **outcome.error.as_json()})
    if isinstance(outcome, Retry):
        countdown = backoff_seconds(attempt.number, settings, outcome.error.retry_after, rng)
        return Again(countdown, True, outcome.error.reason.value)
    assert isinstance(outcome, Requeue)
    # Give the worker slot back and come back when the limiter (or the account) has room.
    return Again(outcome.seconds + rng.uniform(0, 0.5), False, outcome.why)


def _stringify(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return format(obj, "f")
    if isinstance(obj, dict):
        return {k: _stringify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stringify(v) for v in obj]
    return obj


class BalancesTask(Task):
    """Base of every task: duration and outcome metrics, and the declared retry policy.

    ``retry_on`` lists the exception classes that mean "try again later" for this task (the work is
    idempotent); they are retried with the same backoff as a refresh, up to ``max_attempts``.
    """

    retry_on: ClassVar[tuple[type[BaseException], ...]] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Imported here: prometheus_client must not load before the worker chose its directory.
        from app import metrics
        from app.metrics import TaskOutcome

        started = time.perf_counter()
        outcome = TaskOutcome.FAILED
        try:
            result = self.run(*args, **kwargs)
            outcome = TaskOutcome.SUCCEEDED
            return result
        except CeleryRetry:
            outcome = TaskOutcome.RETRIED
            raise
        except self.retry_on as exc:
            settings = get_settings()
            if self.request.retries + 1 >= settings.max_attempts:
                raise
            outcome = TaskOutcome.RETRIED
            countdown = backoff_seconds(self.request.retries + 1, settings, None, _rng)
            raise self.retry(exc=exc, countdown=countdown) from None
        finally:
            metrics.TASK_DURATION.labels(task=self.name).observe(time.perf_counter() - started)
            metrics.TASK_OUTCOMES.labels(task=self.name, outcome=outcome.value).inc()
