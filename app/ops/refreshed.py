"""A value computed at most once per period, off the caller's thread: the beat's service gauges.

Why (docs/design.md "Observability"): those gauges are aggregates over every account and connection
(a fraction of a second at a million accounts, more as the service grows), while Prometheus scrapes
every 15-30 s, an HA pair of Prometheus twice, and the liveness probe reads /metrics too. So the
number of computations must not follow the number of scrapes, and a scrape must not wait for one:

- ``latest()`` answers at once with the last value and, when the last computation started a period
  ago or more and none is running, starts one on a thread of its own: at most one computation per
  period, however many callers ask and however often.
- Only the process's first computation is waited for, by callers that find nothing to answer yet
  (the first scrape), and only until ``wait`` seconds after it started: a database that hangs must not
  make every scrape time out (the beat would then look down, not merely without its counts).
- A computation that fails keeps the last value (its time says how old it is) and is tried again a
  period later, not at every scrape; the failure is logged.

The clock and the way a computation is started are given at construction, so these rules are tested
without sleeping (``tests/test_service_gauges.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Computed(Generic[T]):
    value: T
    at: float  # Unix time at which the computation started: the moment the value describes
    seconds: float  # how long the computation took


def on_thread(name: str) -> Callable[[Callable[[], None]], None]:
    """Start each computation on a daemon thread of its own (it never keeps a process alive)."""

    def spawn(work: Callable[[], None]) -> None:
        threading.Thread(target=work, name=name, daemon=True).start()

    return spawn


class Refreshed(Generic[T]):
    """``compute(at)`` (``at``: the clock's time when it starts) at most every ``every`` seconds."""

    def __init__(
        self,
        name: str,
        compute: Callable[[float], T],
        every: float,
        *,
        clock: Callable[[], float] = time.time,
        spawn: Callable[[Callable[[], None]], None] | None = None,
        wait: float = 10.0,
    ) -> None:
        self.name = name
        self.every = every
        self.wait = wait
        self._compute = compute
        self._clock = clock
        self._spawn = spawn or on_thread(f"refresh-{name.replace(' ', '-')}")
        self._cond = threading.Condition()
        self._last: Computed[T] | None = None
        self._running = False
        self._started: float | None = None  # when the last computation started, whatever its end
        self._first_until: float | None = None  # monotonic deadline of waits for the first computation

    def start_if_due(self) -> bool:
        """Start a computation when one is due and none is running; never waits. True if started."""
        with self._cond:
            now = self._clock()
            # A clock that went backwards (now before the last start) makes one due as well.
            due = self._started is None or not 0 <= now - self._started < self.every
            if self._running or not due:
                return False
            if self._started is None:
                self._first_until = time.monotonic() + self.wait
            self._running = True
            self._started = now
        self._spawn(lambda: self._run(now))
        return True

    def latest(self) -> Computed[T] | None:
        """The last value computed (None before the first success), starting a computation if due."""
        self.start_if_due()
        with self._cond:
            if self._last is None and self._running and self._first_until is not None:
                left = self._first_until - time.monotonic()
                self._cond.wait_for(lambda: not self._running, timeout=max(0.0, left))
            return self._last

    def _run(self, started: float) -> None:
        result: Computed[T] | None = None
        try:
            value = self._compute(started)
            result = Computed(value, started, max(0.0, self._clock() - started))
        except Exception:
            log.warning(
                "%s: computation failed; the last values stay, tried again later", self.name, exc_info=True
            )
        finally:
            with self._cond:
                self._running = False
                self._first_until = None  # whatever its end: later computations are not waited for
                if result is not None:
                    self._last = result
                self._cond.notify_all()
