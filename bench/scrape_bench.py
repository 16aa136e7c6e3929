"""Benchmark of the beat's /metrics at scale: what a scrape costs the beat and the database (not run by
`make test`; docs/performance.md "The beat's gauges").

One invocation, on a throwaway PostgreSQL database (created, migrated with ``app.store.migrate.upgrade``,
dropped at the end, on an error, Ctrl-C or SIGTERM too):

1. Seeds ``--accounts`` accounts with SQL (``generate_series``; seeded ``random()``, so the same rows
   every time): ``--accounts-per-connection`` accounts per connection, ``--connections-per-user``
   connections per Powens user, ``--users-per-tenant`` users per tenant; one user in 50 unlinked (its
   accounts ``unlinked``); 3 % of connections inactive; 85 % of connections without a state, 5 % in a
   transient one (since 0-10 days), 8 % in one that needs the user, 2 % in states no list knows;
   consents ending from 20 days ago to 150 days ahead (15 % unknown); accounts 94 % active, 3 %
   disabled, 3 % deleted; bank data under a day old for 70 %, 1-3 days 15 %, 3-7 days 8 %, older 5 %,
   never 2 %. Then ``VACUUM ANALYZE``.
2. The aggregate: ``app.reports.attention.service_counts`` in this process, ``--repeats`` times (wall
   time of each); three more with parallel workers off, reading the backend's CPU time in /proc (the
   database's cost of one computation; the server's total would count other databases' work); and
   each of its statements under ``EXPLAIN (ANALYZE, BUFFERS)`` (plan shape, time).
   With ``--try-index``: again with a partial index on the active accounts' ``powens_last_update``
   (created, measured, dropped: what an index-only scan would buy).
3. The beat: a real ``celery -A app beat`` (RedBeat on ``--redis``, metrics on a free port,
   ``BALANCES_GAUGE_REFRESH_SECONDS=--refresh-seconds``), started from this checkout and, with
   ``--before REV``, from the tree of that git revision (``git archive`` into a temporary directory,
   run against the same database). Once its /metrics carries the counts, ``--scrapes`` scrapes
   ``--scrape-interval`` seconds apart: scrape latency, the beat's RSS sampled every 0.1 s
   (``steady``: the median of the second half), its kernel high-water mark (VmHWM: the peak of its
   whole life, start-up included), its CPU seconds, and the computations seen (distinct values of
   ``balances_service_gauges_computed_timestamp_seconds``; with code that has no such gauge, every
   scrape computes).

Results: a JSON file (``--out``, default bench/results/scrape-<accounts>-<UTC time>.json, and
bench/results/latest-scrape.json) and a markdown table on stdout; progress on stderr.

    python -m bench.scrape_bench --accounts 1000000
    python -m bench.scrape_bench --accounts 100000 --before a90d304
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
from sqlalchemy import event, text

from app.config import Settings, load_settings
from app.reports.attention import service_counts
from app.store.db import get_engine, session_scope
from app.store.migrate import upgrade
from app.store.secrets import TokenCipher, generate_key
from bench.nightly_bench import drop_db, fresh_db, log, machine_facts, shielded
from tests.support.metrics import samples
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REDIS_URL = os.environ.get("BALANCES_SCRAPE_BENCH_REDIS", "redis://127.0.0.1:6379/11")
SIGNING_KEY = "scrape-bench-" + os.urandom(24).hex()
CLK = os.sysconf("SC_CLK_TCK")
COMPUTED = "balances_service_gauges_computed_timestamp_seconds"
TRANSIENT = ("validating", "rateLimiting", "websiteUnavailable", "bug")
USER_ACTION = ("SCARequired", "webauthRequired", "wrongpass", "passwordExpired", "actionNeeded", "decoupled")
UNKNOWN = ("notSupported", "somethingPowensAddsLater")


# -- seeding -------------------------------------------------------------------------------------------


SEED = {
    "tenants": """
        INSERT INTO tenants (id, name, active, created_at)
        SELECT 't-' || lpad(g::text, 6, '0'), 'tenant ' || g, true, now()
        FROM generate_series(0, %(tenants)s::int - 1) g""",
    "powens_users": """
        INSERT INTO powens_users (id, tenant_id, powens_user_id, token_encrypted, unlinked_at,
                                  created_at, updated_at)
        SELECT g, 't-' || lpad(((g - 1) / %(upt)s::int)::text, 6, '0'), 100000000 + g,
               CASE WHEN mod(g, 50) = 0 THEN NULL ELSE %(token)s END,
               CASE WHEN mod(g, 50) = 0 THEN now() - interval '30 days' END,
               now() - interval '400 days', now() - random() * interval '30 days'
        FROM generate_series(1, %(users)s::int) g""",
    "bank_connections": """
        INSERT INTO bank_connections (id, tenant_id, powens_user_pk, external_id, id_connector, state,
                                      error_message, last_update, next_try, active, state_since,
                                      consent_expires_at, created_at, updated_at)
        SELECT 'con_' || md5(c.g::text), 't-' || lpad(((c.u - 1) / %(upt)s::int)::text, 6, '0'), c.u,
               500000000 + c.g, 1 + floor(c.r4 * 300)::int, c.state,
               CASE WHEN c.state IS NOT NULL THEN 'The bank says: ' || c.state END,
               now() - c.r4 * interval '3 days', now() + c.r4 * interval '1 day', c.r2 >= 0.03,
               CASE WHEN c.state IS NOT NULL THEN now() - c.r3 * interval '10 days' END,
               CASE WHEN c.r5 >= 0.15 THEN now() + (c.r5 * 200 - 50) * interval '1 day' END,
               now() - interval '400 days', now() - c.r4 * interval '1 day'
        FROM (
            SELECT g, (g - 1) / %(cpu)s::int + 1 AS u, r2, r3, r4, r5,
                   CASE WHEN r1 < 0.85 THEN NULL
                        WHEN r1 < 0.90 THEN (%(transient)s::text[])[
                            1 + floor((r1 - 0.85) / 0.05 * cardinality(%(transient)s::text[]))::int]
                        WHEN r1 < 0.98 THEN (%(user_action)s::text[])[
                            1 + floor((r1 - 0.90) / 0.08 * cardinality(%(user_action)s::text[]))::int]
                        ELSE (%(unknown)s::text[])[
                            1 + floor((r1 - 0.98) / 0.02 * cardinality(%(unknown)s::text[]))::int]
                   END AS state
            FROM (SELECT g, random() r1, random() r2, random() r3, random() r4, random() r5
                  FROM generate_series(1, %(connections)s::int) g) s
        ) c""",
    "bank_accounts": """
        INSERT INTO bank_accounts (id, tenant_id, powens_user_pk, connection_id, external_id, name,
                                   original_name, account_type, usage, currency, iban_masked, bic,
                                   number_masked, status, status_at, balance, coming, powens_last_update,
                                   last_refreshed_at, pushed_at, last_synced_at, created_at, updated_at)
        SELECT 'acc_' || md5(a.g::text), 't-' || lpad(((a.u - 1) / %(upt)s::int)::text, 6, '0'), a.u,
               'con_' || md5(a.c::text), 700000000 + a.g, 'Compte ' || a.g, 'COMPTE CHEQUE ' || a.g,
               (%(account_types)s::text[])[
                            1 + floor(a.r2 * cardinality(%(account_types)s::text[]))::int], 'PRIV',
               CASE WHEN a.r3 < 0.95 THEN 'EUR' ELSE 'USD' END,
               'FR76' || repeat('*', 19) || lpad(mod(a.g, 10000)::text, 4, '0'), 'BNPAFRPPXXX',
               repeat('*', 7) || lpad(mod(a.g, 10000)::text, 4, '0'),
               CASE WHEN mod(a.u, 50) = 0 THEN 'unlinked' WHEN a.r1 < 0.94 THEN 'active'
                    WHEN a.r1 < 0.97 THEN 'disabled' ELSE 'deleted' END,
               now() - a.r3 * interval '100 days', round((a.r2 * 20000 - 2000)::numeric, 2),
               CASE WHEN a.r3 < 0.3 THEN round((a.r3 * -300)::numeric, 2) END,
               CASE WHEN a.r4 < 0.70 THEN now() - a.r5 * interval '1 day'
                    WHEN a.r4 < 0.85 THEN now() - (1 + a.r5 * 2) * interval '1 day'
                    WHEN a.r4 < 0.93 THEN now() - (3 + a.r5 * 4) * interval '1 day'
                    WHEN a.r4 < 0.98 THEN now() - (7 + a.r5 * 200) * interval '1 day' END,
               now() - a.r5 * interval '1 day',
               CASE WHEN a.r2 < 0.5 THEN now() - a.r3 * interval '1 day' END,
               now() - a.r5 * interval '1 day', now() - interval '400 days',
               now() - a.r5 * interval '1 day'
        FROM (SELECT g, (g - 1) / %(apc)s::int + 1 AS c, ((g - 1) / %(apc)s::int) / %(cpu)s::int + 1 AS u,
                     random() r1, random() r2, random() r3, random() r4, random() r5
              FROM generate_series(1, %(accounts)s::int) g) a""",
}


def seed(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The rows, written by the database itself (a million accounts in about a minute)."""
    apc, cpu, upt = args.accounts_per_connection, args.connections_per_user, args.users_per_tenant
    accounts = args.accounts
    connections = -(-accounts // apc)
    users = -(-connections // cpu)
    tenants = -(-users // upt)
    params = {
        "accounts": accounts,
        "connections": connections,
        "users": users,
        "tenants": tenants,
        "apc": apc,
        "cpu": cpu,
        "upt": upt,
        "token": TokenCipher.from_settings(settings).encrypt("bench-token"),
        "transient": list(TRANSIENT),
        "user_action": list(USER_ACTION),
        "unknown": list(UNKNOWN),
        "account_types": ["checking", "savings", "card", "loan"],
    }
    timings: dict[str, float] = {}
    with psycopg.connect(_libpq(settings.database_url)) as conn:
        conn.execute("SELECT setseed(0.42)")
        for table, sql in SEED.items():
            t0 = time.perf_counter()
            conn.execute(sql, params)  # type: ignore[arg-type]
            timings[f"{table}_s"] = round(time.perf_counter() - t0, 2)
            log(f"  {table}: {timings[f'{table}_s']} s")
    t0 = time.perf_counter()
    with psycopg.connect(_libpq(settings.database_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    timings["vacuum_analyze_s"] = round(time.perf_counter() - t0, 2)
    with psycopg.connect(_libpq(settings.database_url)) as conn:
        sizes = {}
        for table in ("bank_accounts", "bank_connections", "powens_users"):
            row = conn.execute("SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))", (table,))
            sizes[table] = row.fetchone()[0]  # type: ignore[index]
    return {
        "tenants": tenants,
        "powens_users": users,
        "connections": connections,
        "accounts": accounts,
        "timings": timings,
        "table_sizes": sizes,
    }


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


# -- the aggregate, in this process -------------------------------------------------------------------


@contextlib.contextmanager
def captured(settings: Settings) -> Iterator[list[tuple[str, Any]]]:
    """The statements (with their parameters) this process sends while inside."""
    seen: list[tuple[str, Any]] = []
    engine = get_engine(settings)

    def grab(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", grab)


def _plan_nodes(plan: dict[str, Any]) -> list[str]:
    name = plan["Node Type"] + (f" on {plan['Relation Name']}" if "Relation Name" in plan else "")
    if plan.get("Index Name"):
        name += f" using {plan['Index Name']}"
    out = [name]
    for child in plan.get("Plans", ()):
        out += _plan_nodes(child)
    return out


def aggregate(settings: Settings, repeats: int) -> dict[str, Any]:
    """``service_counts`` as the beat runs it, ``repeats`` times; then each statement explained."""
    times = []
    counts = None
    for _ in range(repeats):
        now = datetime.now(UTC)
        with captured(settings) as statements, session_scope(settings) as session:
            t0 = time.perf_counter()
            counts = service_counts(session, settings, now)
            times.append(round(time.perf_counter() - t0, 4))
    backend_cpu = []
    for _ in range(3):  # the database's CPU: one backend, no parallel workers, so /proc has it all
        with session_scope(settings) as session:
            session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            cpu0 = proc_cpu(pid)
            service_counts(session, settings, datetime.now(UTC))
            backend_cpu.append(round(proc_cpu(pid) - cpu0, 3))
    plans = []
    with session_scope(settings) as session:
        raw = session.connection().connection.dbapi_connection
        assert raw is not None
        for sql, params in statements:
            with raw.cursor() as cur:  # type: ignore[attr-defined]
                cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
                doc = cur.fetchone()[0][0]
            top = doc["Plan"]
            plans.append(
                {
                    "nodes": _plan_nodes(top),
                    "execution_ms": round(doc["Execution Time"], 1),
                    "shared_hit_blocks": top.get("Shared Hit Blocks"),
                    "shared_read_blocks": top.get("Shared Read Blocks"),
                    "rows_out": top.get("Actual Rows"),
                }
            )
    assert counts is not None
    return {
        "repeats_s": times,
        "median_s": round(statistics.median(times), 4),
        "postgres_cpu_s": backend_cpu,  # of the backend, with parallel workers off
        "counts": {
            "ages": counts.ages,
            "needing": counts.needing,
            "expiring": counts.expiring,
            "connections": counts.connections,
        },
        "statements": plans,
    }


def with_index(settings: Settings, repeats: int) -> dict[str, Any]:
    """The same with an index an index-only scan could use, then dropped again."""
    ddl = (
        "CREATE INDEX bench_active_last_update ON bank_accounts (powens_last_update) WHERE status = 'active'"
    )
    with psycopg.connect(_libpq(settings.database_url), autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute(ddl)
        conn.execute("VACUUM ANALYZE bank_accounts")
        built = round(time.perf_counter() - t0, 2)
        size = conn.execute("SELECT pg_size_pretty(pg_relation_size('bench_active_last_update'))").fetchone()
    try:
        out = aggregate(settings, repeats)
    finally:
        with psycopg.connect(_libpq(settings.database_url), autocommit=True) as conn:
            conn.execute("DROP INDEX IF EXISTS bench_active_last_update")
    return {"index": ddl, "build_and_vacuum_s": built, "size": size[0] if size else None, **out}


# -- the beat ------------------------------------------------------------------------------------------


def proc_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def proc_cpu(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.1) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.every = pid, every
        self.values: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            kb = proc_kb(self.pid, "VmRSS:")
            if kb:
                self.values.append(kb)

    def stop(self) -> list[int]:
        self.stop_event.set()
        self.join(timeout=5)
        return self.values


def code_tree(rev: str, into: Path) -> Path:
    """The files of ``rev`` (git archive), where a beat can run them."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def beat(
    settings: Settings, code: Path, label: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """A real beat from ``code``; scraped ``args.scrapes`` times once it serves the counts."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "DATABASE_URL": settings.database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "BALANCES_ENCRYPTION_KEY": settings.encryption_key.get_secret_value(),  # type: ignore[union-attr]
        "BALANCES_SIGNING_KEY": SIGNING_KEY,
        "BALANCES_METRICS_PORT": str(port),
        "BALANCES_METRICS_DIR": str(workdir / f"metrics-{label}"),
        "BALANCES_GAUGE_REFRESH_SECONDS": str(args.refresh_seconds),
        "BALANCES_LOG_LEVEL": "WARNING",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    argv = [sys.executable, "-m", "celery", "-A", "app", "beat", "--loglevel", "WARNING"]
    argv += ["-s", str(workdir / f"celerybeat-schedule-{label}")]
    redis.Redis.from_url(REDIS_URL).flushdb()
    logfile = workdir / f"beat-{label}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=code, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        t0 = time.perf_counter()
        first = None
        while first is None:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"beat {label} exited with {proc.returncode}: {logfile.read_text()[-2000:]}"
                )
            if time.perf_counter() - t0 > args.start_timeout:
                raise RuntimeError(f"beat {label}: no counts on /metrics after {args.start_timeout} s")
            with contextlib.suppress(requests.RequestException):
                body = requests.get(url, timeout=120).text
                if "openbanking_connections " in body or "openbanking_connections{" in body:
                    first = body
            if first is None:
                time.sleep(0.2)
        ready_s = time.perf_counter() - t0
        app_file = subprocess.run(
            [sys.executable, "-c", "import app, sys; sys.stdout.write(app.__file__)"],
            cwd=code,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        idle_kb = proc_kb(proc.pid, "VmRSS:")
        sampler = RssSampler(proc.pid)
        sampler.start()
        cpu0 = proc_cpu(proc.pid)
        latencies, computed_at, durations = [], set(), set()
        t_phase = time.perf_counter()
        for _ in range(args.scrapes):
            t = time.perf_counter()
            body = requests.get(url, timeout=120).text
            latencies.append(time.perf_counter() - t)
            parsed = samples(body)
            at = parsed.get((COMPUTED, ()))
            if at is not None:
                computed_at.add(at)
                durations.add(parsed.get(("balances_service_gauges_compute_duration_seconds", ())))
            time.sleep(args.scrape_interval)
        phase_s = time.perf_counter() - t_phase
        cpu_s = proc_cpu(proc.pid) - cpu0
        rss = sampler.stop()
        hwm_kb = proc_kb(proc.pid, "VmHWM:")
        end_kb = proc_kb(proc.pid, "VmRSS:")
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        redis.Redis.from_url(REDIS_URL).flushdb()
    ordered = sorted(latencies)
    half = rss[len(rss) // 2 :] or rss
    computations = len(computed_at) if computed_at else args.scrapes
    return {
        "code": label,
        "app_imported_from": app_file,
        "ready_s": round(ready_s, 2),
        "scrapes": args.scrapes,
        "scrape_interval_s": args.scrape_interval,
        "phase_s": round(phase_s, 1),
        "scrape_s": {
            "p50": round(statistics.median(ordered), 4),
            "p95": round(ordered[int(0.95 * (len(ordered) - 1))], 4),
            "max": round(ordered[-1], 4),
            "mean": round(statistics.fmean(ordered), 4),
        },
        "computations": computations,
        "compute_duration_s": sorted(round(d, 4) for d in durations if d is not None),
        "rss_mib": {
            "idle_before_scrapes": round(idle_kb / 1024, 1),
            "steady": round(statistics.median(half) / 1024, 1) if half else None,
            "max_sampled": round(max(rss) / 1024, 1) if rss else None,
            "end": round(end_kb / 1024, 1),
            "peak_vmhwm": round(hwm_kb / 1024, 1),
        },
        "beat_cpu_s": round(cpu_s, 2),
        "beat_cpu_ms_per_scrape": round(cpu_s * 1000 / args.scrapes, 1),
    }


# -- the report ----------------------------------------------------------------------------------------


def render(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["seeded"]
    lines = [
        f"### Beat scrape benchmark, {res['started_at']}",
        "",
        f"commit {m['git_commit']}{' (+ uncommitted changes)' if m['git_dirty'] else ''}; {m['nproc']} x "
        f"{m['cpu_model']}; PostgreSQL {m['postgresql'].get('server_version')}",
        "",
        f"{s['accounts']:,} accounts, {s['connections']:,} connections, {s['powens_users']:,} Powens users, "
        f"{s['tenants']:,} tenants (tables: {s['table_sizes']}); seeded in "
        f"{sum(s['timings'].values()):.0f} s",
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    a = res["aggregate"]
    lines.append(
        f"| one computation of the counts (this process) | median {a['median_s'] * 1000:,.0f} ms "
        f"({', '.join(f'{t * 1000:,.0f}' for t in a['repeats_s'])} ms); PostgreSQL CPU "
        f"{', '.join(f'{t * 1000:,.0f}' for t in a['postgres_cpu_s'])} ms (one backend, serial) |"
    )
    for st in a["statements"]:
        lines.append(f"| &nbsp; statement | {st['execution_ms']:,.0f} ms: {' > '.join(st['nodes'])} |")
    if "with_index" in res:
        i = res["with_index"]
        lines.append(
            f"| with a partial index on the active accounts' last update ({i['size']}) | median "
            f"{i['median_s'] * 1000:,.0f} ms; accounts: {' > '.join(i['statements'][0]['nodes'])} |"
        )
    for b in res["beats"]:
        r = b["rss_mib"]
        lines.append(
            f"| beat `{b['code']}`: {b['scrapes']} scrapes, {b['computations']} computations | scrape p50 "
            f"{b['scrape_s']['p50'] * 1000:,.1f} ms, p95 {b['scrape_s']['p95'] * 1000:,.1f} ms, max "
            f"{b['scrape_s']['max'] * 1000:,.0f} ms; RSS idle {r['idle_before_scrapes']} MiB, steady "
            f"{r['steady']} MiB, peak {r['peak_vmhwm']} MiB; beat CPU {b['beat_cpu_ms_per_scrape']} ms "
            f"per scrape |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scrape_bench", description=__doc__.split("\n")[0])
    p.add_argument("--accounts", type=int, default=100_000)
    p.add_argument("--accounts-per-connection", type=int, default=2)
    p.add_argument("--connections-per-user", type=int, default=2)
    p.add_argument("--users-per-tenant", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5, help="computations timed in this process")
    p.add_argument("--try-index", action="store_true", help="also measure with a partial index (dropped)")
    p.add_argument("--before", metavar="REV", help="also run a beat from this git revision's tree")
    p.add_argument("--scrapes", type=int, default=60)
    p.add_argument("--scrape-interval", type=float, default=0.5, help="seconds between scrapes")
    p.add_argument(
        "--refresh-seconds", type=float, default=5.0, help="the beat's BALANCES_GAUGE_REFRESH_SECONDS"
    )
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    db_index = int(redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("db", 0))
    if db_index == 13:
        print("BALANCES_SCRAPE_BENCH_REDIS points at db 13, the test suite's: refused", file=sys.stderr)
        return 2
    started = datetime.now(UTC)
    res: dict[str, Any] = {
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench.scrape_bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_facts(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    name, url = fresh_db()
    workdir = Path(tempfile.mkdtemp(prefix="scrape-bench-"))
    log(f"database {name}, work directory {workdir}")
    try:
        settings = load_settings(
            database_url=url, celery_broker_url=REDIS_URL, encryption_key=generate_key(), metrics_port=0
        )
        upgrade(settings)
        log(f"seeding {args.accounts:,} accounts")
        res["seeded"] = seed(settings, args)
        log(f"seeded: {res['seeded']}")
        res["aggregate"] = aggregate(settings, args.repeats)
        log(f"aggregate: {res['aggregate']}")
        if args.try_index:
            res["with_index"] = with_index(settings, args.repeats)
            log(f"with an index: {res['with_index']}")
        trees = [("this checkout", ROOT)]
        if args.before:
            rev = subprocess.run(
                ["git", "rev-parse", "--short", args.before],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            trees.append((f"before ({rev})", code_tree(rev, workdir / f"code-{rev}")))
        res["beats"] = []
        for label, code in trees:
            log(f"beat from {label}")
            res["beats"].append(beat(settings, code, label, args, workdir))
            log(f"beat {label}: {res['beats'][-1]}")
    finally:
        with shielded():
            get_engine_dispose(url)
            drop_db(name)
            shutil.rmtree(workdir, ignore_errors=True)
            log(f"dropped {name}")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"scrape-{args.accounts}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2, default=float) + "\n"  # EXPLAIN numbers arrive as Decimal
    out.write_text(text)
    (RESULTS / "latest-scrape.json").write_text(text)
    print(render(res))
    log(f"results: {out}")
    return 0


def get_engine_dispose(url: str) -> None:
    """Close this process's pooled connections before the database is dropped."""
    with contextlib.suppress(Exception):
        get_engine(load_settings(database_url=url)).dispose()


if __name__ == "__main__":
    sys.exit(main())
