"""When to try again, and what an exception means for that: every backoff formula of the service.

- A failure of the work that may pass (Powens unavailable, rate-limited, a bug that may not repeat)
  is retried with exponential backoff and full jitter (``backoff_seconds``): a uniform draw under
  ``base · 2^(n-1)``, never shorter than Powens' ``Retry-After``, and never longer than the cap.
  Full jitter spreads the retries of many tasks that failed together, so they do not come back as
  a thundering herd; the cap keeps every countdown under the broker's visibility timeout (checked
  in Settings).
- A failure of our own infrastructure — the database, Redis, the broker (``INFRA_ERRORS``) — says
  nothing about the account: the task is re-queued (``infra_requeue_seconds``, doubling up to
  ``BALANCES_INFRA_RETRY_CAP_SECONDS``) and the attempt does not count; it is never classified
  ``internal``. Integrity and data errors are not in the list: they are about the data.
- Any other exception inside the work is a bug: classified ``internal`` once, here (``as_failure``),
  logged with its traceback, and retried like any failure that may pass.
- A rate-limited failure says when trying again is allowed (``say_when``). A ``Retry-After`` header
  (Powens', a run report's receiver's) is read once here (``retry_after_seconds``) and bounded on the
  way in (``MAX_RETRY_AFTER``): "1e400" or a date in the year 9999 must not crash a worker.
"""

from __future__ import annotations

import logging
import math
import random
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

from app.config import Settings
from app.errors import Reason, RefreshError
from app.jsonio import rfc3339

log = logging.getLogger(__name__)

# A Retry-After beyond a day is not a wait anyone plans around: it is read as a day.
MAX_RETRY_AFTER = 86_400.0

INFRA_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,  # connection refused/reset, server restarting, SQLite busy
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,  # no connection free in the pool in time
    # PostgreSQL's class 25 and XX: a read-only replica after a failover, an idle transaction killed.
    sqlalchemy.exc.InternalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after a failover
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: it clears as consumers catch up
    kombu.exceptions.OperationalError,  # the broker
    ConnectionError,  # the OS said so (refused, reset, aborted)
)


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRA_ERRORS)


def as_failure(exc: Exception, doing: str) -> RefreshError:
    """What an exception raised while ``doing`` the work comes to: a classified failure stays what
    it is; our infrastructure failing is raised on (the caller re-queues); anything else is a bug,
    ``internal``, logged here once with its traceback."""
    if isinstance(exc, RefreshError):
        return exc
    if is_infrastructure(exc):
        raise exc
    log.error("%s failed with an unexpected error", doing, exc_info=exc)
    return RefreshError(Reason.INTERNAL, f"internal error ({type(exc).__name__})")


def bounded_retry_after(seconds: float | None) -> float | None:
    """Powens' Retry-After in seconds, within [0, MAX_RETRY_AFTER] (None: not given, or not a number)."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> float | None:
    """Parse a Retry-After header (delta-seconds or HTTP date), bounded: whatever the header says,
    the wait is a number of seconds between 0 and a day (None: absent or unreadable)."""
    if not value:
        return None
    value = value.strip()
    try:
        return bounded_retry_after(float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return bounded_retry_after((when - (now or datetime.now(UTC))).total_seconds())


def _ceiling(attempt: int, base: float, cap: float) -> float:
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 s is past any cap: no float overflow
    return min(cap, base * 2.0**exponent)


def _full_jitter(
    attempt: int, base: float, cap: float, retry_after: float | None, rng: random.Random
) -> float:
    delay = rng.uniform(0, _ceiling(attempt, base, cap))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def ceiling_seconds(attempt: int, settings: Settings) -> float:
    """The longest backoff after attempt ``attempt`` (1-based): ``base · 2^(n-1)``, capped."""
    return _ceiling(attempt, settings.retry_base_seconds, settings.retry_cap_seconds)


def backoff_seconds(attempt: int, settings: Settings, retry_after: float | None, rng: random.Random) -> float:
    """How long to wait after failed attempt ``attempt``: full jitter, at least Retry-After, capped."""
    return _full_jitter(attempt, settings.retry_base_seconds, settings.retry_cap_seconds, retry_after, rng)


def notify_backoff_seconds(
    attempt: int, settings: Settings, retry_after: float | None, rng: random.Random
) -> float:
    """The same formula for a run report's delivery (``app.reports.notify``), with its own base and
    cap (BALANCES_NOTIFY_RETRY_*): a webhook receiver is not Powens, and waits longer."""
    return _full_jitter(
        attempt, settings.notify_retry_base_seconds, settings.notify_retry_cap_seconds, retry_after, rng
    )


def infra_requeue_seconds(failures: int, settings: Settings, rng: random.Random) -> float:
    """How long to wait before trying again after ``failures`` re-queues for our infrastructure
    (database, Redis, broker): half-jittered, doubling up to BALANCES_INFRA_RETRY_CAP_SECONDS."""
    ceiling = min(settings.infra_retry_cap_seconds, 2.0 ** min(failures + 1, 62))
    return rng.uniform(ceiling / 2, ceiling)


def requeue_seconds(wait: float, rng: random.Random) -> float:
    """A re-queue (the rate limiter, a busy account) after ``wait``, half a second of jitter added so
    that tasks held back together do not come back together."""
    return wait + rng.uniform(0, 0.5)


def say_when(settings: Settings, error: RefreshError, attempt: int, now: datetime) -> None:
    """A rate-limited failure says when trying again is allowed: Powens' Retry-After when it sent
    one, else what our next backoff step would have waited (at most MAX_RETRY_AFTER either way)."""
    wait = bounded_retry_after(error.retry_after)
    if wait is None:
        wait = ceiling_seconds(attempt + 1, settings)
    error.next_attempt_at = (now + timedelta(seconds=min(wait, MAX_RETRY_AFTER))).replace(microsecond=0)
    error.message += f"; next attempt allowed at {rfc3339(error.next_attempt_at)}"
