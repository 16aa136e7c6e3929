"""Worker leases: the messages a killed worker held go back to their queue within about one lease.

Redis keeps no consumer sessions. kombu keeps every delivered, unacknowledged message in its
``unacked`` hash (the delivery time in ``unacked_index``) and gives it back only once it is older than
the visibility timeout (``BALANCES_VISIBILITY_TIMEOUT``, 900 s: it must outlast the longest retry
countdown a live worker holds). A killed worker would cost that long. So each worker process keeps a
lease (``BALANCES_WORKER_LEASE_SECONDS``, 15 s):

- it notes the delivery tag of every task message it receives (Celery's ``task_received``, sent by
  the consumer for each one, a message waiting for its countdown included);
- its lease thread adds each tag to the worker's holdings in Redis (``holds:``, a set) as soon as
  it is received (milliseconds: the consumer only wakes the thread, it never waits on Redis), removes
  what is no longer unacknowledged, and renews, every third of the lease, the lease key itself
  (``lease:``, expiring one lease after the last renewal; the holdings are kept for the visibility
  timeout);
- on the same beat it reclaims: a message in the holdings of a worker whose lease expired, in no
  live worker's holdings, that this reclaimer has seen unacknowledged for a whole lease by its own
  clock, was held by a worker that died. It goes back to its queue, next in line (kombu's own
  ``restore_by_tag``, a WATCH transaction: a message acknowledged meanwhile is not restored, two
  reclaimers never restore one message twice), marked redelivered, so a message that kills every
  worker that takes it still ends after ``BALANCES_MAX_DELIVERIES``.

Only messages some worker's holdings list are reclaimed: a consumer without the thread (a worker of an
older release during a rolling deploy, another application on the same Redis) is never judged; its
messages come back after the visibility timeout, as before. A worker reclaims only after renewing its
own lease without error for a whole lease: after a Redis outage, or at its own start, every live
worker has listed its messages again before anyone judges them. kombu keeps a message's delivery tag
when it restores it, so a tag is also remembered with its ``unacked_index`` time: a tag delivered
again (to another worker) is no longer this worker's. Only the Redis transport needs any of this
(an AMQP broker gives a dead consumer's messages back when its connection drops), and the leases
stay off under a ``global_keyprefix`` (kombu prefixes only some commands).

``broker_lost_messages`` serves the sweeper: the broker's Redis ``run_id`` changes when it restarts
(it may come back empty, or from a snapshot older than its last messages), so the first sweep after
a restart re-drives at once instead of waiting for the stall window. See docs/faults.md.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kombu.utils.encoding import bytes_to_str

log = logging.getLogger(__name__)

REGISTRY = "balances:workers"  # the ids of the workers that renewed a lease (pruned when both expired)
LEASE_KEY = "balances:worker:lease:{}"
HOLDS_KEY = "balances:worker:holds:{}"
EPOCH_KEY = "balances:broker-run-id"


class Held:
    """The delivery tags this process received, each with the ``unacked_index`` time it was first
    seen at (None until then); shared by the consumer thread and the lease thread. ``wake`` tells
    the lease thread a tag is waiting to be added to the holdings."""

    def __init__(self) -> None:
        self._tags: dict[str, float | None] = {}
        self._fresh: list[str] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()

    def add(self, tag: str) -> None:
        with self._lock:
            self._tags[tag] = None  # a new delivery (even of a tag seen before)
            self._fresh.append(tag)
        self.wake.set()

    def take_fresh(self) -> list[str]:
        with self._lock:
            fresh, self._fresh = self._fresh, []
            return fresh

    def give_back(self, fresh: list[str]) -> None:
        """Tags whose addition to the holdings failed: tried again at the next wake-up."""
        with self._lock:
            self._fresh[:0] = fresh

    def snapshot(self) -> dict[str, float | None]:
        with self._lock:
            return dict(self._tags)

    def settle(
        self, before: dict[str, float | None], unacked: dict[str, float]
    ) -> tuple[list[str], list[str]]:
        """Against ``unacked`` read after ``before`` was taken: forget what was acknowledged (gone)
        or delivered again elsewhere (its time changed). Returns (held now, forgotten), sorted. A
        tag received again after ``before`` is judged at the next renewal."""
        forgotten = []
        with self._lock:
            for tag, seen in before.items():
                if tag not in self._tags or self._tags[tag] != seen:
                    continue  # received again meanwhile
                at = unacked.get(tag)
                if at is None or (seen is not None and at != seen):
                    del self._tags[tag]
                    forgotten.append(tag)
                else:
                    self._tags[tag] = at
            return sorted(self._tags), sorted(forgotten)


def unacked(channel: Any) -> dict[str, float]:
    """The broker's unacknowledged messages: tag -> delivered at (the delivering worker's clock)."""
    index = channel.client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
    return {bytes_to_str(tag): float(at) for tag, at in index}


def add_holdings(channel: Any, worker_id: str, tags: list[str], keep: float) -> None:
    if tags:
        pipe = channel.client.pipeline()
        pipe.sadd(HOLDS_KEY.format(worker_id), *tags)
        pipe.pexpire(HOLDS_KEY.format(worker_id), int(keep * 1000))
        pipe.execute()


def renew(channel: Any, worker_id: str, held: Held, lease: float, keep: float) -> dict[str, float]:
    """Renew this worker's lease and prune its holdings (kept ``keep`` seconds); returns ``unacked``."""
    before = held.snapshot()
    delivered = unacked(channel)
    kept, forgotten = held.settle(before, delivered)
    key = HOLDS_KEY.format(worker_id)
    pipe = channel.client.pipeline()
    pipe.set(LEASE_KEY.format(worker_id), "1", px=int(lease * 1000))
    if kept:
        pipe.sadd(key, *kept)  # again: the set may have been lost with a Redis restart
    if forgotten:
        pipe.srem(key, *forgotten)
    pipe.pexpire(key, int(keep * 1000))
    pipe.sadd(REGISTRY, worker_id)
    pipe.execute()
    return delivered


