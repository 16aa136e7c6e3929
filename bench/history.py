"""A service's history, seeded in SQL (``generate_series``) for the steady-state benchmark: millions of
rows in minutes, where the ORM or COPY from Python would take hours or the memory of the machine.

- ``seed_accounts``: tenants, Powens users, connections and accounts (``users`` users with
  ``per_user`` accounts each, ``users_per_tenant`` per tenant), ids made from numbers so that nothing
  passes through Python. ``active=False`` makes their tenants inactive: rows a nightly run does not
  refresh, that still sit in every table and index it reads (the accounts of a 1 M-account service
  beside the 100,000 a run refreshes).
- ``seed_history``: ``days`` past days of snapshots (every account, one per day: the table grows by one
  row per account per day, kept forever), and, for the last ``item_days`` of them, a completed nightly
  run with its tenants, items and audit rows (what retention keeps).
"""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg

# Every statement runs server-side; the session settings only speed the load of a throwaway database.
_FAST = ("SET synchronous_commit = off", "SET maintenance_work_mem = '512MB'", "SET work_mem = '256MB'")


def _connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True)
    for setting in _FAST:
        conn.execute(setting)
    return conn


def seed_accounts(
    url: str,
    *,
    first_user: int,
    users: int,
    per_user: int,
    users_per_tenant: int,
    prefix: str,
    active: bool,
    token: bytes,
) -> dict[str, float]:
    """Rows for users ``first_user`` .. ``first_user + users - 1``. Returns the seconds each table took."""
    took: dict[str, float] = {}
    last = first_user + users - 1
    now = datetime.now(UTC)
    with _connect(url) as conn:
        steps = {
            "tenants": (
                "INSERT INTO tenants (id, name, active, created_at) "
                "SELECT %(p)s || lpad(t::text, 7, '0'), 'history ' || t, %(active)s, %(now)s "
                "FROM generate_series(%(first)s / %(upt)s, %(last)s / %(upt)s) t ON CONFLICT DO NOTHING"
            ),
            "powens_users": (
                "INSERT INTO powens_users (id, tenant_id, powens_user_id, token_encrypted, created_at, "
                "updated_at) SELECT u, %(p)s || lpad((u / %(upt)s)::text, 7, '0'), 10000000 + u, %(token)s, "
                "%(now)s, %(now)s "
                "FROM generate_series(%(first)s, %(last)s) u"
            ),
            "bank_connections": (
                "INSERT INTO bank_connections (id, tenant_id, powens_user_pk, external_id, active, "
                "created_at, updated_at) "
                "SELECT 'con_h' || u, %(p)s || lpad((u / %(upt)s)::text, 7, '0'), u, 10000000 + u, true, "
                "%(now)s, %(now)s FROM generate_series(%(first)s, %(last)s) u"
            ),
            "bank_accounts": (
                "INSERT INTO bank_accounts (id, tenant_id, powens_user_pk, connection_id, external_id, name, "
                "account_type, currency, status, balance, powens_last_update, last_refreshed_at, "
                "last_synced_at, created_at, updated_at) "
                "SELECT 'acc_h' || u || '_' || k, %(p)s || lpad((u / %(upt)s)::text, 7, '0'), u, "
                "'con_h' || u, (10000000 + u) * 100 + k, 'history ' || k, 'checking', 'EUR', 'active', "
                "round((random() * 100000)::numeric, 2), %(now)s, %(now)s, %(now)s, %(now)s, %(now)s "
                "FROM generate_series(%(first)s, %(last)s) u, generate_series(1, %(per)s) k"
            ),
        }
        params = {
            "p": prefix,
            "active": active,
            "now": now,
            "first": first_user,
            "last": last,
            "upt": users_per_tenant,
            "per": per_user,
            "token": token,
        }
        for table, sql in steps.items():
            t0 = time.perf_counter()
            conn.execute(sql, params)  # type: ignore[arg-type]
            took[table] = round(time.perf_counter() - t0, 1)
        conn.execute("SELECT setval(pg_get_serial_sequence('powens_users', 'id'), %s)", (last,))
    return took


