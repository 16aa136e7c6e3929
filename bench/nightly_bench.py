"""Benchmark of the nightly pipeline on this machine's PostgreSQL and Redis (not run by `make test`).

1. Planning: N accounts (default 100,000) planned and published to the real broker in batches;
   wall time and the Python heap peak (tracemalloc) of the planning call.
2. A whole run: M accounts (default 2,000) over real `celery -A app worker` processes against the
   sandbox: wall time, accounts per second, Powens calls against the number of Powens users.

    python -m bench.nightly_bench [--plan-accounts N] [--run-accounts M] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory

import psycopg
import redis
from sqlalchemy import insert

from app import pipeline
from app.celery import worker_argv
from app.config import load_settings, use_settings
from app.powens.sandbox import Sandbox, SandboxState
from app.store import runs
from app.store.db import session_scope
from app.store.migrate import upgrade
from app.store.models import BankAccount, BankConnection, PowensUser, Tenant
from app.store.secrets import TokenCipher, generate_key
from app.store.states import Trigger

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("BALANCES_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BALANCES_BENCH_REDIS", "redis://127.0.0.1:6379/12")
SIGNING_KEY = uuid.uuid4().hex + uuid.uuid4().hex


def seed(
    settings, sandbox: Sandbox | None, tenants: int, users_per_tenant: int, accounts_per_user: int
) -> int:  # type: ignore[no-untyped-def]
    """Rows straight into the store (discovery through Powens is not what is measured here)."""
    now = datetime.now(UTC)
    cipher = TokenCipher.from_settings(settings)
    n = 0
    with session_scope(settings) as s:
        s.execute(
            insert(Tenant),
            [
                {"id": f"b-{t:05d}", "name": f"bench {t}", "active": True, "created_at": now}
                for t in range(tenants)
            ],
        )
    uid = 0
    for t in range(tenants):
        users, conns, accs = [], [], []
        for _u in range(users_per_tenant):
            uid += 1
            if sandbox is not None:
                su = sandbox.state.create_user(connections=1, accounts_per_connection=accounts_per_user)
                powens_id, token, ext_conn = su.id, su.token, next(iter(su.connections))
                ext_accounts = sorted(su.accounts)
            else:
                powens_id, token, ext_conn = uid, f"tok-{uid}", uid
                ext_accounts = [uid * 1000 + k for k in range(accounts_per_user)]
            users.append(
                {
                    "id": uid,
                    "tenant_id": f"b-{t:05d}",
                    "powens_user_id": powens_id,
                    "token_encrypted": cipher.encrypt(token),
                    "created_at": now,
                    "updated_at": now,
                }
            )
            cid = f"con_{uuid.uuid4().hex}"
            conns.append(
                {
                    "id": cid,
                    "tenant_id": f"b-{t:05d}",
                    "powens_user_pk": uid,
                    "external_id": ext_conn,
                    "active": True,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            for ext in ext_accounts:
                accs.append(
                    {
                        "id": f"acc_{uuid.uuid4().hex}",
                        "tenant_id": f"b-{t:05d}",
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
        with session_scope(settings) as s:
            s.execute(insert(PowensUser), users)
            s.execute(insert(BankConnection), conns)
            s.execute(insert(BankAccount), accs)
        n += len(accs)
    return n


def fresh_db() -> tuple[str, str]:
    name = f"balances_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name


def drop_db(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_planning(n_accounts: int) -> None:
    name, url = fresh_db()
    try:
        settings = load_settings(
            database_url=url,
            celery_broker_url=REDIS_URL,
            encryption_key=generate_key(),
            signing_key=SIGNING_KEY,
            powens_base_url_override="http://127.0.0.1:9/2.0/",
        )
        use_settings(settings)
        upgrade(settings)
        r = redis.Redis.from_url(REDIS_URL)
        r.flushdb()
        t0 = time.perf_counter()
        seeded = seed(
            settings, None, tenants=max(1, n_accounts // 50), users_per_tenant=5, accounts_per_user=10
        )
        t_seed = time.perf_counter() - t0
        from app.tasks import publish_fanout

        run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
        tracemalloc.start()
        t0 = time.perf_counter()
        planned = pipeline.plan_run(settings, run_id, publish_fanout, lambda *_: None)
        elapsed = time.perf_counter() - t0
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        queued = r.llen("refresh")
        print(
            f"planning: {planned} accounts ({seeded} seeded in {t_seed:.1f}s) planned and published in "
            f"{elapsed:.2f}s = {planned / elapsed:,.0f} accounts/s; python heap peak {peak / 2**20:.1f} MiB; "
            f"{queued} messages on the refresh queue"
        )
        r.flushdb()
    finally:
        use_settings(None)
        drop_db(name)


def bench_run(n_accounts: int, workers: int, concurrency: int) -> None:
    name, url = fresh_db()
    key = generate_key()
    try:
        with Sandbox(SandboxState(seed=5)) as sb, TemporaryDirectory() as tmp:
            settings = load_settings(
                database_url=url,
                celery_broker_url=REDIS_URL,
                encryption_key=key,
                signing_key=SIGNING_KEY,
                powens_base_url_override=sb.base_url,
                powens_rate_limit=0,
            )
            use_settings(settings)
            upgrade(settings)
            redis.Redis.from_url(REDIS_URL).flushdb()
            per_user = 10
            users = max(1, n_accounts // per_user)
            seeded = seed(
                settings, sb, tenants=max(1, users // 4), users_per_tenant=4, accounts_per_user=per_user
            )
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_", "CELERY_"))
            }
            env.update(
                {
                    "DATABASE_URL": url,
                    "CELERY_BROKER_URL": REDIS_URL,
                    "POWENS_BASE_URL": sb.base_url,
                    "BALANCES_ENCRYPTION_KEY": key,
                    "BALANCES_SIGNING_KEY": SIGNING_KEY,
                    "BALANCES_POWENS_RATE_LIMIT": "0",
                    "BALANCES_LOG_LEVEL": "WARNING",
                }
            )
            procs = []
            for w in range(workers):
                port = 19500 + w
                log = open(Path(tmp) / f"w{w}.log", "wb")  # noqa: SIM115 - closed with the process
                procs.append(
                    subprocess.Popen(
                        worker_argv(f"bench{w}@%h", concurrency=concurrency, loglevel="WARNING"),
                        cwd=ROOT,
                        env=dict(
                            env,
                            BALANCES_METRICS_PORT=str(port),
                            BALANCES_METRICS_DIR=str(Path(tmp) / f"m{w}"),
                        ),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            time.sleep(4)
            sb.state.reset_stats()
            from app.tasks import enqueue_plan

            t0 = time.perf_counter()
            run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
            enqueue_plan(run_id)
            status = None
            while time.perf_counter() - t0 < 1800:
                status = runs.run_status(settings, run_id)
                if status and status["status"] not in ("pending", "planning", "running"):
                    break
                time.sleep(0.5)
            elapsed = time.perf_counter() - t0
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=60)
            calls = sb.state.stats()["total"]
            assert status is not None
            print(
                f"run: {seeded} accounts, {users} Powens users, {status['tenants']['total']} tenants, "
                f"{workers} worker(s) x {concurrency}: {status['status']} in {elapsed:.1f}s "
                f"({seeded / elapsed:,.0f} accounts/s); {status['accounts']}; "
                f"Powens calls {calls} = {calls / users:.3f} x users"
            )
    finally:
        use_settings(None)
        drop_db(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan-accounts", type=int, default=100_000)
    ap.add_argument("--run-accounts", type=int, default=2_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    if args.plan_accounts:
        bench_planning(args.plan_accounts)
    if args.run_accounts:
        bench_run(args.run_accounts, args.workers, args.concurrency)


if __name__ == "__main__":
    main()