def holdings(channel: Any) -> tuple[set[str], set[str]]:
    """(tags held by live workers, tags held by workers whose lease expired); a worker whose lease
    and holdings both expired leaves the registry."""
    client = channel.client
    ids = sorted(bytes_to_str(i) for i in client.smembers(REGISTRY))
    pipe = client.pipeline()
    for worker_id in ids:
        pipe.exists(LEASE_KEY.format(worker_id))
        pipe.smembers(HOLDS_KEY.format(worker_id))
    found = pipe.execute()
    live: set[str] = set()
    dead: set[str] = set()
    for i, worker_id in enumerate(ids):
        alive, tags = found[2 * i], {bytes_to_str(t) for t in found[2 * i + 1]}
        if alive:
            live |= tags
        elif tags:
            dead |= tags
        else:
            client.srem(REGISTRY, worker_id)
    return live, dead


class Ages:
    """How long this reclaimer has seen each unacknowledged message, by its own monotonic clock
    (a delivery again restarts it): no comparison of two machines' clocks."""

    def __init__(self) -> None:
        self._first: dict[str, tuple[float, float]] = {}  # tag -> (delivered at, first seen)

    def update(self, delivered: dict[str, float], now: float) -> dict[str, float]:
        self._first = {
            tag: first if (first := self._first.get(tag)) and first[0] == at else (at, now)
            for tag, at in delivered.items()
        }
        return {tag: now - seen for tag, (_at, seen) in self._first.items()}


def orphans(channel: Any, ages: dict[str, float], lease: float) -> list[str]:
    """Messages a dead worker listed last, no live worker lists, unacknowledged for over a lease."""
    live, dead = holdings(channel)
    return sorted(t for t in dead - live if ages.get(t, 0.0) > lease)


def reclaim(channel: Any, tags: list[str]) -> int:
    """Put each message back on its queue, next in line (BRPOP takes the right end), marked
    redelivered (kombu's restore, which restores nothing once the message left ``unacked``).
    Returns how many were still there."""
    n = 0
    for tag in tags:
        if channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, client=channel.client, leftmost=False)
            n += 1
    return n


