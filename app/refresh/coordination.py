"""What workers agree on through Redis: single flight, shared reads, the cluster-wide Powens rate limit.

Celery's own ``rate_limit`` is per worker (celery#5732); here the limit is one Redis key for the whole
cluster. ``LocalCoordinator`` gives the same behaviour inside one process (the demo, no Redis).

The rate limit is a *sliding-window log*, not a token bucket: a bucket of capacity R refilled at R/s
lets 2R calls through in some one-second windows (a full bucket spent at the end of one second, the
refill at the start of the next). The window log admits a call only when fewer than R were admitted
in the preceding window, so no one-second window ever holds more than R. A small guard is added to
the window because the clock is Redis' while Powens sees arrival times a few milliseconds later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from app.config import Settings
from app.errors import Reason, RefreshError
from app.jsonio import dumps, loads
from app.signing import keys_from, seal, unseal

log = logging.getLogger(__name__)
WINDOW_MS = 1000
GUARD_MS = 50


class Throttled(Exception):
    """Waiting longer would hold a worker slot (rate limit reached, account busy): re-queue instead.

    Not a failure: it consumes no attempt."""

    def __init__(self, wait: float, why: str = "Powens rate limit reached") -> None:
        super().__init__(f"{why}; retry in {wait:.2f}s")
        self.wait = wait
        self.why = why


class Coordinator(Protocol):
    def account_lock(
        self, account_id: str, lease: float, wait: float
    ) -> contextlib.AbstractContextManager[None]: ...

    def shared(
        self, key: str, fetch: Callable[[], Any], *, ttl: int, wait: float, sharing: Sharing
    ) -> Any: ...

    def acquire_call(self) -> float: ...

    def count_delivery(self, key: str, ttl: int) -> int: ...

    def note_in_doubt(self, finished: dict[str, str], ttl: int) -> None: ...

    def peek_in_doubt(self, task_ids: Sequence[str]) -> dict[str, str]: ...

    def take_in_doubt(self, task_ids: Sequence[str]) -> set[str]: ...


@dataclass(frozen=True)
class Sharing:
    """How a shared read shares a failure, and the lease of its fetcher's lock.

    A failure is shared under ``failure_key`` (the run, the user and the attempt number) for
    ``failure_ttl`` seconds: every task at the same attempt gets the same answer from one Powens call,
    and the next attempt (after its backoff) reads Powens afresh."""

    failure_key: str
    failure_ttl: float
    lease: float


def throttle(coord: Coordinator, max_wait: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until the limiter admits a call; past ``max_wait`` raise Throttled (re-queue the task)."""
    waited = 0.0
    while True:
        wait = coord.acquire_call()
        if wait <= 0:
            return
        if waited + wait > max_wait:
            raise Throttled(wait)
        sleep(wait)
        waited += wait


