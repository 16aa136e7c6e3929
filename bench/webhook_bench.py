"""Benchmark of the push path on this machine's PostgreSQL and Redis (not run by `make test`).

1. Receive latency: the sandbox signs CONNECTION_SYNCED pushes (IBANs and transactions included) and
   posts them over HTTP to `balances webhooks serve` (uvicorn, one process); per request, the client's
   round trip and the receiver's own `Server-Timing` split (verification and parsing; the broker write).
   Sequential, then with 8 concurrent senders.
2. Powens calls saved: a nightly run over U Powens users with no push (the baseline), then pushes for a
   share of the users (the others' pushes "lost"), applied by a real worker, then a second nightly run:
   Powens calls of each run against the number of users.

    python -m bench.webhook_bench [--users U] [--accounts-per-user A] [--pushed 0.9] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import redis
import requests
from sqlalchemy import func, select

from app.config import load_settings, use_settings
from app.devtools.sandbox import Sandbox, SandboxState
from app.jsonio import dumps
from app.nightly import pipeline
from app.push.signature import sign
from app.store import runs
from app.store.db import session_scope
from app.store.migrate import upgrade
from app.store.models import BankAccount
from app.store.secrets import generate_key
from app.store.states import Trigger
from bench.nightly_bench import REDIS_URL, SIGNING_KEY, drop_db, fresh_db, seed
from tests.support.processes import run_receiver, run_worker

SECRET = "bench-webhook-secret"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def post(session: requests.Session, url: str, body: dict[str, Any]) -> tuple[int, float, float, float]:
    """(status, round trip ms, receiver's verify+parse ms, receiver's broker write ms)"""
    raw = dumps(body).encode()
    date = datetime.now(UTC).isoformat()
    path = "/webhooks/powens/CONNECTION_SYNCED"
    headers = {"BI-Signature": sign(SECRET.encode(), "POST", path, date, raw), "BI-Signature-Date": date}
    t0 = time.perf_counter()
    resp = session.post(url + "/CONNECTION_SYNCED", data=raw, headers=headers, timeout=30)
    rtt = (time.perf_counter() - t0) * 1000
    timing = dict(
        part.strip().split(";dur=")
        for part in resp.headers.get("Server-Timing", "").split(",")
        if part.strip()
    )
    return resp.status_code, rtt, float(timing.get("verify", "nan")), float(timing.get("enqueue", "nan"))


def report(label: str, samples: list[tuple[int, float, float, float]]) -> None:
    ok = [s for s in samples if s[0] == 202]
    rtt, verify, enqueue = ([s[i] for s in ok] for i in (1, 2, 3))
    print(
        f"{label}: {len(ok)}/{len(samples)} answered 202; round trip p50 {statistics.median(rtt):.1f} ms, "
        f"p99 {quantile(rtt, 0.99):.1f} ms; receiver excluding the broker write p50 "
        f"{statistics.median(verify):.2f} ms, p99 {quantile(verify, 0.99):.2f} ms; broker write p50 "
        f"{statistics.median(enqueue):.2f} ms, p99 {quantile(enqueue, 0.99):.2f} ms; mean body "
        f"{statistics.mean(s[4] for s in samples) / 1024:.1f} KiB"  # type: ignore[misc]
    )


def nightly(settings: Any, sandbox: Sandbox) -> tuple[int, dict[str, Any], float]:
    from app.worker.tasks import enqueue_plan

    sandbox.state.reset_stats()
    t0 = time.perf_counter()
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
    enqueue_plan(run_id)
    while True:
        status = runs.run_status(settings, run_id)
        if status and status["status"] not in ("pending", "planning", "running"):
            return sandbox.state.stats()["total"], status, time.perf_counter() - t0
        if time.perf_counter() - t0 > 1800:
            raise RuntimeError("nightly run did not finish in 30 min")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--accounts-per-user", type=int, default=4)
    ap.add_argument("--pushed", type=float, default=0.9, help="share of users whose push arrives")
    ap.add_argument("--rounds", type=int, default=3, help="pushes per pushed user (latency samples)")
    args = ap.parse_args()
    name, url = fresh_db()
    key = generate_key()
    try:
        with Sandbox(SandboxState(seed=9)) as sb, TemporaryDirectory() as tmp:
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
            r = redis.Redis.from_url(REDIS_URL)
            r.flushdb()
            users = args.users
            accounts = seed(settings, sb, tenants=max(1, users // 4), users_per_tenant=4,
                            accounts_per_user=args.accounts_per_user)  # fmt: skip
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
                    "POWENS_WEBHOOK_SECRET": SECRET,
                    "BALANCES_POWENS_RATE_LIMIT": "0",
                }
            )
            with contextlib.ExitStack() as running:
                # The receiver logs warnings only (its latency is measured); the worker logs its
                # readiness at INFO, which its launcher waits for.
                receiver_log = Path(tmp) / "receiver.log"
                receiver = running.enter_context(
                    run_receiver(env, receiver_log, BALANCES_LOG_LEVEL="WARNING")
                )
                running.enter_context(run_worker(env, Path(tmp) / "worker.log", concurrency=4, name="benchw"))
                measure(args, settings, sb, r, receiver.url, users, accounts)
    finally:
        use_settings(None)
        drop_db(name)


def measure(
    args: argparse.Namespace,
    settings: Any,
    sb: Sandbox,
    r: redis.Redis,
    base: str,
    users: int,
    accounts: int,
) -> None:
    """The nightly run without pushes, the receive latency, the pushes applied, the nightly run with
    pushes (on a running receiver and worker)."""
    calls_before, status, took = nightly(settings, sb)
    print(
        f"nightly without pushes: {accounts} accounts, {users} Powens users: {status['status']} in "
        f"{took:.1f}s; Powens calls {calls_before} = {calls_before / users:.3f} x users"
    )

    state = sb.state
    pushed_users = list(state.users.values())[: int(users * args.pushed)]
    bodies = []
    for _round in range(args.rounds):
        for user in pushed_users:
            conn = next(iter(user.connections.values()))
            state.sync_connection(user, conn, push=False)  # Powens synced: the push carries it
            bodies.append(state.connection_synced_body(user, conn))
    half = len(bodies) // 2
    session = requests.Session()
    sequential = []
    for body in bodies[:half]:
        sample = post(session, base, body)
        sequential.append((*sample, len(dumps(body))))
    report(f"receive, sequential ({half} pushes)", sequential)  # type: ignore[arg-type]

    def one(body: dict[str, Any]) -> tuple[int, float, float, float, int]:
        return (*post(requests.Session(), base, body), len(dumps(body)))

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, bodies[half:]))
    report(f"receive, 8 concurrent senders ({len(bodies) - half} pushes)", concurrent)  # type: ignore[arg-type]

    expected = len(pushed_users) * args.accounts_per_user
    t0 = time.monotonic()
    while True:
        with session_scope(settings) as s:
            done = s.scalar(
                select(func.count()).select_from(BankAccount).where(BankAccount.pushed_at.is_not(None))
            )
        if done and done >= expected and r.llen("push") == 0:
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"pushes not applied: {done}/{expected}")
        time.sleep(0.2)
    print(
        f"applied: {expected} accounts stored from {len(bodies)} pushes, "
        f"{time.monotonic() - t0:.1f}s after the last answer"
    )

    calls_after, status, took = nightly(settings, sb)
    saved = calls_before - calls_after
    print(
        f"nightly with pushes for {len(pushed_users)}/{users} users: {status['status']} in "
        f"{took:.1f}s; {status['accounts']}; Powens calls {calls_after} = "
        f"{calls_after / users:.3f} x users (saved {saved} of {calls_before}, "
        f"{saved / calls_before:.0%})"
    )


if __name__ == "__main__":
    main()