def usable(connection: Any) -> bool:
    """Leases work over kombu's Redis transport without a global key prefix."""
    if connection.transport.driver_type != "redis":
        return False
    return not getattr(connection.default_channel, "global_keyprefix", "")


def broker_lost_messages(connection: Any) -> bool:
    """Whether the broker's Redis restarted since a sweep last asked (its ``run_id`` changed, or no
    sweep asked this Redis yet): one caller per restart gets True (GETSET). A Redis restarted without
    persistence lost every message; one restored from a snapshot lost those published after it."""
    if connection.transport.driver_type != "redis":
        return False
    client = connection.default_channel.client
    try:
        run_id = str(client.info("server")["run_id"])
    except Exception:  # INFO refused (some managed Redis): the marker's presence alone says it
        run_id = "unknown"
    seen = client.getset(EPOCH_KEY, run_id)
    return seen is None or bytes_to_str(seen) != run_id


class Lease(threading.Thread):
    """The worker's lease thread: renew, then reclaim what dead workers held."""

    def __init__(
        self,
        connect: Callable[[], Any],
        held: Held,
        lease: float,
        keep: float,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name="balances-lease", daemon=True)
        self.connect = connect  # () -> a kombu Connection to the broker
        self.held = held
        self.lease = lease
        self.keep = keep
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.stopped = threading.Event()
        self.ages = Ages()
        self._healthy_since: float | None = None
        self._connection: Any = None

    def run(self) -> None:
        due = 0.0
        while not self.stopped.is_set():
            if self.clock() >= due:
                self.beat()
                due = self.clock() + self.lease / 3
            else:
                self.flush()
            self.held.wake.wait(max(0.0, due - self.clock()))
            self.held.wake.clear()
        self._release()

    def flush(self) -> None:
        """Add the tags received since the last call to this worker's holdings."""
        fresh = self.held.take_fresh()
        if not fresh:
            return
        try:
            if self._connection is None:
                self._connection = self.connect()
            add_holdings(self._connection.default_channel, self.worker_id, fresh, self.keep)
        except Exception as exc:
            self.held.give_back(fresh)
            log.warning("worker holdings not updated (%s): retrying", type(exc).__name__)
            self._close()

    def beat(self) -> int:
        """One renewal (and reclaim, once healthy for a lease); the number of messages reclaimed."""
        try:
            if self._connection is None:
                self._connection = self.connect()
            channel = self._connection.default_channel
            delivered = renew(channel, self.worker_id, self.held, self.lease, self.keep)
            now = self.clock()
            ages = self.ages.update(delivered, now)
            if self._healthy_since is None:
                self._healthy_since = now
            if now - self._healthy_since < self.lease:
                return 0
            n = reclaim(channel, orphans(channel, ages, self.lease))
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
        self.held.wake.set()

    def _release(self) -> None:
        """A worker stopping warmly gives its lease up (kombu restores its unacked messages itself)."""
        try:
            if self._connection is not None:
                client = self._connection.default_channel.client
                client.delete(LEASE_KEY.format(self.worker_id), HOLDS_KEY.format(self.worker_id))
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


def start(app: Any, lease: float, keep: float) -> Lease | None:
    """Start this worker's lease thread (once per process; only where ``usable``). Its connection
    times out within a third of the lease, so a half-open socket cannot stall the renewals."""
    global _lease
    if _lease is not None:
        return _lease
    with app.connection_for_write() as connection:
        if not usable(connection):
            log.warning("worker leases off (not a Redis broker, or a global key prefix)")
            return None
    options = {
        **(app.conf.broker_transport_options or {}),
        "socket_timeout": lease / 3,
        "socket_connect_timeout": lease / 3,
    }
    _lease = Lease(lambda: app.connection_for_write(transport_options=options), _held, lease, keep)
    _lease.start()
    return _lease


def stop() -> None:
    global _lease
    if _lease is not None:
        _lease.stop()
        _lease.join(timeout=5)
        _lease = None