# Sliding-window log. KEYS[1] = zset; ARGV = limit, window_ms, member. Returns 0 (admitted) or the
# milliseconds until the oldest admitted call leaves the window.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window * 2)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + window - now)
"""


# Extend a lock's lease only while we still hold it. KEYS[1] = lock; ARGV = token, lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Lease:
    """Keeps a Redis lock alive while its holder works: the lock's TTL is a short lease, renewed every
    third of it by a daemon thread. A holder that dies (a killed worker) stops renewing, so the lock
    is free again within one lease — yet a long piece of work (a forced sync, then a read) never sees
    its lock expire under it."""

    def __init__(self, renew: Any, key: str, token: str, lease: float) -> None:
        self._renew, self._key, self._token, self._lease = renew, key, token, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease:{key}", daemon=True)
        self.lost = False  # the lock expired or was taken while held (logged)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _run(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self._lease / 3):
            try:
                if self._renew(keys=[self._key], args=[self._token, int(self._lease * 1000)]):
                    renewed = time.monotonic()
                    continue
            except redis.exceptions.RedisError:
                if time.monotonic() - renewed < self._lease:
                    continue  # a blip: try again while the lease still runs
            # Expired, taken, or Redis restarted empty: the work goes on without the lock (it only
            # spares a duplicate Powens read; the database keeps the outcome exactly-once).
            self.lost = True
            log.warning("lock %s lost while held", self._key)
            return


class RedisCoordinator:
    def __init__(
        self, client: redis.Redis, *, rate_limit: float, seal_keys: list[bytes], prefix: str = "balances"
    ) -> None:
        self.r = client
        self.rate_limit = rate_limit
        self.prefix = prefix
        # Shared reads and failures are sealed (app.signing.seal): Redis is writable by more than us.
        self.seal_keys = seal_keys
        self._acquire = self.r.register_script(_ACQUIRE)
        self._renew = self.r.register_script(_RENEW)

    @contextlib.contextmanager
    def account_lock(self, account_id: str, lease: float, wait: float) -> Iterator[None]:
        """Held with a renewed ``lease``: a dead holder blocks the account for one lease at most."""
        key = f"{self.prefix}:lock:account:{account_id}"
        lock = self.r.lock(key, timeout=lease, blocking_timeout=wait)
        if not lock.acquire():
            raise Throttled(1.0 + wait / 2, "another refresh of this account is running")
        token = lock.local.token
        try:
            with Lease(self._renew, key, token.decode() if isinstance(token, bytes) else str(token), lease):
                yield
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def shared(self, key: str, fetch: Callable[[], Any], *, ttl: int, wait: float, sharing: Sharing) -> Any:
        """Single-flight read: one caller fetches, the others wait for and reuse its answer (or its
        failure, raised again)."""
        data_key = f"{self.prefix}:shared:{key}"
        fail_key = f"{self.prefix}:shared:{sharing.failure_key}"
        lock_key = data_key + ":lock"
        deadline = time.monotonic() + wait
        while True:
            raw, failed = self.r.mget(data_key, fail_key)
            value = self._unseal(data_key, raw)
            if value is not None:
                return loads(value)
            error = self._unseal(fail_key, failed)
            if error is not None:
                raise _unpack_error(error)
            me = uuid.uuid4().hex
            if self.r.set(lock_key, me, nx=True, px=int(sharing.lease * 1000)):
                # The answer is stored before the lock goes, or a waiter could find neither and
                # read Powens a second time.
                try:
                    with Lease(self._renew, lock_key, me, sharing.lease):
                        value = fetch()
                    self.r.set(data_key, seal(self.seal_keys, data_key, dumps(value)), ex=ttl)
                    return value
                except RefreshError as err:
                    sealed = seal(self.seal_keys, fail_key, _pack_error(err))
                    self.r.set(fail_key, sealed, px=int(sharing.failure_ttl * 1000))
                    raise
                finally:
                    if self.r.get(lock_key) == me.encode():
                        self.r.delete(lock_key)
            if time.monotonic() > deadline:
                raise RefreshError(Reason.PROVIDER_UNAVAILABLE, "timed out waiting for a shared Powens read")
            time.sleep(0.02)

    def _unseal(self, key: str, raw: bytes | str | None) -> str | None:
        if raw is None:
            return None
        text = unseal(self.seal_keys, key, raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw)
        if text is None:
            # Not ours: planted by someone who can write to Redis (or sealed under a retired key).
            log.error("shared value %s is not sealed by the service: ignored and removed", key)
            self.r.delete(key)
        return text

    def count_delivery(self, key: str, ttl: int) -> int:
        full = f"{self.prefix}:deliveries:{key}"
        with self.r.pipeline() as pipe:
            pipe.incr(full)
            pipe.expire(full, ttl)
            count, _ = pipe.execute()
        return int(count)

    def note_in_doubt(self, finished: dict[str, str], ttl: int) -> None:
        """Task ids whose recording commit may have happened (the connection was lost during COMMIT),
        each with the ``finished_at`` that commit would have written (``app.refresh.write``)."""
        with self.r.pipeline() as pipe:
            for task_id, at in finished.items():
                pipe.set(f"{self.prefix}:indoubt:{task_id}", at, ex=ttl)
            pipe.execute()

    def peek_in_doubt(self, task_ids: Sequence[str]) -> dict[str, str]:
        """The noted ones among ``task_ids``, with their ``finished_at``."""
        found = self.r.mget([f"{self.prefix}:indoubt:{t}" for t in task_ids])
        return {
            t: v.decode() if isinstance(v, bytes) else v for t, v in zip(task_ids, found, strict=True) if v
        }

    def take_in_doubt(self, task_ids: Sequence[str]) -> set[str]:
        """Remove the notes; the task ids whose note this call removed (one taker each)."""
        with self.r.pipeline() as pipe:
            for task_id in task_ids:
                pipe.delete(f"{self.prefix}:indoubt:{task_id}")
            removed = pipe.execute()
        return {t for t, n in zip(task_ids, removed, strict=True) if n}

    def acquire_call(self) -> float:
        if self.rate_limit <= 0:
            return 0.0
        # The limit is per second; fractional limits widen the window instead.
        limit = max(1, int(self.rate_limit))
        window = int(WINDOW_MS * limit / self.rate_limit) + GUARD_MS
        ms = int(
            self._acquire(keys=[f"{self.prefix}:ratelimit:powens"], args=[limit, window, uuid.uuid4().hex])
        )
        return ms / 1000.0


def _pack_error(err: RefreshError) -> str:
    return dumps({"reason": err.reason.value, "message": err.message, "retry_after": err.retry_after})


def _unpack_error(raw: bytes | str) -> RefreshError:
    e = loads(raw)
    ra = e.get("retry_after")
    return RefreshError(Reason(e["reason"]), e["message"], retry_after=float(ra) if ra is not None else None)


class LocalCoordinator:
    """The same contract inside one process (threads), for the demo and embedded use."""

    def __init__(self, *, rate_limit: float) -> None:
        self.rate_limit = rate_limit
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._calls: deque[float] = deque()
        self._deliveries: dict[str, int] = {}
        self._in_doubt: dict[str, str] = {}

    @contextlib.contextmanager
    def account_lock(self, account_id: str, lease: float, wait: float) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(account_id, threading.Lock())
        if not lock.acquire(timeout=wait):
            raise Throttled(1.0 + wait / 2, "another refresh of this account is running")
        try:
            yield
        finally:
            lock.release()

    def shared(self, key: str, fetch: Callable[[], Any], *, ttl: int, wait: float, sharing: Sharing) -> Any:
        with self._guard:
            lock = self._locks.setdefault("shared:" + key, threading.Lock())
        with lock:
            now = time.monotonic()
            hit = self._cache.get(key)
            if hit and hit[0] > now:
                return hit[1]
            failed = self._cache.get(sharing.failure_key)
            if failed and failed[0] > now:
                raise failed[1]
            try:
                value = fetch()
            except RefreshError as err:
                self._cache[sharing.failure_key] = (now + sharing.failure_ttl, err)
                raise
            self._cache[key] = (time.monotonic() + ttl, value)
            return value

    def count_delivery(self, key: str, ttl: int) -> int:
        with self._guard:
            self._deliveries[key] = self._deliveries.get(key, 0) + 1
            return self._deliveries[key]

    def note_in_doubt(self, finished: dict[str, str], ttl: int) -> None:
        with self._guard:
            self._in_doubt.update(finished)

    def peek_in_doubt(self, task_ids: Sequence[str]) -> dict[str, str]:
        with self._guard:
            return {t: v for t in task_ids if (v := self._in_doubt.get(t)) is not None}

    def take_in_doubt(self, task_ids: Sequence[str]) -> set[str]:
        with self._guard:
            return {t for t in task_ids if self._in_doubt.pop(t, None) is not None}

    def acquire_call(self) -> float:
        if self.rate_limit <= 0:
            return 0.0
        limit = max(1, int(self.rate_limit))
        window = (WINDOW_MS * limit / self.rate_limit + GUARD_MS) / 1000
        with self._guard:
            now = time.monotonic()
            while self._calls and self._calls[0] <= now - window:
                self._calls.popleft()
            if len(self._calls) < limit:
                self._calls.append(now)
                return 0.0
            return self._calls[0] + window - now


_lock = threading.Lock()
_coordinators: dict[tuple[str, str, float], Coordinator] = {}


def get_coordinator(settings: Settings) -> Coordinator:
    key = (settings.coordination, settings.redis_url, settings.powens_rate_limit)
    with _lock:
        coord = _coordinators.get(key)
        if coord is None:
            if settings.coordination == "local":
                coord = LocalCoordinator(rate_limit=settings.powens_rate_limit)
            else:
                client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
                secret = settings.signing_key.get_secret_value() if settings.signing_key is not None else None
                coord = RedisCoordinator(
                    client, rate_limit=settings.powens_rate_limit, seal_keys=keys_from(secret)
                )
            _coordinators[key] = coord
        return coord


def reset_coordinators() -> None:
    """After fork: a Redis connection pool must not be shared by two processes."""
    with _lock:
        _coordinators.clear()
