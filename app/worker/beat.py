"""The beat scheduler: RedBeat (schedule and leader lock in Redis), kept alive across Redis restarts.

RedBeat installs the schedule entries once, at start-up, and extends its lock on every tick. When Redis
restarts empty (this deployment's Redis keeps nothing on disk) the lock and the entries are gone: the
leader's next extend raises and kills the beat, and a standby that takes over finds no entry, so the
nightly run and the sweeper that re-drives lost work would never fire again. Here a beat that lost its
lock tries to take it back (else it stands by), a leader re-installs missing entries, and a Redis error
in a tick is a short wait, not a crash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis
import redis.lock
from redbeat import RedBeatScheduler
from redbeat.schedulers import get_redis

log = logging.getLogger("celery.beat")
NIGHTLY_TASK = "balances.start_nightly_run"


class BalancesScheduler(RedBeatScheduler):
    lock: redis.lock.Lock | None = None

    def tick(self, min: Callable[..., float] = min, **kwargs: Any) -> float:
        try:
            if self.lock_key and not self._lead():
                return float(self.max_interval)
            self._reinstall_if_lost()
            return float(super().tick(min=min, **kwargs))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("beat: Redis unavailable (%s); trying again shortly", type(exc).__name__)
            return 1.0

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        """Send a due entry — only as the service configured it. The schedule lives in Redis, which
        anyone with broker access can write: an entry this service did not configure is deleted, not
        sent, and a configured one is sent with its configured task, arguments and options (Redis only
        says *when*), since this beat signs what it sends. The nightly tick carries the beat's own
        clock (``fired_at``): its run is keyed by the slot the beat fired, whoever runs it, whenever."""
        configured = (self.app.conf.beat_schedule or {}).get(entry.name)
        if configured is None or configured.get("task") != entry.task:
            log.error(
                "beat: schedule entry %r (task %r) is not the service's: deleted, not sent",
                entry.name,
                entry.task,
            )
            with contextlib.suppress(Exception):
                entry.delete()
            return None
        if advance:
            entry = self.reserve(entry)  # as Celery's own apply_async does, before sending
        args = list(configured.get("args") or ())
        kw = dict(configured.get("kwargs") or {})
        if entry.task == NIGHTLY_TASK:
            kw["fired_at"] = self.app.now().isoformat()
        options = dict(configured.get("options") or {})
        options["headers"] = {"celery_beat_task": True}
        return self.send_task(entry.task, args, kw, producer=producer, **options)

    def _lead(self) -> bool:
        """Whether this beat holds the leader lock, taking it back if it was lost and is free."""
        if self.lock is not None:
            try:
                self.lock.extend(int(self.lock_timeout))
                return True
            except redis.exceptions.LockError:
                log.warning("beat: the leader lock was lost (Redis restarted or it expired)")
        lock = self.lock or get_redis(self.app).lock(self.lock_key, timeout=self.lock_timeout)
        if lock.acquire(blocking=False):
            log.info("beat: Acquired lock")
            self.lock = lock
            self.setup_schedule()  # Redis may have lost the entries with the lock
            return True
        self.lock = None
        return False

    def _reinstall_if_lost(self) -> None:
        client = get_redis(self.app)
        names = self.app.redbeat_conf.schedule.keys()
        if any(not client.exists(self.Entry.generate_key(self.app, name)) for name in names):
            log.warning("beat: schedule entries missing from Redis; installing them again")
            self.setup_schedule()