def seed_history(url: str, *, days: int, item_days: int, today: date, log: Any = print) -> dict[str, Any]:
    """``days`` days of snapshots for every account before ``today``; a completed run with items and
    audit rows for each of the last ``item_days`` of them. Returns seconds per table. Rows go in key
    order (``ORDER BY id``): each day is one sweep through the indexes, not a million random inserts
    into indexes far larger than PostgreSQL's shared buffers (measured: 1.5 min a day of snapshots
    in random order on this machine)."""
    took: dict[str, float] = {"snapshots": 0.0, "runs": 0.0, "run_tenants": 0.0, "run_items": 0.0}
    took["refresh_attempts"] = 0.0
    with _connect(url) as conn:
        for back in range(days, 0, -1):
            day = today - timedelta(days=back)
            at = datetime(day.year, day.month, day.day, 4, 30, tzinfo=UTC)
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO balance_snapshots (account_id, tenant_id, balance_type, day, current_balance, "
                "available_balance, currency, last_updated_at, refreshed_at, carried) "
                "SELECT id, tenant_id, 'current', %(day)s, round((random() * 100000)::numeric, 2), NULL, "
                "'EUR', %(at)s, %(at)s, false FROM bank_accounts ORDER BY id",
                {"day": day, "at": at},
            )
            took["snapshots"] += time.perf_counter() - t0
            if back > item_days:
                if back % 10 == 0:
                    _progress(log, days - back + 1, days, took)
                continue
            run_id = f"run_{day:%Y%m%d}T043000_history"
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO refresh_runs (id, kind, trigger, tick, status, actor, total_tenants, "
                "total_accounts, business_day, redrives, replans, created_at, planned_at, finished_at) "
                "SELECT %(run)s, 'nightly', 'scheduled', %(tick)s, 'completed', 'system:scheduler', "
                "(SELECT count(*) FROM tenants), (SELECT count(*) FROM bank_accounts), %(day)s, 0, 0, "
                "%(at)s, %(at)s, %(at)s + interval '1 hour'",
                {"run": run_id, "tick": f"cron:{day}T04:00", "day": day, "at": at},
            )
            took["runs"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO run_tenants (run_id, tenant_id, status, expected, remaining, stale, resends, "
                "finished_at) SELECT %(run)s, tenant_id, 'done', count(*), 0, 0, 0, %(at)s "
                "FROM bank_accounts GROUP BY tenant_id",
                {"run": run_id, "at": at},
            )
            took["run_tenants"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO run_items (run_id, tenant_id, account_id, powens_user_pk, task_id, status, "
                "finished_at) SELECT %(run)s, tenant_id, id, powens_user_pk, %(run)s || ':' || id, "
                "'succeeded', %(at)s FROM bank_accounts ORDER BY id",
                {"run": run_id, "at": at},
            )
            took["run_items"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            conn.execute(
                "INSERT INTO refresh_attempts (task_id, run_id, operation, tenant_id, account_id, actor, "
                "trigger, outcome, attempts, balance_count, force_refresh, started_at, finished_at) "
                "SELECT %(run)s || ':' || id, %(run)s, 'openbanking.balances.refresh.v1.0.0', tenant_id, "
                "id, 'system:scheduler', 'scheduled', 'succeeded', 1, 1, false, %(at)s, %(at)s "
                "FROM bank_accounts ORDER BY id",
                {"run": run_id, "at": at},
            )
            took["refresh_attempts"] += time.perf_counter() - t0
            if back % 10 == 0 or back == 1:
                _progress(log, days - back + 1, days, took)
        t0 = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        took["vacuum_analyze"] = time.perf_counter() - t0
    return {k: round(v, 1) for k, v in took.items()}


def _progress(log: Any, done: int, days: int, took: dict[str, float]) -> None:
    log(f"history: {done}/{days} days ({ {k: round(v) for k, v in took.items()} } s)")


def table_sizes(url: str) -> dict[str, dict[str, int]]:
    """Rows (estimated) and bytes (table + indexes + toast) of the service's tables, partitions summed
    into their parent."""
    with _connect(url) as conn:
        rows = conn.execute(
            "SELECT coalesce(parent.relname, c.relname), sum(c.reltuples)::bigint, "
            "sum(pg_total_relation_size(c.oid))::bigint "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid "
            "LEFT JOIN pg_class parent ON parent.oid = i.inhparent "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' GROUP BY 1 ORDER BY 3 DESC"
        ).fetchall()
    return {name: {"rows": int(max(n, 0)), "bytes": int(size)} for name, n, size in rows}


def vacuum_analyze(url: str) -> None:
    """Statistics and visibility of freshly loaded tables, as a database that lived has them."""
    with _connect(url) as conn:
        conn.execute("VACUUM ANALYZE")
