"""Thin Celery tasks: they call the plain functions and own only retry scheduling and routing."""

from __future__ import annotations

import logging
import random
import uuid
from typing import Any

from celery import Task

from app.celery import app
from app.config import Settings, get_settings
from app.errors import RefreshError
from app.jsonio import to_plain
from app.refresh import Attempt, RetryLater, Trigger, refresh_balances

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
    self: Task, input: dict[str, Any], actor: str, trigger: str, run_id: str | None = None
) -> dict[str, Any]:
    settings = get_settings()
    attempt = Attempt(
        number=self.request.retries + 1,
        max_attempts=settings.max_attempts,
        task_id=self.request.id,
        run_id=run_id,
    )
    extra = {"tenant_id": input.get("tenantId"), "account_id": input.get("accountId"), "run_id": run_id}
    try:
        output = refresh_balances(input, actor, trigger, attempt=attempt)
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
        return {"ok": False, **err.as_json()}
    log.info("refresh succeeded (%d balances)", len(output.balances), extra=extra)
    # Decimals as strings here: a result backend is JSON and must not round money through float.
    return {"ok": True, "output": _stringify(to_plain(output))}


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
