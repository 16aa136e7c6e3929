"""A task whose every run kills its worker process: a poison message, loaded into a test worker
with ``--include tests.poison_tasks``."""

from __future__ import annotations

import os
import signal

import redis

from app.celery import app


@app.task(name="tests.poison")
def poison(counter_url: str, key: str) -> None:
    redis.Redis.from_url(counter_url).incr(key)  # count the runs, then die as an OOM kill would
    os.kill(os.getpid(), signal.SIGKILL)
