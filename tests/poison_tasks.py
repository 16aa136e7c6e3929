"""Poison messages for a test worker (loaded with ``--include tests.poison_tasks``): work that kills
its worker process every time it runs, as an out-of-memory kill would.

- ``tests.poison``: a task that counts its runs in Redis, then dies.
- with ``POISON_ACCOUNT`` set, the worker dies in the middle of refreshing that account (injected
  around the handler the refresh task calls), so the service's own refresh task meets the fault.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import redis

from app.celery import app
from app.worker import tasks


@app.task(name="tests.poison")
def poison(counter_url: str, key: str) -> None:
    redis.Redis.from_url(counter_url).incr(key)  # count the runs, then die as an OOM kill would
    os.kill(os.getpid(), signal.SIGKILL)


_execute = tasks.execute


def _dying_execute(raw_input: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(raw_input, dict) and raw_input.get("accountId") == os.environ.get("POISON_ACCOUNT"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _execute(raw_input, *args, **kwargs)


if os.environ.get("POISON_ACCOUNT"):
    tasks.execute = _dying_execute  # type: ignore[assignment]
