"""Delivering a finished run's report (``app.reports.run_report``) to BALANCES_NOTIFY_URL: one signed
POST per attempt, retried, one delivery sequence per run.

- **Signed**: ``X-Balances-Timestamp`` (unix seconds, fresh at each attempt) and
  ``X-Balances-Signature: sha256=<hex HMAC-SHA256(BALANCES_NOTIFY_SECRET, timestamp + "." + body)>``,
  so a receiver can tell our report from a forgery and refuse an old one replayed.
- **Never the run's problem**: the run is finished (its row says so) before any of this runs; the task
  that calls ``deliver`` is sent after the run's last move, and whatever happens here is counted
  (``balances_run_reports_total{outcome}``) and logged, nothing more.
- **Retried** on what may pass — a connection error, a timeout, a 5xx, a 429 — with full-jitter
  backoff (``app.retry.notify_backoff_seconds``; ``Retry-After`` is a floor), at most
  BALANCES_NOTIFY_MAX_ATTEMPTS attempts; a 4xx other than 429, or a redirect, is the receiver's
  answer and is not retried (``refused``). Redirects are not followed: the signature and the report go
  to the configured URL only.
- **One sequence per run**: each attempt claims the report on the run's row first
  (``app.store.run_reports``); a second message for the same run (the finishing code ran twice) finds
  it held or ended and sends nothing. A worker killed during an attempt makes that attempt again:
  a receiver may see a report twice then, with the same ``run.id``.
- **The URL is a secret** (a Slack or Teams webhook URL is a credential): logs say its host only,
  never its path or query, and an exception's text — which holds the URL — is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import requests
import urllib3

from app.config import Settings
from app.jsonio import dumps
from app.ops import metrics
from app.reports import run_report
from app.retry import INFRA_ERRORS, notify_backoff_seconds, retry_after_seconds
from app.store import run_reports
from app.store.states import ReportOutcome

log = logging.getLogger(__name__)

TIMESTAMP_HEADER = "X-Balances-Timestamp"
SIGNATURE_HEADER = "X-Balances-Signature"
USER_AGENT = "balances-refresh/0.1 (run report)"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256 over ``timestamp + "." + body``: what a receiver recomputes."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, body: bytes, now: float) -> dict[str, str]:
    timestamp = str(int(now))
    return {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": USER_AGENT,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
    }


@dataclass(frozen=True)
class Answer:
    """What one POST came to: ``outcome`` when the sequence ends with it, None when it may be tried
    again; ``status`` for logs (an HTTP status, ``timeout``, ``connection error``)."""

    outcome: ReportOutcome | None
    status: str
    retry_after: float | None = None


def classify(status: int, retry_after: str | None) -> Answer:
    if 200 <= status < 300:
        return Answer(ReportOutcome.SENT, str(status))
    if status == 429 or status >= 500:
        return Answer(None, str(status), retry_after_seconds(retry_after))
    return Answer(ReportOutcome.REFUSED, str(status))  # 1xx, 3xx (not followed), 4xx


def post(settings: Settings, body: bytes, now: float | None = None) -> Answer:
    """One signed POST of ``body`` to BALANCES_NOTIFY_URL within BALANCES_NOTIFY_TIMEOUT_SECONDS
    (connecting and the answer's headers; its body is not read)."""
    assert settings.notify_url is not None and settings.notify_secret is not None
    headers = signed_headers(
        settings.notify_secret.get_secret_value().encode(), body, time.time() if now is None else now
    )
    limit = settings.notify_timeout_seconds
    timeout = urllib3.Timeout(connect=min(3.05, limit), read=limit, total=limit)
    try:
        with requests.post(
            settings.notify_url.get_secret_value(),
            data=body,
            headers=headers,
            timeout=timeout,  # type: ignore[arg-type]  # requests passes a urllib3 Timeout through
            allow_redirects=False,
            stream=True,
        ) as resp:
            return classify(resp.status_code, resp.headers.get("Retry-After"))
    except (requests.Timeout, urllib3.exceptions.TimeoutError):
        return Answer(None, "timeout")
    except (
        requests.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.ProtocolError,
    ):
        return Answer(None, "connection error")
    except Exception as exc:
        # Not an answer, nor something that passes (the URL is validated at start): given up at once,
        # and named by its type only — its text, or a traceback, would hold the URL.
        return Answer(ReportOutcome.FAILED, type(exc).__name__)


@dataclass(frozen=True)
class Ended:
    """Nothing more to do for this message: ``outcome`` when this attempt ended the sequence; None
    when the report was not this message's to send (no hook configured, the run not finished, the
    report held by another task or already delivered)."""

    outcome: ReportOutcome | None
    why: str


@dataclass(frozen=True)
class Again:
    """Try again in ``countdown`` seconds (the same task, so the same holder)."""

    countdown: float


def _lease(settings: Settings, now: datetime, countdown: float = 0.0) -> datetime:
    """How long the holder keeps the report: its countdown, then long enough for a worker slot to free
    (the hard time limit of whatever task holds it) and for one POST."""
    return now + timedelta(seconds=countdown + settings.task_time_limit + settings.notify_timeout_seconds)


def deliver(
    settings: Settings, run_id: str, owner: str, rng: random.Random, now: datetime | None = None
) -> Ended | Again:
    """One attempt of run ``run_id``'s report, by task ``owner``: the report is built, the attempt
    claimed (counted), the report POSTed. Our own infrastructure failing (the database) raises: the
    task base re-queues the task, as every task's, and the attempt is not counted unless it was
    claimed."""
    host = settings.notify_host
    extra = {"run_id": run_id, "notify_host": host}
    if settings.notify_url is None:
        return Ended(None, "no BALANCES_NOTIFY_URL")
    body: bytes | None = None
    try:
        report = run_report.build(settings, run_id)
        if report is not None:
            body = dumps(report).encode()
    except INFRA_ERRORS:
        raise
    except Exception:
        log.exception("run report of %s could not be built", run_id, extra=extra)
    now = now or datetime.now(UTC)
    attempt = run_reports.claim_attempt(settings, run_id, owner, _lease(settings, now))
    if attempt is None:
        return Ended(None, "not this task's: the run is not finished, or its report is held or ended")
    if body is None:  # a bug: trying again would build the same nothing
        return _end(settings, run_id, owner, ReportOutcome.FAILED, attempt, "no report built", extra)
    if attempt > settings.notify_max_attempts:  # its attempts kept dying with their worker
        return _end(settings, run_id, owner, ReportOutcome.FAILED, attempt - 1, "no attempt left", extra)
    answer = post(settings, body)
    if answer.outcome is not None:
        return _end(settings, run_id, owner, answer.outcome, attempt, answer.status, extra)
    if attempt >= settings.notify_max_attempts:
        return _end(settings, run_id, owner, ReportOutcome.FAILED, attempt, answer.status, extra)
    countdown = notify_backoff_seconds(attempt, settings, answer.retry_after, rng)
    if not run_reports.extend(settings, run_id, owner, _lease(settings, datetime.now(UTC), countdown)):
        return Ended(None, "handed over by the sweeper")
    log.warning(
        "run report of %s to %s: attempt %d/%d failed (%s); retrying in %.1fs",
        run_id,
        host,
        attempt,
        settings.notify_max_attempts,
        answer.status,
        countdown,
        extra=extra,
    )
    return Again(countdown)


def _end(
    settings: Settings,
    run_id: str,
    owner: str,
    outcome: ReportOutcome,
    attempts: int,
    status: str,
    extra: Mapping[str, object],
) -> Ended:
    if not run_reports.finish(settings, run_id, owner, outcome, datetime.now(UTC)):
        return Ended(None, "handed over by the sweeper")
    metrics.RUN_REPORTS.labels(outcome=outcome.value).inc()
    level = logging.INFO if outcome is ReportOutcome.SENT else logging.ERROR
    log.log(
        level,
        "run report of %s to %s %s after %d attempt(s) (%s)",
        run_id,
        settings.notify_host,
        outcome.value,
        attempts,
        status,
        extra=extra,
    )
    return Ended(outcome, status)
