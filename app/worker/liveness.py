"""Worker leases: the messages a killed worker held go back to their queue within about one lease.

Redis keeps no consumer sessions. kombu keeps every delivered, unacknowledged message in its
``unacked`` hash (the delivery time in ``unacked_index``) and gives it back only once it is older than
the visibility timeout (``BALANCES_VISIBILITY_TIMEOUT``, 900 s: it must outlast the longest retry
countdown a live worker holds). A killed worker would cost that long. So each worker process keeps a
lease (``BALANCES_WORKER_LEASE_SECONDS``, 15 s):

- it notes the delivery tag of every task message it receives (Celery's ``task_received``, sent by
  the consumer for each one, a message waiting for its countdown included);
- a thread renews, every third of the lease, a key listing the tags it still holds (those still in
  ``unacked``), which expires one lease after the last renewal;
- on the same beat it reclaims: a message unacknowledged for longer than one lease that no live
  lease lists was held by a worker that died. It goes back to the head of its queue through kombu's
  own ``restore_by_tag`` (a WATCH transaction: a message acknowledged meanwhile is not restored, two
  reclaimers never restore one message twice) and is marked redelivered, so a message that kills
  every worker that takes it still ends after ``BALANCES_MAX_DELIVERIES``.

A worker reclaims only after renewing its own lease without error for one whole lease: after a Redis
outage, or at its own start, every live worker has listed its messages again before anyone judges
them. The visibility timeout stays as the backstop (a message lost between kombu's pop and its
``unacked`` entry, a worker without the thread). Only the Redis transport needs any of this: an AMQP
broker gives a dead consumer's messages back when its connection drops.

``broker_lost_messages`` serves the sweeper: a marker key that is gone means the broker's Redis
restarted empty (or was flushed), so every queued message is gone and the sweeper re-drives at once
instead of waiting for the stall window. See docs/faults.md "How a run recovers".
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

REGISTRY = "balances:workers"  # the ids of the workers that renewed a lease (pruned when expired)
LEASE_KEY = "balances:worker:{}"
EPOCH_KEY = "balances:broker-epoch"


class Held:
    """The delivery tags this process received; shared by the consumer thread and the lease thread."""

    def __init__(self) -> None:
        self._tags: set[str] = set()
        self._lock = threading.Lock()

    def add(self, tag: str) -> None:
        with self._lock:
            self._tags.add(tag)

    def keep(self, unacked: Iterable[str]) -> list[str]:
        """Forget what is no longer unacknowledged (acked, rejected, restored); the rest, sorted.
        kombu enters a message in ``unacked`` before the consumer sees it, so nothing held is lost."""
        with self._lock:
            self._tags &= set(unacked)
            return sorted(self._tags)


def renew(channel: Any, worker_id: str, held: Held, lease: float) -> dict[str, float]:
    """Renew this worker's lease; returns the broker's unacknowledged messages (tag -> delivered at)."""
    client = channel.client
    delivered = {
        bytes_to_str(tag): float(at)
        for tag, at in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
    }
    mine = held.keep(delivered)
    pipe = client.pipeline()
    pipe.set(LEASE_KEY.format(worker_id), json.dumps(mine), px=int(lease * 1000))
    pipe.sadd(REGISTRY, worker_id)
    pipe.execute()
    return delivered


def orphans(channel: Any, delivered: dict[str, float], lease: float, now: float) -> list[str]:
    """Messages unacknowledged for over a lease that no live lease lists (expired leases pruned)."""
    client = channel.client
    ids = sorted(bytes_to_str(i) for i in client.smembers(REGISTRY))
    values = client.mget([LEASE_KEY.format(i) for i in ids]) if ids else []
    live: set[str] = set()
    for worker_id, value in zip(ids, values, strict=True):
        if value is None:
            client.srem(REGISTRY, worker_id)
        else:
            live.update(json.loads(value))
    return sorted(tag for tag, at in delivered.items() if at < now - lease and tag not in live)


def reclaim(channel: Any, tags: Iterable[str]) -> int:
    """Put each message back at the head of its queue, marked redelivered (kombu's restore, which
    restores nothing once the message left ``unacked``). Returns how many were still there."""
    n = 0
    for tag in tags:
        if channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, client=channel.client, leftmost=True)
            n += 1
    return n


def is_redis(connection: Any) -> bool:
    return bool(connection.transport.driver_type == "redis")


def broker_lost_messages(connection: Any) -> bool:
    """Whether the broker's Redis lost its data since a sweep last marked it (the marker is gone). A
    new Redis says so too, once: the re-drive then only re-sends what is pending."""
    if not is_redis(connection):
        return False
    return not connection.default_channel.client.exists(EPOCH_KEY)


def mark_broker_seen(connection: Any) -> None:
    """Set by the sweep that re-drove after a loss, once done: a sweep failing half-way leaves the
    marker unset, so the next one re-drives again."""
    if is_redis(connection):
        connection.default_channel.client.set(EPOCH_KEY, str(time.time()))


class Lease(threading.Thread):
    """The worker's lease thread: renew, then reclaim what dead workers held."""

    def __init__(self, connect: Any, held: Held, lease: float, worker_id: str | None = None) -> None:
        super().__init__(name="balances-lease", daemon=True)
        self.connect = connect  # () -> a kombu Connection to the broker
        self.held = held
        self.lease = lease
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stopped = threading.Event()
        self._healthy_since: float | None = None
        self._connection: Any = None

    def run(self) -> None:
        while True:
            self.beat()
            if self.stopped.wait(self.lease / 3):
                break
        self._release()

    def beat(self) -> int:
        """One renewal (and reclaim, once healthy for a lease); the number of messages reclaimed."""
        try:
            if self._connection is None:
                self._connection = self.connect()
            channel = self._connection.default_channel
            delivered = renew(channel, self.worker_id, self.held, self.lease)
            now = time.time()
            if self._healthy_since is None:
                self._healthy_since = now
            if now - self._healthy_since < self.lease:
                return 0
            n = reclaim(channel, orphans(channel, delivered, self.lease, now))
        except Exception as exc:
            if self._healthy_since is not None:
                log.warning("worker lease not renewed (%s): retrying", type(exc).__name__)
            self._healthy_since = None
            self._close()
            return 0
        if n:
            from app.ops import metrics

            metrics.MESSAGES_RECLAIMED.inc(n)
            log.warning("reclaimed %d message(s) held by a worker that stopped renewing its lease", n)
        return n

    def stop(self) -> None:
        self.stopped.set()

    def _release(self) -> None:
        """A worker stopping warmly gives its lease up (kombu restores its unacked messages itself)."""
        try:
            if self._connection is not None:
                client = self._connection.default_channel.client
                client.delete(LEASE_KEY.format(self.worker_id))
                client.srem(REGISTRY, self.worker_id)
        except Exception as exc:
            log.warning("worker lease not released (%s): it expires by itself", type(exc).__name__)
        self._close()

    def _close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.release()
            except Exception:
                log.debug("closing the lease connection failed", exc_info=True)
        self._connection = None


_held = Held()
_lease: Lease | None = None


def note_received(request: Any) -> None:
    """``task_received``: the consumer took this message (it stays unacked until the task ends)."""
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if tag is not None:
        _held.add(str(tag))


def start(app: Any, lease: float) -> Lease | None:
    """Start this worker's lease thread (once per process; only over a Redis broker)."""
    global _lease
    if _lease is not None:
        return _lease
    with app.connection_for_write() as connection:
        if not is_redis(connection):
            return None
    _lease = Lease(app.connection_for_write, _held, lease)
    _lease.start()
    return _lease


def stop() -> None:
    global _lease
    if _lease is not None:
        _lease.stop()
        _lease.join(timeout=5)
        _lease = None
