"""The Celery app (``celery -A app worker`` / ``celery -A app beat``) and its process signals.

Imports nothing that imports prometheus_client: the worker must choose its multiprocess directory
(``celeryd_init``) before the first metric object exists.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from celery.app.amqp import AMQP
from kombu.utils.objects import cached_property

from app.config import get_settings
from app.worker.queues import PUSH_TASK

log = logging.getLogger(__name__)


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    from app.ops import logs

    s = get_settings()
    logs.configure(s.log_level, s.log_format)


@signals.import_modules.connect
def _before_task_modules(**_: Any) -> None:
    # Sent by the loader of a worker or beat just before it imports the task modules (which import
    # prometheus_client): the last moment to choose the multiprocess directory.
    from app.ops import exporter

    exporter.prepare_multiprocess(get_settings())


def require_keys(role: str) -> None:
    """A worker or beat without its keys stops at once, naming the variable, instead of failing at
    2 a.m. on the first token it reads or message it signs."""
    settings = get_settings()
    missing = [
        name
        for name, value in (
            ("BALANCES_ENCRYPTION_KEY", settings.encryption_key),
            ("BALANCES_SIGNING_KEY", settings.signing_key),
        )
        if value is None
    ]
    if missing:
        print(f"configuration error: the {role} needs {' and '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)  # a signal receiver's Exception would only be logged
    from app.store.secrets import key_opens_stored_tokens

    try:
        opens = key_opens_stored_tokens(settings)
    except Exception as exc:  # the database may be down at start: the check waits for the next start
        log.warning("BALANCES_ENCRYPTION_KEY not checked against the stored tokens (%s)", type(exc).__name__)
        return
    if opens is False:
        print(
            f"configuration error: the {role}'s BALANCES_ENCRYPTION_KEY does not decrypt the stored Powens "
            "tokens (a wrong key, or the key they were encrypted with was removed)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def sign_message(name: str, headers: dict[str, Any], body: Any) -> None:
    """Put the message's signature in its headers (app.signing); SigningKeyMissing when this process
    has no key: the message is then not published at all."""
    from app import signing

    args, kwargs = body[0], body[1]
    settings = get_settings()
    secret = settings.signing_key
    if name == PUSH_TASK and settings.push_signing_key is not None:
        secret = settings.push_signing_key  # the receiver's key signs pushes only
    keys = signing.keys_from(_secret(secret))
    headers[signing.HEADER] = signing.sign(
        keys, name, headers["id"], args, kwargs, headers.get("retries") or 0
    )


class SigningAMQP(AMQP):
    """Every message this process publishes is signed on its way to the broker — or not published.

    Signing is part of sending (every path goes through ``send_task_message``: ``apply_async``,
    ``send_task``, retries, beat), not a ``before_task_publish`` receiver: Celery logs and swallows a
    receiver's exception, so a process without its key would publish the message unsigned."""

    @cached_property
    def send_task_message(self) -> Any:
        send = self._create_task_sender()

        def signed(producer: Any, name: str, message: Any, **options: Any) -> Any:
            headers = message[0]
            headers.update(options.pop("headers", None) or {})
            sign_message(name, headers, message[2])
            return send(producer, name, message, **options)

        return signed


# Every task's base (metrics, declared retry policy); a string, so it loads with the task modules.
app = Celery("app", task_cls="app.worker.taskbase:BalancesTask", amqp=SigningAMQP)
app.config_from_object("celeryconfig")


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


@signals.worker_init.connect
def _worker_init(**_: Any) -> None:
    from app.ops import exporter

    require_keys("worker")
    exporter.serve_worker_metrics(get_settings())


@signals.worker_ready.connect
def _worker_ready(**_: Any) -> None:
    # The lease on the messages this worker holds (app.worker.liveness): a killed worker's messages
    # go back to their queue in seconds, not after the visibility timeout.
    from app.worker import liveness

    settings = get_settings()
    liveness.start(app, settings.worker_lease_seconds, keep=settings.visibility_timeout)


@signals.task_received.connect
def _task_received(request: Any = None, **_: Any) -> None:
    from app.worker import liveness

    liveness.note_received(request)


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    from app.worker import liveness

    liveness.stop()


@signals.worker_process_init.connect
def _child_init(**_: Any) -> None:
    # Sockets inherited from the parent (DB pool, HTTP pool) must not be used by two processes.
    from app.powens.client import reset_client
    from app.refresh.coordination import reset_coordinators
    from app.store.db import dispose_after_fork

    dispose_after_fork()
    reset_client()
    reset_coordinators()


@signals.worker_process_shutdown.connect
def _child_shutdown(pid: int | None = None, **_: Any) -> None:
    from app.ops import exporter

    exporter.child_exited(pid or os.getpid())


@signals.beat_init.connect
def _beat_init(**_: Any) -> None:
    from app.ops import exporter

    require_keys("beat")
    exporter.serve_beat_metrics(get_settings())


def worker_argv(
    name: str,
    *,
    queues: Sequence[str] = (),
    concurrency: int = 2,
    loglevel: str = "INFO",
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``celery -A app worker`` command line (tests, the benchmark): all queues unless told,
    no gossip or mingle (they add start-up latency and chatter, and nothing here uses them)."""
    from app.worker.queues import Queue

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "app",
        "worker",
        "-Q",
        ",".join(queues or [q.value for q in Queue]),
        "-c",
        str(concurrency),
        "-n",
        name,
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        loglevel,
        *extra,
    ]
