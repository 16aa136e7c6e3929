"""Which exceptions mean our own infrastructure failed — the database, Redis, the broker — not the work.

Such a failure says nothing about the account being refreshed: the task is re-queued with backoff and
tries again (a refresh does not count it as an attempt); it is never an acknowledged failure, and never
classified ``internal`` (a bug). Integrity and data errors are not in the list: they are about the data.
"""

from __future__ import annotations

import kombu.exceptions
import redis.exceptions
import sqlalchemy.exc

INFRA_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,  # connection refused/reset, server restarting, SQLite busy
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    sqlalchemy.exc.TimeoutError,  # no connection free in the pool in time
    # PostgreSQL's class 25 and XX: a read-only replica after a failover, an idle transaction killed.
    sqlalchemy.exc.InternalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after a failover
    redis.exceptions.OutOfMemoryError,  # maxmemory reached: it clears as consumers catch up
    kombu.exceptions.OperationalError,  # the broker
    ConnectionError,  # the OS said so (refused, reset, aborted)
)


def is_infrastructure(exc: BaseException) -> bool:
    return isinstance(exc, INFRA_ERRORS)
