"""The Celery glue every task shares: one base class, the retry policy, outcome → Celery action.

``BalancesTask`` gives every task the same duration and outcome metrics and a retry policy
declared as exception classes (``retry_on``), so each task states only what differs — the model is
Sentry's ``instrumented_task`` and warehouse's ``WarehouseTask``. The functions below are plain and
unit-tested without a broker: the backoff, and how a refresh outcome becomes a Celery action.
See docs/design.md "Tasks".
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry

from app.config import Settings, get_settings
from app.jsonio import to_plain
from app.retry import INFRA_ERRORS, backoff_seconds, infra_requeue_seconds, requeue_seconds
from app.worker.queues import PUSH_TASK

if TYPE_CHECKING:  # imported lazily: this module loads with the Celery app, before prometheus_client may
    from app.refresh.outcomes import Attempt, Outcome

log = logging.getLogger(__name__)
_rng = random.SystemRandom()
# What a message may carry beyond its signed name, id and arguments: Celery canvas, which the service
# never uses. A message carrying any of these is refused.
CANVAS = ("callbacks", "errbacks", "chain", "chord", "group", "group_index")
_eager = threading.local()
DENIALS_RECORDED_PER_MINUTE = 100  # beyond, a flood of forgeries is only counted and logged


def _plain(secret: Any) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def _denial_budget() -> bool:
    """Whether this denial may still be recorded: a forger must not fill the audit tables."""
    from app.refresh.coordination import get_coordinator

    try:
        minute = int(time.time() // 60)
        count = get_coordinator(get_settings()).count_delivery(f"denied:{minute}", ttl=120)
    except Exception:
        return True
    return count <= DENIALS_RECORDED_PER_MINUTE


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
    infrastructure: bool = False


def action_for(outcome: Outcome, attempt: Attempt, settings: Settings, rng: random.Random) -> Finish | Again:
    from app.refresh.outcomes import Failed, Requeue, Retry, Succeeded

    if isinstance(outcome, Succeeded):
        # Decimals as strings: a result backend is JSON and must not round money through float.
        return Finish({"ok": True, "output": _stringify(to_plain(outcome.output))})
    if isinstance(outcome, Failed):
        return Finish({"ok": False, **outcome.error.as_json()})
    if isinstance(outcome, Retry):
        countdown = backoff_seconds(attempt.number, settings, outcome.error.retry_after, rng)
        return Again(countdown, True, outcome.error.reason.value)
    assert isinstance(outcome, Requeue)
    # Give the worker slot back and come back when the limiter (or the account, or our database) has room.
    return Again(requeue_seconds(outcome.seconds, rng), False, outcome.why, outcome.infrastructure)


def _stringify(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return format(obj, "f")
    if isinstance(obj, dict):
        return {k: _stringify(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_stringify(v) for v in obj]
    return obj


class BalancesTask(Task):
    """Base of every task: duration and outcome metrics, the declared retry policy, poison messages.

    ``retry_on`` lists the exception classes that mean "try again later" for every task: by default
    our own infrastructure (database, Redis, broker) failing. The work is idempotent, so such a task is
    re-published with backoff (capped at ``BALANCES_INFRA_RETRY_CAP_SECONDS``) for as long as the
    outage lasts, never acknowledged as failed. A message redelivered ``BALANCES_MAX_DELIVERIES``
    times (its worker died each time it ran it) is a poison message: ``give_up`` ends it terminally
    instead of running it once more. A message not signed by the service is not run (``deny``).
    """

    retry_on: ClassVar[tuple[type[BaseException], ...]] = INFRA_ERRORS
    max_retries = None  # our own bounds apply: BALANCES_INFRA_MAX_REQUEUES, BALANCES_MAX_ATTEMPTS

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Imported here: prometheus_client must not load before the worker chose its directory.
        from app.ops import metrics
        from app.ops.metrics import TaskOutcome

        started = time.perf_counter()
        if not self._authentic(args, kwargs):
            # Outside the retry handling below: an error while recording the denial must never
            # re-publish the message (the worker would sign it, and a forgery would become authentic).
            metrics.TASK_OUTCOMES.labels(task=self.name, outcome=TaskOutcome.DENIED.value).inc()
            self._refuse(*args, **kwargs)
        outcome = TaskOutcome.FAILED
        try:
            deliveries = self._redeliveries()
            if deliveries >= get_settings().max_deliveries:
                outcome = TaskOutcome.GIVEN_UP
                return self.give_up(deliveries + 1, *args, **kwargs)
            result = self.run(*args, **kwargs)
            outcome = TaskOutcome.SUCCEEDED
            return result
        except CeleryRetry:
            outcome = TaskOutcome.RETRIED
            raise
        except self.retry_on as exc:
            # Our database, Redis or broker failed: not this task's fault. Never acknowledged as a
            # failure: published again with backoff, for as long as it takes.
            outcome = TaskOutcome.RETRIED
            wait = infra_requeue_seconds(self.request.retries, get_settings(), _rng)
            self.again(wait, self.infra_retry_kwargs(), exc=exc)
        finally:
            metrics.TASK_DURATION.labels(task=self.name).observe(time.perf_counter() - started)
            metrics.TASK_OUTCOMES.labels(task=self.name, outcome=outcome.value).inc()

    def infra_retry_kwargs(self) -> dict[str, Any] | None:
        """The keyword arguments of a re-publish after an infrastructure error (None: unchanged)."""
        return None

    def again(
        self, countdown: float, kwargs: dict[str, Any] | None = None, exc: BaseException | None = None
    ) -> NoReturn:
        """Publish this task again in ``countdown`` seconds. When even that publish fails (the broker is
        down), Celery would drop the message (``Reject(requeue=False)``): it goes back instead. Only a
        message the service signed is ever re-published (this worker signs what it publishes)."""
        if not self._authentic(self.request.args, self.request.kwargs):  # what a retry re-publishes
            raise Ignore()
        try:
            raise self.retry(countdown=countdown, kwargs=kwargs, exc=exc)
        except Reject as rejected:
            if rejected.requeue:
                raise
            log.warning("task %s[%s]: its retry could not be published; requeued", self.name, self.request.id)
            raise Reject(rejected.reason, requeue=True) from None

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """An eager call, in this process: it never crossed the broker, so it carries no signature.
        Known by a thread-local flag, never by the request (whose fields a message can set)."""
        depth = getattr(_eager, "depth", 0)
        _eager.depth = depth + 1
        try:
            return super().apply(*args, **kwargs)
        finally:
            _eager.depth = depth

    def _authentic(self, args: Any, kwargs: Any) -> bool:
        """Whether the message carries a valid signature of the service (app.signing) over what will
        actually run (``args``/``kwargs`` as called, not the request's copy: a message can set request
        fields), and nothing the signature does not cover. The service publishes no canvas (links,
        chains, chords, groups): a message that carries one is refused, or its callbacks would run,
        signed by this worker."""
        if getattr(_eager, "depth", 0):
            return True
        request = self.request
        if any(getattr(request, part, None) for part in CANVAS):
            return False
        from app import signing

        settings = get_settings()
        keys = signing.keys_from(_plain(settings.signing_key))
        if self.name == PUSH_TASK:  # the receiver's key is good for pushes, and for nothing else
            keys += signing.keys_from(_plain(settings.push_signing_key))
        signature = getattr(request, signing.HEADER, None)
        return signing.verify(
            keys, signature, self.name, request.id, list(args or ()), dict(kwargs or {}), request.retries or 0
        )

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        """Not run: recorded (``deny``), then ignored — acknowledged with no result, no callback, no
        retry, whatever happens while recording."""
        for part in CANVAS:
            with contextlib.suppress(AttributeError):
                setattr(self.request, part, None)
        try:
            if _denial_budget():
                self.deny(*args, **kwargs)
            else:
                log.error(
                    "task %s[%s] denied (not recorded: too many denials this minute)",
                    self.name,
                    self.request.id,
                )
        except Exception:
            log.exception("task %s[%s] denied; the denial could not be recorded", self.name, self.request.id)
        raise Ignore()

    def deny(self, *args: Any, **kwargs: Any) -> Any:
        """A message without a valid signature: not run, audited (operation = the task's name)."""
        from app.admin.manage import record_denial

        log.error("task %s[%s] denied: its message is not signed by the service", self.name, self.request.id)
        record_denial(
            get_settings(),
            None,
            self.name,
            f"message {str(self.request.id)[:64]!r} not signed by the service: not run",
        )
        return None

    def _redeliveries(self) -> int:
        """How often this message (this task id, at this retry) came back because its worker died.
        Counted only on redelivery, so the normal path costs nothing."""
        if not (self.request.delivery_info or {}).get("redelivered"):
            return 0
        from app.refresh.coordination import get_coordinator

        coord = get_coordinator(get_settings())
        return coord.count_delivery(f"{self.request.id}:{self.request.retries}", ttl=86_400)

    def give_up(self, deliveries: int, *args: Any, **kwargs: Any) -> Any:
        log.error(
            "task %s[%s] given up after %d deliveries: its worker died each time",
            self.name,
            self.request.id,
            deliveries,
        )
        return None
