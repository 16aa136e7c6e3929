"""Engine and sessions, one engine per process (a pooled connection must never cross fork)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings

_lock = threading.Lock()
_engines: dict[tuple[int, str, bool], Engine] = {}
_factories: dict[tuple[int, str, bool], sessionmaker[Session]] = {}


def make_engine(url: str, **kwargs: Any) -> Engine:
    # JSON columns keep money exact: Decimal in, Decimal out (no float on the way).
    from app.jsonio import dumps, loads

    kwargs.setdefault("json_serializer", dumps)
    kwargs.setdefault("json_deserializer", loads)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # The driver would start a transaction only at the first write, so what a transaction read
            # before it (the rows ``app.refresh.write`` decides against) could change under it. The
            # transaction starts here instead, and takes the database's write lock at once: SQLite's
            # one writer at a time is its row lock (SQLAlchemy's documented pysqlite recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 5)
    engine = create_engine(url, **kwargs)
    _count_statements(engine)
    return engine


def _count_statements(engine: Engine) -> None:
    """``balances_db_statements_total``: what the database executes (the cost model's unit). Imported
    here, at the first engine of the process: after the worker chose its metrics directory."""
    from app.ops.metrics import DB_STATEMENTS

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, _stmt: str, params: Any, _ctx: Any, executemany: bool) -> None:
        DB_STATEMENTS.inc(len(params) if executemany and params else 1)


def get_engine(settings: Settings) -> Engine:
    key = (os.getpid(), settings.database_url, settings.db_prepared_statements)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            extra: dict[str, Any] = {}
            if not settings.db_prepared_statements and not settings.database_url.startswith("sqlite"):
                # Behind PgBouncer in transaction mode a prepared statement may meet another server
                # connection: psycopg then never prepares (its default prepares a query run 5 times).
                extra["connect_args"] = {"prepare_threshold": None}
            engine = make_engine(settings.database_url, **extra)
            _engines[key] = engine
        return engine


def session_factory(settings: Settings) -> sessionmaker[Session]:
    key = (os.getpid(), settings.database_url, settings.db_prepared_statements)
    engine = get_engine(settings)
    with _lock:
        factory = _factories.get(key)
        if factory is None:
            factory = sessionmaker(engine, expire_on_commit=False)
            _factories[key] = factory
        return factory


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = session_factory(settings)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def dispose_after_fork() -> None:
    """Forget engines inherited from the parent without closing the parent's sockets."""
    with _lock:
        pid = os.getpid()
        for key, engine in list(_engines.items()):
            if key[0] != pid:
                engine.dispose(close=False)
                del _engines[key]
                _factories.pop(key, None)


def rowcount(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (typed: Session.execute returns the base Result type)."""
    return int(getattr(result, "rowcount", 0) or 0)
