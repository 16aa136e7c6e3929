"""Whether a worker consumes a queue right now: what the admin shell asks before it publishes.

An operator's refresh published when no worker consumes ``interactive`` waits in the broker for
nobody; the shell would wait for its outcome in vain. Celery's remote control answers it: every
worker's consumer replies to ``active_queues`` from its own thread, also while its pool is busy with
the nightly flood, so a silent worker is one that is down (or cut from the broker). The question is
bounded (``timeout``); the broker's own connection attempts are bounded too, so an unreachable broker
is an answer in seconds, not a hang.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Presence:
    workers: tuple[str, ...]  # the workers that answered
    consuming: tuple[str, ...]  # those of them that consume the queue asked about


class BrokerUnreachable(RuntimeError):
    """The broker did not take the question (it is down, or CELERY_BROKER_URL points nowhere)."""


def consumers(queue: str, timeout: float = 2.0) -> Presence:
    """The workers answering within ``timeout`` seconds, and which of them consume ``queue``."""
    from app.celery import app

    try:
        with app.connection_for_write(connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.inspect(timeout=timeout, connection=connection).active_queues() or {}
    except Exception as exc:  # kombu and redis-py raise several types for a broker that is not there
        raise BrokerUnreachable(f"the broker did not answer ({type(exc).__name__})") from None
    consuming = [w for w, queues in replies.items() if any(q.get("name") == queue for q in queues or ())]
    return Presence(tuple(sorted(replies)), tuple(sorted(consuming)))
