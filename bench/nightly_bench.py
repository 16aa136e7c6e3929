"""Benchmark of the nightly pipeline on this machine's PostgreSQL and Redis (not run by `make test`).

One invocation measures what issue 11 asks for, each phase on a throwaway database, a fresh in-process
Powens sandbox (``--latency-ms`` per call) and real ``celery -A app worker`` processes:

1. Planning (``--plan-accounts``, default 100,000): the planner task's body in this process; wall time,
   Python heap peak (tracemalloc), SQL statements, messages left on the broker.
2. The main run, on ``--workers`` x ``--concurrency`` (``--pool``):
   - the no-op ceiling of those very workers: N signed ``balances.noop`` messages published before
     the workers start, timed from the moment the ``refresh`` list first shrinks to the moment it is
     empty (``N / time`` tasks/s; also the 10 %-90 % slope), their executions checked in the workers'
     metrics (denials reported);
   - then the nightly run (start_run -> run completed): accounts/s and its ratio to the ceiling, Powens
     calls per user, item outcomes, SQL statements per account (``balances_db_statements_total``
     scraped from every worker before and after), CPU seconds of the worker process trees, PostgreSQL,
     Redis and this process (sandbox included), peak RSS/PSS per worker tree, peak DB connections,
     executions and mean duration of each task;
   - on-demand latency while the run is in flight: every 0.5 s one refresh of a seeded account,
     dispatch -> outcome recorded, split by the audit row's times (after 5 sequential warm-up probes
     on the idle workers, whose statement and Powens-call costs are subtracted from the run's as
     "without probes").
3. A rate-limited run (``--rate-accounts``/``--rate-users``, workers restarted with
   BALANCES_POWENS_RATE_LIMIT=``--rate-limit``): wall against bound = 1.1 x calls / R.
4. With ``--scaling``: the same smaller run on 1, 2 and 4 worker processes (``--scaling-configs``,
   default 1x1,1x2,2x2: workers x pool processes) with their own no-op ceilings.

Seeded shape: ``--accounts`` spread evenly over ``--users`` Powens users (one connection each),
``--users-per-tenant`` (10) users per tenant; rows written with COPY, then ANALYZE. A run that makes
no progress for ``--stall-timeout`` seconds is given up (nothing re-drives it: no beat runs here).
Everything started is stopped and dropped at the end, on an error, Ctrl-C or SIGTERM too.

Results: a JSON file (``--out``, default bench/results/<label>-<UTC time>.json, and
bench/results/latest-<label>.json) and a markdown table on stdout; progress on stderr. The label is
``full`` from 100,000 accounts, ``quick`` for the default sizes, ``custom`` otherwise.

    python -m bench.nightly_bench                                                   # quick
    python -m bench.nightly_bench --accounts 100000 --users 20000 --latency-ms 100  # full
    python -m bench.nightly_bench --scaling                                         # + scaling check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
import redis
import requests
from psycopg.types.json import Jsonb
from sqlalchemy import JSON, Table, func, select

from app.celery import worker_argv
from app.config import Settings, load_settings, use_settings
from app.devtools.sandbox import Knobs, Sandbox, SandboxState
from app.nightly import pipeline
from app.store import runs
from app.store.db import get_engine, session_scope
from app.store.migrate import upgrade
from app.store.models import BankAccount, BankConnection, PowensUser, RefreshRun, RunTenant, Tenant
from app.store.secrets import TokenCipher, generate_key
from app.store.states import RunStatus, TenantStatus, Trigger
from tests.support.metrics import Samples, samples
from tests.support.metrics import total as metric
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("BALANCES_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BALANCES_BENCH_REDIS", "redis://127.0.0.1:6379/12")
SIGNING_KEY = uuid.uuid4().hex + uuid.uuid4().hex
PROBE_ACTOR = "bench-operator"  # granted admin in each bench database: the on-demand probes' actor
QUICK = {"accounts": 5_000, "users": 1_000, "latency_ms": 100.0}
CLK = os.sysconf("SC_CLK_TCK")
INSERT_CHUNK = 1_000
WARMUP_PROBES = 5
OPEN = {RunStatus.PENDING.value, RunStatus.PLANNING.value, RunStatus.RUNNING.value}


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Clean-up (workers stopped, database dropped, Redis flushed) is not cut short by Ctrl-C or
    SIGTERM: a signal arriving meanwhile is raised once it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, _f: caught.append(signum)) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            raise KeyboardInterrupt(f"signal {caught[0]}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- seeding ---------------------------------------------------------------------------------------


def seed_accounts(
    settings: Settings,
    sandbox: Sandbox | None,
    *,
    users: int,
    accounts: int,
    users_per_tenant: int,
    timings: dict[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Rows straight into the store, in one transaction of bulk inserts (discovery through Powens is
    not what is measured). ``accounts`` are spread evenly over ``users`` Powens users (one connection
    each; the first ``accounts % users`` users get one more); ``users_per_tenant`` users per tenant.
    With a sandbox, each user is created there too. Returns [(tenant id, account id)]."""
    if users < 1 or accounts < users:
        raise ValueError(f"need at least one account per user ({accounts} accounts, {users} users)")
    now = datetime.now(UTC)
    cipher = TokenCipher.from_settings(settings)
    base, extra = divmod(accounts, users)
    tenants = -(-users // users_per_tenant)
    tenant_rows = [
        {"id": f"b-{t:05d}", "name": f"bench {t}", "active": True, "created_at": now} for t in range(tenants)
    ]
    user_rows: list[dict[str, Any]] = []
    conn_rows: list[dict[str, Any]] = []
    acc_rows: list[dict[str, Any]] = []
    pairs: list[tuple[str, str]] = []
    sandbox_s = 0.0
    t0 = time.perf_counter()
    for u in range(users):
        uid = u + 1
        tenant = f"b-{u // users_per_tenant:05d}"
        n = base + (1 if u < extra else 0)
        if sandbox is not None:
            ts = time.perf_counter()
            su = sandbox.state.create_user(connections=1, accounts_per_connection=n)
            sandbox_s += time.perf_counter() - ts
            powens_id, token, ext_conn = su.id, su.token, next(iter(su.connections))
            ext_accounts = sorted(su.accounts)
        else:
            powens_id, token, ext_conn = uid, f"tok-{uid}", uid
            ext_accounts = [uid * 1000 + k for k in range(n)]
        user_rows.append(
            {
                "id": uid,
                "tenant_id": tenant,
                "powens_user_id": powens_id,
                "token_encrypted": cipher.encrypt(token),
                "created_at": now,
                "updated_at": now,
            }
        )
        cid = f"con_{uuid.uuid4().hex}"
        conn_rows.append(
            {
                "id": cid,
                "tenant_id": tenant,
                "powens_user_pk": uid,
                "external_id": ext_conn,
                "active": True,
                "created_at": now,
                "updated_at": now,
            }
        )
        for ext in ext_accounts:
            aid = f"acc_{uuid.uuid4().hex}"
            pairs.append((tenant, aid))
            acc_rows.append(
                {
                    "id": aid,
                    "tenant_id": tenant,
                    "powens_user_pk": uid,
                    "connection_id": cid,
                    "external_id": ext,
                    "name": f"acc {ext}",
                    "account_type": "checking",
                    "currency": "EUR",
                    "status": "active",
                    "last_synced_at": now,
                    "created_at": now,
                    "updated_at": now,
                }
            )
    t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    with psycopg.connect(_libpq_url(settings.database_url)) as conn:
        for model, rows in (
            (Tenant, tenant_rows),
            (PowensUser, user_rows),
            (BankConnection, conn_rows),
            (BankAccount, acc_rows),
        ):
            copy_rows(conn, model.__table__, rows)
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    _analyze(settings)  # production tables have statistics; a fresh bulk load has none
    if timings is not None:
        timings.update(
            rows_s=round(t_rows - sandbox_s, 3),
            sandbox_create_user_s=round(sandbox_s, 3),
            insert_s=round(t_insert, 3),
            analyze_s=round(time.perf_counter() - t0, 3),
        )
    return pairs


def copy_rows(conn: psycopg.Connection[Any], table: Table, rows: list[dict[str, Any]]) -> None:
    """Rows into a table with COPY (100,000 accounts in seconds: the ORM's INSERT per row took 14 s). The
    model's scalar Python-side defaults are applied, as an ORM insert would; a column with neither a
    value nor such a default is left to the database (its server default, or NULL)."""
    if not rows:
        return
    defaults = {
        c.name: c.default.arg.value if isinstance(c.default.arg, Enum) else c.default.arg
        for c in table.columns
        if c.name not in rows[0] and c.default is not None and getattr(c.default, "is_scalar", False)
    }
    names = [c.name for c in table.columns if c.name in rows[0] or c.name in defaults]
    json_cols = {c.name for c in table.columns if isinstance(c.type, JSON)}
    cols = ", ".join(f'"{n}"' for n in names)
    with conn.cursor() as cur, cur.copy(f'COPY "{table.name}" ({cols}) FROM STDIN') as copy:
        for row in rows:
            values = [row[n] if n in row else defaults[n] for n in names]
            copy.write_row([Jsonb(v) if n in json_cols else v for n, v in zip(names, values, strict=True)])


def _libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def seed(
    settings: Settings, sandbox: Sandbox | None, tenants: int, users_per_tenant: int, accounts_per_user: int
) -> int:
    """The earlier interface (bench.webhook_bench): ``tenants`` x ``users_per_tenant`` users with
    ``accounts_per_user`` accounts each. Returns the number of accounts."""
    users = tenants * users_per_tenant
    return len(
        seed_accounts(
            settings,
            sandbox,
            users=users,
            accounts=users * accounts_per_user,
            users_per_tenant=users_per_tenant,
        )
    )


def _analyze(settings: Settings) -> None:
    with get_engine(settings).connect() as conn:
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def grant_probe_actor(settings: Settings) -> None:
    from app.policy import ADMIN
    from app.store import repo

    with session_scope(settings) as s:
        repo.grant_role(s, PROBE_ACTOR, ADMIN, datetime.now(UTC))


def fresh_db() -> tuple[str, str]:
    name = f"balances_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name


def drop_db(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_settings(url: str, powens_url: str, key: str, rate_limit: float, **extra: Any) -> Settings:
    return load_settings(
        database_url=url,
        celery_broker_url=REDIS_URL,
        encryption_key=key,
        signing_key=SIGNING_KEY,
        powens_base_url_override=powens_url,
        powens_rate_limit=rate_limit,
        **extra,
    )


# -- /proc: process trees, CPU, memory -----------------------------------------------------------------


def process_table() -> dict[int, tuple[str, int, float]]:
    """pid -> (comm, ppid, CPU seconds: utime + stime + cutime + cstime). A reaped child's time is in
    its parent's cutime/cstime, so summing a tree over time loses nothing to exited processes."""
    table: dict[int, tuple[str, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        close = raw.rindex(")")
        fields = raw[close + 2 :].split()
        cpu = sum(int(x) for x in fields[11:15]) / CLK
        table[int(entry)] = (raw[raw.index("(") + 1 : close], int(fields[1]), cpu)
    return table


def tree(root: int, table: dict[int, tuple[str, int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (_comm, ppid, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def _kb(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK, sum(values) / CLK


def cpu_snapshot(roots: Sequence[int]) -> dict[str, Any]:
    table = process_table()
    t = os.times()
    busy, total = machine_cpu()
    return {
        "workers": [sum(table[p][2] for p in tree(r, table)) for r in roots],
        "postgres": sum(v[2] for v in table.values() if v[0] == "postgres"),
        "redis": sum(v[2] for v in table.values() if v[0] == "redis-server"),
        "bench": t.user + t.system,  # this process: the sandbox's HTTP threads, polling, probes
        "machine_busy": busy,
        "machine_total": total,
    }


def cpu_delta(before: dict[str, Any], after: dict[str, Any], accounts: int, wall: float) -> dict[str, Any]:
    workers = [round(b - a, 2) for a, b in zip(before["workers"], after["workers"], strict=True)]
    d = {k: after[k] - before[k] for k in ("postgres", "redis", "bench", "machine_busy", "machine_total")}
    per = 1000 / max(1, accounts)
    return {
        "workers_s": workers,
        "postgres_s": round(d["postgres"], 2),
        "redis_s": round(d["redis"], 2),
        "bench_s": round(d["bench"], 2),
        "machine_busy_s": round(d["machine_busy"], 2),
        "machine_util": round(d["machine_busy"] / d["machine_total"], 3) if d["machine_total"] else None,
        "ms_per_account": {
            "workers": round(sum(workers) * per, 3),
            "postgres": round(d["postgres"] * per, 3),
            "redis": round(d["redis"] * per, 3),
            "bench": round(d["bench"] * per, 3),
            "machine": round(d["machine_busy"] * per, 3),
            # the machine's CPU none of the above used: other load (a test suite...) contaminates
            "other": round(
                (d["machine_busy"] - sum(workers) - d["postgres"] - d["redis"] - d["bench"]) * per, 3
            ),
        },
        "wall_s": round(wall, 3),
    }


class Sampler(threading.Thread):
    """Every 0.5 s: VmRSS and PSS summed over each worker's process tree, and the database's
    connections; the maxima since the last ``phase()``."""

    def __init__(self, roots: Sequence[int], dbname: str, every: float = 0.5) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.roots = list(roots)
        self.dbname = dbname
        self.every = every
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        n = len(self.roots)
        self.rss = [0] * n
        self.pss = [0] * n
        self.procs = [0] * n
        self.connections = 0
        self.samples = 0

    def phase(self) -> dict[str, Any]:
        """The maxima so far (MB), then start over."""
        with self.lock:
            out = {
                "rss_peak_mb": [round(kb / 1024, 1) for kb in self.rss],
                "pss_peak_mb": [round(kb / 1024, 1) for kb in self.pss],
                "processes_peak": list(self.procs),
                "db_connections_peak": self.connections,
                "samples": self.samples,
            }
            self._reset()
        return out

    def run(self) -> None:
        conn = None
        with contextlib.suppress(Exception):
            conn = psycopg.connect(PG_ADMIN, autocommit=True)
        try:
            while not self.stop_event.wait(self.every):
                table = process_table()
                sizes = []
                for root in self.roots:
                    pids = tree(root, table)
                    rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
                    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
                    sizes.append((rss, pss, len(pids)))
                n_conn = 0
                if conn is not None:
                    with contextlib.suppress(Exception):
                        row = conn.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.dbname,)
                        ).fetchone()
                        n_conn = int(row[0]) if row else 0
                with self.lock:
                    for i, (rss, pss, n) in enumerate(sizes):
                        self.rss[i] = max(self.rss[i], rss)
                        self.pss[i] = max(self.pss[i], pss)
                        self.procs[i] = max(self.procs[i], n)
                    self.connections = max(self.connections, n_conn)
                    self.samples += 1
        finally:
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)


# -- workers -----------------------------------------------------------------------------------------


def metric_delta(before: Samples, after: Samples, name: str, keys: Sequence[str]) -> dict[str, float]:
    """Non-zero increases of a counter, by the given labels joined with ' '."""
    out: dict[str, float] = {}
    for (n, ls), v in after.items():
        if n != name:
            continue
        d = v - before.get((n, ls), 0.0)
        if d:
            labels = dict(ls)
            key = " ".join(labels.get(k, "") for k in keys)
            out[key] = out.get(key, 0.0) + d
    return dict(sorted(out.items()))


def summed(scraped: Sequence[Samples], name: str, **labels: str) -> float:
    """A counter summed over every worker's scrape."""
    return sum(metric(s, name, **labels) for s in scraped)


def deltas(
    before: Sequence[Samples], after: Sequence[Samples], name: str, keys: Sequence[str], integer: bool = True
) -> dict[str, Any]:
    """A counter's increases over every worker, by the given labels."""
    out: dict[str, float] = {}
    for b, a in zip(before, after, strict=True):
        for k, v in metric_delta(b, a, name, keys).items():
            out[k] = out.get(k, 0.0) + v
    return {k: int(v) if integer else v for k, v in sorted(out.items())}


def task_seconds(before: Sequence[Samples], after: Sequence[Samples]) -> dict[str, dict[str, float]]:
    """Executions and mean wall seconds per task name (``balances_task_duration_seconds``)."""
    sums, counts = (
        deltas(before, after, f"balances_task_duration_seconds_{part}", ("task",), integer=False)
        for part in ("sum", "count")
    )
    return {
        task: {
            "count": int(n),
            "mean_s": round(sums.get(task, 0.0) / n, 4),
            "total_s": round(sums.get(task, 0.0), 2),
        }
        for task, n in counts.items()
        if n
    }


class Workers:
    """``count`` real ``celery -A app worker`` processes, each in its own session (process group), with
    its own metrics port and multiprocess directory; logs in ``logdir``."""

    def __init__(
        self, count: int, concurrency: int, pool: str, env: dict[str, str], logdir: Path, tag: str
    ) -> None:
        self.count, self.concurrency, self.pool = count, concurrency, pool
        self.env, self.logdir = env, logdir
        self.names = [f"bench{w}-{tag}@bench" for w in range(count)]
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = [logdir / f"worker{w}-{tag}.log" for w in range(count)]

    def start(self) -> None:
        for w, name in enumerate(self.names):
            with open(self.logs[w], "wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        worker_argv(
                            name,
                            concurrency=self.concurrency,
                            loglevel="WARNING",
                            extra=["-P", self.pool, "--include", "bench.tasks"],
                        ),
                        cwd=ROOT,
                        env=dict(
                            self.env,
                            BALANCES_METRICS_PORT=str(self.ports[w]),
                            BALANCES_METRICS_DIR=str(self.logdir / f"metrics-{name.split('@')[0]}"),
                        ),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for w, p in enumerate(self.procs):
            if p.poll() is not None:
                raise RuntimeError(f"worker {w} exited with {p.returncode}:\n{self.log_tail(w)}")

    def wait_ready(self, timeout: float = 120) -> float:
        """Until every worker answers a remote-control ping (its consumer is up). Returns seconds."""
        from app.celery import app

        t0 = time.perf_counter()
        pending = set(self.names)
        while pending:
            self.check_alive()
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"workers not ready after {timeout:.0f}s: {sorted(pending)}")
            for reply in app.control.ping(destination=sorted(pending), timeout=0.5) or []:
                pending -= set(reply)
        return time.perf_counter() - t0

    def scrape(self) -> list[Samples]:
        return [
            samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text) for port in self.ports
        ]

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to each worker's process group (warm shutdown), SIGKILL to what is left after
        ``timeout``."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # the group: children outliving their parent too
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        self.procs = []

    def log_tail(self, w: int, lines: int = 25) -> str:
        """The last lines of a worker's log, telemetry events left out."""
        try:
            text = self.logs[w].read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join([line for line in text if not line.startswith('{"event": ')][-lines:])

    def log_errors(self) -> dict[str, Any]:
        pattern = re.compile(r'"level": ?"(error|critical)"|Traceback|\bERROR\b|\bCRITICAL\b')
        count, sample = 0, []
        for path in self.logs:
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if pattern.search(line):
                        count += 1
                        if len(sample) < 5:
                            sample.append(line[:300])
        return {"error_lines": count, "sample": sample}


def worker_env(
    url: str, powens_url: str, key: str, rate_limit: float, knobs: dict[str, str]
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BALANCES_", "POWENS_", "CELERY_", "PROMETHEUS_", "DATABASE_URL"))
    }
    env.update(
        {
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": REDIS_URL,
            "POWENS_BASE_URL": powens_url,
            "BALANCES_ENCRYPTION_KEY": key,
            "BALANCES_SIGNING_KEY": SIGNING_KEY,
            "BALANCES_POWENS_RATE_LIMIT": str(rate_limit),
            "BALANCES_LOG_LEVEL": "WARNING",
            **knobs,
        }
    )
    return env


# -- the broker ----------------------------------------------------------------------------------------


def queue_len(r: redis.Redis, queue: str = "refresh") -> int:
    """Messages waiting in a queue, kombu's priority sub-lists ("<queue>\\x06\\x16<n>") included."""
    pipe = r.pipeline(transaction=False)
    for key in (queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9))):
        pipe.llen(key)
    return int(sum(pipe.execute()))


def publish_noops(n: int) -> float:
    """N signed no-op messages over one producer; returns the seconds it took."""
    from app.celery import app
    from bench.tasks import noop

    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            noop.apply_async(producer=producer)
    return time.perf_counter() - t0


def noop_ceiling(r: redis.Redis, workers: Workers, n: int, started: float) -> dict[str, Any]:
    """The workers were just started on N queued no-ops: time the drain (LLEN polled every 5 ms)."""
    t_first = t10 = t90 = None
    deadline = time.perf_counter() + max(180.0, n / 20)
    while True:
        q = queue_len(r)
        now = time.perf_counter()
        if t_first is None and q < n:
            t_first = now
        if t_first is not None:
            if t10 is None and q <= 0.9 * n:
                t10 = now
            if t90 is None and q <= 0.1 * n:
                t90 = now
        if q == 0:
            t_end = now
            break
        if now > deadline:
            raise RuntimeError(f"the no-op queue did not drain ({q} of {n} left)")
        workers.check_alive()
        time.sleep(0.005)
    while r.hlen("unacked") and time.perf_counter() < t_end + 30:
        time.sleep(0.005)
    t_acked = time.perf_counter()
    assert t_first is not None and t10 is not None and t90 is not None
    # The workers' own count: every message ran (or was denied: an unsigned message is not run).
    outcomes: dict[str, float] = {}
    wait_until = time.monotonic() + 60
    while True:
        scraped = workers.scrape()
        outcomes = {
            o: sum(
                metric(s, "balances_task_executions_total", task="balances.noop", outcome=o) for s in scraped
            )
            for o in ("succeeded", "denied", "failed", "retried", "given_up")
        }
        if sum(outcomes.values()) >= n or time.monotonic() > wait_until:
            break
        time.sleep(0.2)
    drain = t_end - t_first
    return {
        "messages": n,
        "worker_start_to_first_s": round(t_first - started, 3),
        "drain_s": round(drain, 3),
        "ceiling_per_s": round(n / drain, 1) if drain > 0 else None,
        "ceiling_10_90_per_s": round(0.8 * n / (t90 - t10), 1) if t90 > t10 else None,
        "until_acked_s": round(t_acked - t_first, 3),
        "executions": {k: int(v) for k, v in outcomes.items() if v},
        "all_ran": outcomes["succeeded"] == n,
    }


# -- on-demand probes ------------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Prober:
    """On-demand refreshes of random seeded accounts, one at a time, every ``every`` seconds at most:
    latency = dispatch -> its outcome found in the audit table (polled every 20 ms). The audit row's
    own times split it: ``answer`` (dispatch -> the account's Powens answer judged, its ``started_at``
    for a success: waiting for a free worker process, the lock and one Powens call of ``--latency-ms``)
    and ``record`` (-> its ``finished_at``); ``publish`` is the dispatch call itself, in this process."""

    def __init__(self, settings: Settings, accounts: Sequence[tuple[str, str]], every: float = 0.5) -> None:
        self.settings = settings
        self.accounts = accounts
        self.every = every
        self.rng = random.Random(11)
        self.t0 = time.perf_counter()
        # [seconds since start, latency, publish, answer, record, attempts, outcome]
        self.samples: list[list[Any]] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="bench-on-demand", daemon=True)

    def probe(self) -> list[Any]:
        from app.contract import OpenBankingRefreshBalancesInput
        from app.refresh.outcomes import Succeeded, wait_for
        from app.store import repo
        from app.worker.tasks import dispatch_refresh

        tenant, account = self.rng.choice(self.accounts)
        inp = OpenBankingRefreshBalancesInput(tenant_id=tenant, account_id=account)
        sent = datetime.now(UTC)
        t0 = time.perf_counter()
        task_id = dispatch_refresh(inp, PROBE_ACTOR, Trigger.ON_DEMAND)
        published = round(time.perf_counter() - t0, 4)
        found = wait_for(self.settings, task_id, None, timeout=60, poll=0.02)
        latency = time.perf_counter() - t0
        if found is None:
            return [round(t0 - self.t0, 2), round(latency, 3), published, None, None, None, "timeout"]
        with session_scope(self.settings) as s:
            row = repo.attempt_for_task(s, task_id)
            times = (row.started_at, row.finished_at, row.attempts) if row is not None else None
        answer = recorded = attempts = None
        if times is not None:
            answer = round((times[0] - sent).total_seconds(), 3)
            recorded = round((times[1] - times[0]).total_seconds(), 3)
            attempts = times[2]
        outcome = "succeeded" if isinstance(found, Succeeded) else f"failed:{found.error.reason.value}"
        return [round(t0 - self.t0, 2), round(latency, 3), published, answer, recorded, attempts, outcome]

    def run_sequential(self, n: int) -> None:
        for _ in range(n):
            self._one()

    def _one(self) -> None:
        try:
            self.samples.append(self.probe())
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            t0 = time.perf_counter()
            self._one()
            self.stop_event.wait(max(0.0, self.every - (time.perf_counter() - t0)))

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.thread.start()

    def stop(self, timeout: float = 90) -> None:
        """No new probe; the one in flight finishes (a daemon thread: not waited for past ``timeout``)."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)

    def summary(self, latency_ms: float | None = None) -> dict[str, Any]:
        lat = [s[1] for s in self.samples]
        outcomes: dict[str, int] = {}
        for s in self.samples:
            outcomes[s[-1]] = outcomes.get(s[-1], 0) + 1
        out: dict[str, Any] = {"count": len(lat), "outcomes": outcomes, "errors": self.errors[:5]}
        if lat:
            out.update(
                p50_s=round(statistics.median(lat), 3),
                p95_s=round(quantile(lat, 0.95), 3),
                max_s=round(max(lat), 3),
                mean_s=round(statistics.fmean(lat), 3),
            )
            for name, i in (("publish", 2), ("answer", 3), ("record", 4)):
                part = [s[i] for s in self.samples if s[i] is not None]
                if part:
                    out[f"{name}_p50_s"] = round(statistics.median(part), 3)
                    out[f"{name}_p95_s"] = round(quantile(part, 0.95), 3)
            out["retried"] = sum(1 for s in self.samples if (s[5] or 1) > 1)
        if latency_ms is not None:
            extra = latency_ms / 1000
            out["target_p50_s"] = round(0.3 + extra, 3)
            out["target_p95_s"] = round(1.0 + extra, 3)
            out["targets_met"] = bool(
                lat
                and out["p50_s"] <= out["target_p50_s"]
                and out["p95_s"] <= out["target_p95_s"]
                and outcomes.get("succeeded", 0) == len(lat)
            )
        columns = ["t_s", "latency_s", "publish_s", "answer_s", "record_s", "attempts", "outcome"]
        out["samples"] = {"columns": columns}
        out["samples"]["rows"] = self.samples
        return out


# -- phases ----------------------------------------------------------------------------------------------


def _knobs(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Any]]:
    """(worker environment, matching Settings overrides for this process) of the tuning knobs."""
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    for field_name, variable, value in (
        ("refresh_batch_accounts", "BALANCES_REFRESH_BATCH_ACCOUNTS", args.batch_accounts),
        ("refresh_batch_readers", "BALANCES_REFRESH_BATCH_READERS", args.batch_readers),
    ):
        if field_name not in Settings.model_fields:
            continue
        if value is None:
            value = Settings.model_fields[field_name].default
        env[variable] = str(value)
        overrides[field_name] = value
    for item in args.worker_env:
        k, _, v = item.partition("=")
        env[k] = v
    return env, overrides


def plan_in_steps(
    settings: Settings, run_id: str, publish: Callable[[str, Sequence[Any]], None]
) -> tuple[int, list[float]]:
    """Plan ``run_id`` as the workers do — ``begin_planning``, then one ``plan_step`` after the other —
    in this process, timing each step (the broker between them is not what is measured). Returns the
    accounts planned and each step's seconds."""
    from app.nightly import pipeline
    from app.store import planning

    steps: list[pipeline.Step] = []
    took: list[float] = []

    def enqueue(_run: str, step: pipeline.Step, _countdown: float | None) -> None:
        steps.append(step)

    t0 = time.perf_counter()
    pipeline.begin_planning(settings, run_id, enqueue)
    took.append(time.perf_counter() - t0)
    while steps:
        t0 = time.perf_counter()
        pipeline.plan_step(
            settings,
            run_id,
            steps.pop(),
            publish=publish,
            enqueue_step=enqueue,
            enqueue_summary=lambda *_: None,
            queued=lambda: 0,
        )
        took.append(time.perf_counter() - t0)
    state = planning.state(settings, run_id)
    return (state.planned if state else 0), took


def bench_planning(args: argparse.Namespace) -> dict[str, Any]:
    """Planning ``--plan-accounts`` accounts in this process, step by step as the workers run it:
    wall time, each step's time against its own time limit (the target: no step over half of it),
    statements and Python heap peak. ``--plan-publish broker`` publishes each page's refresh batches
    to the real broker (then purged); ``none`` measures the database side alone (10 M accounts'
    messages would not fit the broker: in production backpressure keeps them out of it)."""
    from prometheus_client import REGISTRY

    from app.worker import tasks

    n = args.plan_accounts
    users = max(1, n * args.users // args.accounts)
    _env, overrides = _knobs(args)
    name, url = fresh_db()
    r = redis.Redis.from_url(REDIS_URL)
    settings = None
    published = [0]

    def publish(run_id: str, items: Sequence[Any]) -> None:
        published[0] += len(items)
        if args.plan_publish == "broker":
            tasks.publish_page(run_id, items)
            r.delete("refresh")  # nobody consumes them here: the broker must not hold the night

    try:
        settings = bench_settings(url, "http://127.0.0.1:9/2.0/", generate_key(), 0, **overrides)
        use_settings(settings)
        upgrade(settings)
        r.flushdb()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        seed_accounts(
            settings, None, users=users, accounts=n, users_per_tenant=args.users_per_tenant, timings=timings
        )
        t_seed = time.perf_counter() - t0
        run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
        statements0 = REGISTRY.get_sample_value("balances_db_statements_total") or 0.0
        tracemalloc.start()
        t0 = time.perf_counter()
        planned, took = plan_in_steps(settings, run_id, publish)
        elapsed = time.perf_counter() - t0
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        statements = (REGISTRY.get_sample_value("balances_db_statements_total") or 0.0) - statements0
        limit = settings.plan_time_limit
        return {
            "accounts": n,
            "users": users,
            "planned": planned,
            "published": published[0],
            "publish": args.plan_publish,
            "page_accounts": settings.plan_page_accounts,
            "seed_s": round(t_seed, 2),
            "seed": timings,
            "wall_s": round(elapsed, 3),
            "accounts_per_s": round(planned / elapsed) if elapsed else None,
            "steps": len(took),
            "step_s": {
                "p50": round(quantile(took, 0.5), 4),
                "p99": round(quantile(took, 0.99), 4),
                "max": round(max(took), 4),
            },
            "step_limit_s": limit,
            "max_step_share_of_limit": round(max(took) / limit, 4),
            "heap_peak_mib": round(peak / 2**20, 1),
            "db_statements": int(statements),
        }
    finally:
        with shielded():
            if settings is not None:
                get_engine(settings).dispose()
            drop_db(name)
            r.flushdb()


def run_phase(
    args: argparse.Namespace,
    label: str,
    *,
    accounts: int,
    users: int,
    workers: int,
    concurrency: int,
    rate_limit: float,
    noop: int,
    probes: bool,
    prepare: Callable[[Settings, str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A fresh database and sandbox, seeded (then ``prepare(settings, url)``, whose answer goes in the
    result as ``prepared``: the steady-state benchmark's history); the no-op ceiling (``noop`` > 0) on
    the workers just started; then one nightly run on those workers (with on-demand probes when
    ``probes``)."""
    log(
        f"{label}: {accounts:,} accounts / {users:,} users, {workers} worker(s) x {concurrency} ({args.pool})"
    )
    result: dict[str, Any] = {
        "label": label,
        "workers": workers,
        "concurrency": concurrency,
        "pool": args.pool,
        "rate_limit": rate_limit,
        "latency_ms": args.latency_ms,
    }
    knob_env, overrides = _knobs(args)
    name, url = fresh_db()
    r = redis.Redis.from_url(REDIS_URL)
    logdir = Path(tempfile.mkdtemp(prefix="nightly-bench-"))
    key = generate_key()
    settings: Settings | None = None
    pool: Workers | None = None
    sampler: Sampler | None = None
    prober: Prober | None = None
    failed = True
    try:
        with Sandbox(SandboxState(seed=5, knobs=Knobs(latency_ms=args.latency_ms))) as sb:
            settings = bench_settings(url, sb.base_url, key, rate_limit, **overrides)
            use_settings(settings)
            upgrade(settings)
            r.flushdb()
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            seeded = seed_accounts(
                settings,
                sb,
                users=users,
                accounts=accounts,
                users_per_tenant=args.users_per_tenant,
                timings=timings,
            )
            grant_probe_actor(settings)
            if prepare is not None:
                result["prepared"] = prepare(settings, url)
            result.update(
                accounts=len(seeded),
                users=users,
                tenants=-(-users // args.users_per_tenant),
                seed={"seconds": round(time.perf_counter() - t0, 2), **timings},
            )
            log(f"{label}: seeded in {result['seed']['seconds']}s {timings}")
            pool = Workers(
                workers,
                concurrency,
                args.pool,
                worker_env(url, sb.base_url, key, rate_limit, knob_env),
                logdir,
                uuid.uuid4().hex[:6],
            )
            if noop:
                publish_s = publish_noops(noop)
                log(f"{label}: {noop:,} no-ops published in {publish_s:.1f}s; starting the workers")
            started = time.perf_counter()
            pool.start()
            sampler = Sampler(pool.pids, name)
            sampler.start()
            if noop:
                result["noop"] = {"publish_s": round(publish_s, 3), **noop_ceiling(r, pool, noop, started)}
                result["noop"]["memory"] = sampler.phase()
                log(f"{label}: no-op ceiling {result['noop']['ceiling_per_s']} tasks/s")
            pool.wait_ready()
            result["ready_s"] = round(time.perf_counter() - started, 2)  # the no-op drain included
            if probes:
                prober = Prober(settings, seeded)
                scraped = pool.scrape()
                calls0 = sb.state.stats()["total"]
                prober.run_sequential(WARMUP_PROBES)
                after = pool.scrape()
                done = max(1, len(prober.samples))
                warm = prober.summary()
                stmts = summed(after, "balances_db_statements_total") - summed(
                    scraped, "balances_db_statements_total"
                )
                warm["db_statements_per_probe"] = round(stmts / done, 2)
                warm["powens_calls_per_probe"] = round((sb.state.stats()["total"] - calls0) / done, 2)
                result["on_demand_idle"] = warm
                log(f"{label}: {WARMUP_PROBES} warm-up probes on idle workers: {warm}")
                prober = Prober(settings, seeded)
            result.update(
                nightly_run(
                    args,
                    label,
                    settings,
                    sb,
                    pool,
                    sampler,
                    prober,
                    len(seeded),
                    users,
                    result.get("on_demand_idle"),
                )
            )
            result["worker_log"] = pool.log_errors()
            failed = not result.get("ok")
            return result
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        log(f"{label}: FAILED: {result['error']}")
        return result
    finally:
        with shielded():
            if prober is not None:
                prober.stop(timeout=5 if failed else 90)
            if sampler is not None:
                sampler.stop()
            if pool is not None:
                if failed:
                    result.setdefault("worker_log", pool.log_errors())
                    for w in range(pool.count):
                        log(f"{label}: worker {w} log tail:\n{pool.log_tail(w)}")
                pool.stop()
            if settings is not None:
                get_engine(settings).dispose()
            drop_db(name)
            r.flushdb()
            if failed:
                log(f"{label}: worker logs kept in {logdir}")
            else:
                shutil.rmtree(logdir, ignore_errors=True)


def nightly_run(
    args: argparse.Namespace,
    label: str,
    settings: Settings,
    sb: Sandbox,
    pool: Workers,
    sampler: Sampler,
    prober: Prober | None,
    accounts: int,
    users: int,
    probe_costs: dict[str, Any] | None,
) -> dict[str, Any]:
    from app.worker.tasks import enqueue_plan

    sb.state.reset_stats()
    before = pool.scrape()
    sampler.phase()
    cpu0 = cpu_snapshot(pool.pids)
    if prober is not None:
        prober.start()
    t0 = time.perf_counter()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
    enqueue_plan(run_id)
    status, observed = wait_run(settings, run_id, label, t0, pool, args)
    cpu1 = cpu_snapshot(pool.pids)
    memory = sampler.phase()
    if prober is not None:
        prober.stop()
    after = pool.scrape()
    final = runs.run_status(settings, run_id) or {}
    stats = sb.state.stats()
    items = dict(final.get("accounts") or {})
    wall = float(final.get("durationSeconds") or observed) if status == RunStatus.COMPLETED else observed
    statements = summed(after, "balances_db_statements_total") - summed(
        before, "balances_db_statements_total"
    )
    out: dict[str, Any] = {
        "run_id": run_id,
        "status": status,
        "wall_s": round(wall, 3),
        "observed_wall_s": round(observed, 3),
        "accounts_per_s": round(accounts / wall, 1) if wall else None,
        "items": items,
        "failures_by_reason": final.get("failuresByReason") or {},
        "stale_accounts": len(final.get("staleAccounts") or []),
        "tenant_states": final.get("tenants") or {},
        "powens": {
            "calls": stats["total"],
            "calls_per_user": round(stats["total"] / users, 4),
            "by_route": stats["calls"],
        },
        "db_statements": {"total": int(statements), "per_account": round(statements / accounts, 3)},
        "cpu": cpu_delta(cpu0, cpu1, accounts, observed),
        "memory": memory,
        "tasks": deltas(before, after, "balances_task_executions_total", ("task", "outcome")),
        "powens_http": deltas(before, after, "powens_http_requests_total", ("endpoint", "status")),
        "task_seconds": task_seconds(before, after),
    }
    if prober is not None:
        out["on_demand"] = prober.summary(args.latency_ms)
        probes = len(prober.samples)
        if probe_costs:
            # What the probes themselves cost (measured on the idle workers), taken out of the run's.
            calls = stats["total"] - probes * probe_costs["powens_calls_per_probe"]
            stmts = statements - probes * probe_costs["db_statements_per_probe"]
            out["powens"]["calls_excl_probes"] = round(calls)
            out["powens"]["calls_per_user_excl_probes"] = round(calls / users, 4)
            out["db_statements"]["per_account_excl_probes"] = round(stmts / accounts, 3)
        out["powens"]["probes"] = probes
    out["ok"] = status == RunStatus.COMPLETED and items.get("succeeded") == accounts
    log(
        f"{label}: {status} in {wall:.1f}s = {out['accounts_per_s']} accounts/s; items {items}; "
        f"Powens calls {stats['total']:,}; {out['db_statements']['per_account']} statements/account"
    )
    return out


def wait_run(
    settings: Settings, run_id: str, label: str, t0: float, pool: Workers, args: argparse.Namespace
) -> tuple[str, float]:
    """Until the run leaves pending/planning/running (one indexed read every 0.1 s). Every 10 s: its
    progress, and the tasks the workers saw fail; a run making no progress for ``--stall-timeout``
    seconds (code failing under the bench: nothing re-drives it, no beat runs here) is given up."""
    next_progress, last_done, last_change = 10.0, (-1, -1), 0.0
    while True:
        with session_scope(settings) as s:
            status = s.scalar(select(RefreshRun.status).where(RefreshRun.id == run_id))
        elapsed = time.perf_counter() - t0
        if status is not None and status not in OPEN:
            return str(status), elapsed
        if elapsed > args.run_timeout:
            log(f"{label}: run still {status} after {args.run_timeout:.0f}s: given up")
            return f"timeout ({status})", elapsed
        pool.check_alive()
        if elapsed >= next_progress:
            next_progress += 10
            done, total, tenants_done = progress(settings, run_id)
            if (done, tenants_done) != last_done:
                last_done, last_change = (done, tenants_done), elapsed
            failed = 0.0
            with contextlib.suppress(Exception):
                failed = summed(pool.scrape(), "balances_task_executions_total", outcome="failed")
            log(
                f"{label}: {status}, {done:,}/{total:,} accounts and {tenants_done:,} tenants done "
                f"after {elapsed:.0f}s"
                + (f"; {failed:.0f} task executions FAILED (worker logs)" if failed else "")
            )
            if elapsed - last_change > args.stall_timeout:
                log(f"{label}: no progress for {args.stall_timeout:.0f}s: given up")
                return f"stalled ({status})", elapsed
        time.sleep(0.1)


def progress(settings: Settings, run_id: str) -> tuple[int, int, int]:
    """(accounts done, accounts planned, tenants done: summary and forecast) from the run's tenants."""
    try:
        with session_scope(settings) as s:
            total = s.scalar(select(RefreshRun.total_accounts).where(RefreshRun.id == run_id)) or 0
            left = s.scalar(select(func.sum(RunTenant.remaining)).where(RunTenant.run_id == run_id))
            tenants = s.scalar(
                select(func.count())
                .select_from(RunTenant)
                .where(RunTenant.run_id == run_id, RunTenant.status == TenantStatus.DONE)
            )
    except Exception:
        return -1, 0, -1
    return total - int(left or 0), total, int(tenants or 0)


# -- the machine, the report -------------------------------------------------------------------------


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts() -> dict[str, Any]:
    import celery
    import kombu
    import sqlalchemy

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    pg: dict[str, Any] = {}
    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN, autocommit=True) as c:
        for setting in ("server_version", "max_connections", "shared_buffers", "synchronous_commit", "fsync"):
            row = c.execute(f"SHOW {setting}").fetchone()
            pg[setting] = row[0] if row else None
    redis_version = None
    with contextlib.suppress(Exception):
        redis_version = redis.Redis.from_url(REDIS_URL).info("server").get("redis_version")
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(_kb("/proc/meminfo", "MemTotal:") / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "postgresql": pg,
        "redis": redis_version,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"])),
    }


def _n(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}"
    return str(x)


def _mb(values: Sequence[float]) -> str:
    return " / ".join(f"{v:,.0f}" for v in values) + " MB"


def render(res: dict[str, Any]) -> str:
    m, st = res["machine"], res["settings"]
    lines = [
        f"### Nightly benchmark ({res['label']}), {res['started_at']}",
        "",
        f"commit {m['git_commit']}{' (+ uncommitted changes)' if m['git_dirty'] else ''}; {m['nproc']} x "
        f"{m['cpu_model']}, {m['memory_gib']} GiB; Python {m['python']}, Celery {m['celery']}, "
        f"PostgreSQL {m['postgresql'].get('server_version')}, Redis {m['redis']}",
        "",
        f"workers {st['workers']} x {st['concurrency']} ({st['pool']}); refresh batch "
        f"{st.get('refresh_batch_accounts', '-')} accounts / {st.get('refresh_batch_readers', '-')} readers; "
        f"Powens latency {st['latency_ms']:g} ms; {st['users_per_tenant']} users per tenant",
        "",
        "| measure | value |",
        "| --- | --- |",
    ]
    row = lines.append
    p = res.get("planning")
    if p:
        if "error" in p:
            row(f"| planning | {p['error']} |")
        else:
            row(
                f"| planning {p['accounts']:,} accounts | {p['wall_s']:.2f} s ({_n(p['accounts_per_s'])} "
                f"accounts/s) in {p['steps']:,} steps (longest {p['step_s']['max']:.3f} s = "
                f"{p['max_step_share_of_limit']:.1%} of its {p['step_limit_s']:g} s limit), heap peak "
                f"{p['heap_peak_mib']} MiB, {p['db_statements']:,} statements |"
            )
    r = res.get("run")
    if r and "error" in r:
        row(f"| nightly run | FAILED: {r['error']} |")
    elif r:
        row(
            f"| nightly run | {r['accounts']:,} accounts, {r['users']:,} Powens users, {r['tenants']:,} "
            f"tenants: {r['status']} in {r['wall_s']:.1f} s = **{_n(r['accounts_per_s'])} accounts/s** |"
        )
        n = r.get("noop")
        if n:
            row(
                f"| no-op ceiling ({n['messages']:,} tasks) | {_n(n['ceiling_per_s'])} tasks/s (10-90 %: "
                f"{_n(n['ceiling_10_90_per_s'])}/s); run / ceiling = **{_n(r.get('ratio_to_ceiling'), 3)}**"
                f"{'' if n['all_ran'] else '; NOT ALL RAN: ' + str(n['executions'])} |"
            )
        items = r["items"]
        bad = {k: v for k, v in items.items() if k not in ("total", "succeeded") and v}
        row(
            f"| items | {items.get('succeeded', 0):,} succeeded"
            + (f"; {bad}; failures {r['failures_by_reason']}" if bad else "")
            + " |"
        )
        pw = r["powens"]
        excl = (
            f" ({pw['calls_per_user_excl_probes']:.3f} without the {pw['probes']} probes)"
            if "calls_per_user_excl_probes" in pw
            else ""
        )
        row(f"| Powens calls | {pw['calls']:,} = {pw['calls_per_user']:.3f} per user{excl} |")
        db = r["db_statements"]
        excl = (
            f" ({db['per_account_excl_probes']:.2f} without probes)"
            if "per_account_excl_probes" in db
            else ""
        )
        row(f"| DB statements / account | {db['per_account']:.2f}{excl} |")
        c = r["cpu"]["ms_per_account"]
        row(
            f"| CPU ms / account | workers {c['workers']:.2f}, PostgreSQL {c['postgres']:.2f}, Redis "
            f"{c['redis']:.2f}, bench + sandbox {c['bench']:.2f}; machine {c['machine']:.2f} "
            f"({_n((r['cpu']['machine_util'] or 0) * 100)} % busy; {c.get('other', 0):.2f} other) |"
        )
        ts = r.get("task_seconds") or {}
        if ts:
            busiest = sorted(ts.items(), key=lambda kv: -kv[1]["total_s"])[:2]
            row(
                "| busiest tasks | "
                + "; ".join(f"{t}: {v['count']:,} x {v['mean_s']:.3f} s" for t, v in busiest)
                + " |"
            )
        mem = r["memory"]
        row(
            f"| peak RSS per worker (PSS) | {_mb(mem['rss_peak_mb'])} ({_mb(mem['pss_peak_mb'])}); "
            f"{mem['db_connections_peak']} DB connections at most |"
        )
        od = r.get("on_demand")
        if od:
            if od["count"]:
                met = "met" if od["targets_met"] else "**NOT met**"
                row(
                    f"| on-demand during the run (n={od['count']}) | p50 {od['p50_s']:.2f} s, p95 "
                    f"{od['p95_s']:.2f} s, max {od['max_s']:.2f} s (to the Powens answer: p50 "
                    f"{_n(od.get('answer_p50_s'), 2)} / p95 {_n(od.get('answer_p95_s'), 2)} s); "
                    f"targets p50 <= {od['target_p50_s']:.2f}"
                    f", p95 <= {od['target_p95_s']:.2f}: {met}"
                    + ("" if set(od["outcomes"]) == {"succeeded"} else f"; {od['outcomes']}")
                    + " |"
                )
            else:
                row(f"| on-demand during the run | no sample {od.get('errors')} |")
        idle = r.get("on_demand_idle")
        if idle and idle.get("count"):
            row(
                f"| on-demand, idle workers (n={idle['count']}) | p50 {idle['p50_s']:.2f} s (to the Powens "
                f"answer {_n(idle.get('answer_p50_s'), 2)} s); "
                f"{idle['db_statements_per_probe']:.1f} statements each |"
            )
    rl = res.get("rate_limited")
    if rl and "error" in rl:
        row(f"| rate-limited run | FAILED: {rl['error']} |")
    elif rl:
        row(
            f"| rate-limited run (R = {rl['rate_limit']:g}/s) | {rl['accounts']:,} accounts / "
            f"{rl['users']:,} users: {rl['wall_s']:.1f} s; {rl['powens']['calls']:,} calls "
            f"({rl['powens']['calls_per_user']:.3f}/user); bound {rl['bound_s']:.1f} s; "
            f"wall / bound **{rl['wall_over_bound']:.2f}** ({'met' if rl['bound_met'] else 'NOT met'}) |"
        )
    sc = res.get("scaling")
    if sc:
        lines += [
            "",
            f"Scaling check: {sc[0].get('accounts', 0):,} accounts / {sc[0].get('users', 0):,} Powens users, "
            f"the same Powens latency; no-op ceilings of {st.get('scaling_noop_messages', 0):,} tasks.",
            "",
            "| workers x processes | accounts/s | no-op ceiling/s | ratio | worker CPU ms/acc | "
            "PG CPU ms/acc | machine busy | stmts/acc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for s in sc:
            if "error" in s:
                row(f"| {s['workers']} x {s['concurrency']} | FAILED: {s['error']} | | | | | | |")
                continue
            c = s["cpu"]
            row(
                f"| {s['workers']} x {s['concurrency']} | "
                f"{_n(s['accounts_per_s']) if s.get('ok') else s.get('status')} | "
                f"{_n((s.get('noop') or {}).get('ceiling_per_s'))} | {_n(s.get('ratio_to_ceiling'), 3)} | "
                f"{c['ms_per_account']['workers']:.2f} | {c['ms_per_account']['postgres']:.2f} | "
                f"{_n((c['machine_util'] or 0) * 100)} % | {s['db_statements']['per_account']:.2f} |"
            )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.nightly_bench", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    ap.add_argument("--accounts", type=int, default=QUICK["accounts"])
    ap.add_argument("--users", type=int, default=QUICK["users"], help="Powens users of the main run")
    ap.add_argument("--users-per-tenant", type=int, default=10)
    ap.add_argument("--latency-ms", type=float, default=QUICK["latency_ms"], help="the sandbox's, per call")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--pool", default="prefork", help="the workers' -P (prefork, threads, solo, ...)")
    ap.add_argument("--noop", type=int, default=None, help="no-op messages (default 20,000 full, 5,000 else)")
    ap.add_argument("--rate-limit", type=float, default=20.0, help="Powens calls/s of the rate-limited run")
    ap.add_argument("--rate-accounts", type=int, default=2_000)
    ap.add_argument("--rate-users", type=int, default=400)
    ap.add_argument("--skip-rate", action="store_true", help="no rate-limited run")
    ap.add_argument("--skip-run", action="store_true", help="no main run (no-op ceiling included)")
    ap.add_argument("--scaling", action="store_true", help="also the scaling check")
    ap.add_argument("--scaling-configs", default="1x1,1x2,2x2", help="workers x processes, comma-separated")
    ap.add_argument("--scaling-accounts", type=int, default=5_000)
    ap.add_argument("--scaling-users", type=int, default=1_000)
    ap.add_argument("--scaling-noop", type=int, default=2_000, help="no-op messages per scaling point")
    ap.add_argument("--plan-accounts", type=int, default=100_000)
    ap.add_argument("--skip-planning", action="store_true")
    ap.add_argument(
        "--plan-publish",
        choices=("broker", "none"),
        default="broker",
        help="planning measurement: publish each page's batches to the broker (then purged), or not",
    )
    ap.add_argument("--batch-accounts", type=int, default=None, help="BALANCES_REFRESH_BATCH_ACCOUNTS")
    ap.add_argument("--batch-readers", type=int, default=None, help="BALANCES_REFRESH_BATCH_READERS")
    ap.add_argument(
        "--worker-env", action="append", default=[], metavar="NAME=VALUE", help="more worker variables"
    )
    ap.add_argument("--run-timeout", type=float, default=3600.0, help="seconds before a run is given up")
    ap.add_argument("--stall-timeout", type=float, default=120.0, help="seconds without progress: given up")
    ap.add_argument("--label", default=None, help="quick, full or custom (default: from the sizes)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.label is None:
        quick = (args.accounts, args.users, args.latency_ms) == (
            QUICK["accounts"],
            QUICK["users"],
            QUICK["latency_ms"],
        )
        args.label = (
            "custom"
            if args.skip_run
            else "full"
            if args.accounts >= 100_000
            else "quick"
            if quick
            else "custom"
        )
    if args.noop is None:
        args.noop = 20_000 if args.accounts >= 100_000 else 5_000
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # this process's own counters are plain ones
    db_index = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs.get("db", 0)
    if int(db_index) == 13:
        print("BALANCES_BENCH_REDIS points at db 13, the test suite's: refused", file=sys.stderr)
        return 2
    # The Celery app reads its configuration (the broker) once, from the settings in force then.
    use_settings(bench_settings("sqlite://", "http://127.0.0.1:9/2.0/", generate_key(), 0))
    from app.celery import app

    if app.conf.broker_url != REDIS_URL:
        print(f"the Celery app is configured for {app.conf.broker_url}, not {REDIS_URL}", file=sys.stderr)
        return 2
    knob_env, _ = _knobs(args)
    started = datetime.now(UTC)
    res: dict[str, Any] = {
        "label": args.label,
        "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench.nightly_bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_facts(),
        "settings": {
            "accounts": args.accounts,
            "users": args.users,
            "users_per_tenant": args.users_per_tenant,
            "latency_ms": args.latency_ms,
            "workers": args.workers,
            "concurrency": args.concurrency,
            "pool": args.pool,
            "noop_messages": args.noop,
            "scaling_noop_messages": args.scaling_noop if args.scaling else None,
            "rate_limit": args.rate_limit,
            "refresh_batch_accounts": _int(knob_env.get("BALANCES_REFRESH_BATCH_ACCOUNTS")),
            "refresh_batch_readers": _int(knob_env.get("BALANCES_REFRESH_BATCH_READERS")),
            "worker_env": {k: v for k, v in knob_env.items() if "KEY" not in k and "SECRET" not in k},
            "celery": {
                k: app.conf.get(k)
                for k in ("worker_prefetch_multiplier", "worker_max_tasks_per_child", "task_acks_late")
            },
        },
    }
    ok = True
    try:
        if not args.skip_planning and args.plan_accounts:
            log(f"planning {args.plan_accounts:,} accounts")
            res["planning"] = _phase(bench_planning, args)
            log(f"planning: {res['planning']}")
        if not args.skip_run:
            res["run"] = _phase(
                run_phase,
                args,
                "run",
                accounts=args.accounts,
                users=args.users,
                workers=args.workers,
                concurrency=args.concurrency,
                rate_limit=0,
                noop=args.noop,
                probes=True,
            )
            _ratio(res["run"])
        if not args.skip_rate and args.rate_accounts:
            rl = _phase(
                run_phase,
                args,
                "rate-limited",
                accounts=args.rate_accounts,
                users=args.rate_users,
                workers=args.workers,
                concurrency=args.concurrency,
                rate_limit=args.rate_limit,
                noop=0,
                probes=False,
            )
            if "error" not in rl:
                rl["bound_s"] = round(1.1 * rl["powens"]["calls"] / args.rate_limit, 3)
                rl["wall_over_bound"] = round(rl["wall_s"] / rl["bound_s"], 3) if rl["bound_s"] else None
                rl["bound_met"] = bool(
                    rl["ok"] and rl["wall_over_bound"] is not None and rl["wall_over_bound"] <= 1
                )
            res["rate_limited"] = rl
        if args.scaling:
            res["scaling"] = []
            for config in args.scaling_configs.split(","):
                w, c = (int(x) for x in config.lower().split("x"))
                point = _phase(
                    run_phase,
                    args,
                    f"scaling {w}x{c}",
                    accounts=args.scaling_accounts,
                    users=args.scaling_users,
                    workers=w,
                    concurrency=c,
                    rate_limit=0,
                    noop=args.scaling_noop,
                    probes=False,
                )
                point.setdefault("workers", w)
                point.setdefault("concurrency", c)
                _ratio(point)
                res["scaling"].append(point)
    except KeyboardInterrupt:
        res["interrupted"] = True
        ok = False
        log("interrupted: everything started was stopped and dropped")
    finally:
        use_settings(None)
    res["finished_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    phases = [res.get("planning"), res.get("run"), res.get("rate_limited"), *(res.get("scaling") or [])]
    ok = ok and all("error" not in p and p.get("ok", True) for p in phases if p)
    res["targets_met"] = {
        "on_demand": ((res.get("run") or {}).get("on_demand") or {}).get("targets_met"),
        "rate_limit_bound": (res.get("rate_limited") or {}).get("bound_met"),
    }
    res["ok"] = ok
    out = args.out or RESULTS / f"{args.label}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2, default=str) + "\n"
    out.write_text(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"latest-{args.label}.json").write_text(text)
    print(render(res))
    log(f"results: {out} (and {RESULTS / f'latest-{args.label}.json'})")
    return 0 if ok else 1


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _phase(fn: Any, args: argparse.Namespace, *a: Any, **kw: Any) -> dict[str, Any]:
    """A phase's results, or its error: one failing phase (code changing under the bench) does not
    lose the others."""
    try:
        return dict(fn(args, *a, **kw))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:2000], **kw}


def _ratio(r: dict[str, Any]) -> None:
    ceiling = (r.get("noop") or {}).get("ceiling_per_s")
    if ceiling and r.get("accounts_per_s"):
        r["ratio_to_ceiling"] = round(r["accounts_per_s"] / ceiling, 4)


if __name__ == "__main__":
    sys.exit(main())
