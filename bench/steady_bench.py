"""The steady-state benchmark (``make bench-steady``): the nightly run on a database that has lived,
against the same run on a young one, in one invocation, and what planning, the broker and the metrics
cost at the sizes the README plans for. Not run by ``make test``.

Phases, each on its own throwaway database:

1. **Planning at scale** (``--plan-sizes``, default 1 M and 10 M accounts): accounts seeded in SQL, then
   the run planned step by step in this process exactly as workers run it (``bench.nightly_bench.
   plan_in_steps``), the database side only (``--plan-publish none``: at 10 M the messages would not
   fit a broker, and in production backpressure keeps them out of it): wall time, steps, the longest
   step against its own time limit (target: none over half of it), statements.
2. **Fan-out through the broker** (``--fanout-accounts``, 1 M): planned with real publishing and the
   shipped backpressure, while a drain empties the ``refresh`` queue at a worker fleet's pace
   (``--drain-per-s`` messages); Redis' peak memory (target ≤ 256 MiB).
3. **Young and aged**: ``bench.nightly_bench``'s full run (no-op ceiling, then the nightly run of
   ``--accounts``, CPU of workers and PostgreSQL, statements) on a young database holding only those
   accounts, then on an aged one that also holds ``--history-accounts`` more accounts (inactive
   tenants: in every table and index, not refreshed), ``--days`` days of snapshots of every account and,
   for the last ``--item-days`` days, a completed run's items and audit rows each (what retention
   keeps). Targets: per-account cost aged ≤ 1.2 x young; ratio to the no-op ceiling ≥ 0.6.
   Table sizes of the aged database are reported.

    python -m bench.steady_bench                      # everything, the sizes above (hours)
    python -m bench.steady_bench --phases planning    # one phase
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from app.config import Settings, use_settings
from app.nightly import pipeline
from app.store.db import get_engine
from app.store.migrate import upgrade
from app.store.secrets import generate_key
from app.store.states import Trigger
from bench import history
from bench.nightly_bench import (
    REDIS_URL,
    bench_settings,
    drop_db,
    fresh_db,
    log,
    machine_facts,
    plan_in_steps,
    shielded,
)

RESULTS = Path(__file__).resolve().parent / "results"


def planning_at(accounts: int, per_user: int = 5, users_per_tenant: int = 10) -> dict[str, Any]:
    """Seed ``accounts`` (SQL), then plan them step by step, the database side only."""
    name, url = fresh_db()
    settings = None
    try:
        settings = bench_settings(url, "http://127.0.0.1:9/2.0/", generate_key(), 0)
        use_settings(settings)
        upgrade(settings)
        users = accounts // per_user
        t0 = time.perf_counter()
        seeded = history.seed_accounts(
            url,
            first_user=1,
            users=users,
            per_user=per_user,
            users_per_tenant=users_per_tenant,
            prefix="p",
            active=True,
            token=b"not-a-token",
        )
        history.vacuum_analyze(url)
        seed_s = time.perf_counter() - t0
        log(f"planning {accounts:,}: seeded in {seed_s:.0f} s {seeded}")
        run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
        t0 = time.perf_counter()
        planned, took = plan_in_steps(settings, run_id, lambda *_: None)
        wall = time.perf_counter() - t0
        limit = settings.plan_time_limit
        result = {
            "accounts": accounts,
            "users": users,
            "planned": planned,
            "seed_s": round(seed_s, 1),
            "wall_s": round(wall, 1),
            "accounts_per_s": round(planned / wall) if wall else None,
            "steps": len(took),
            "page_accounts": settings.plan_page_accounts,
            "step_s": {"mean": round(sum(took) / len(took), 4), "max": round(max(took), 4)},
            "step_limit_s": limit,
            "max_step_share_of_limit": round(max(took) / limit, 4),
        }
        log(f"planning {accounts:,}: {result}")
        return result
    finally:
        with shielded():
            if settings is not None:
                get_engine(settings).dispose()
            drop_db(name)


class Drain(threading.Thread):
    """Takes messages off the ``refresh`` queue at ``per_s`` a second: a worker fleet's pace."""

    def __init__(self, client: redis.Redis, per_s: float) -> None:
        super().__init__(daemon=True)
        self.client, self.per_s, self.taken = client, per_s, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t0 = time.perf_counter()
            got = self.client.rpop("refresh", 50)
            self.taken += len(got or [])
            time.sleep(max(0.0, 50 / self.per_s - (time.perf_counter() - t0)))


def fanout(accounts: int, drain_per_s: float, per_user: int = 5) -> dict[str, Any]:
    """Plan ``accounts`` with real publishing and the shipped backpressure while a drain consumes:
    Redis' memory while the whole night goes through the broker."""
    from app.worker import tasks

    name, url = fresh_db()
    r = redis.Redis.from_url(REDIS_URL)
    settings = None
    drain = None
    try:
        settings = bench_settings(url, "http://127.0.0.1:9/2.0/", generate_key(), 0)
        use_settings(settings)
        upgrade(settings)
        history.seed_accounts(
            url,
            first_user=1,
            users=accounts // per_user,
            per_user=per_user,
            users_per_tenant=10,
            prefix="f",
            active=True,
            token=b"not-a-token",
        )
        history.vacuum_analyze(url)
        r.flushdb()
        r.config_resetstat()
        base = int(r.info("memory")["used_memory"])
        run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor="bench")
        drain = Drain(r, drain_per_s)
        drain.start()
        waits = [0]

        def queued() -> int:
            depth = int(r.llen("refresh"))
            if depth * settings.refresh_batch_accounts >= settings.plan_queue_accounts:
                waits[0] += 1
                time.sleep(0.5)  # the step's countdown, shortened: the drain goes on meanwhile
            return depth

        peak = [0]

        def sample() -> None:
            while drain is not None and not drain.stopped.is_set():
                peak[0] = max(peak[0], int(r.info("memory")["used_memory"]))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        steps: list[Any] = []
        pipeline.begin_planning(settings, run_id, lambda _r, a, _c: steps.append(a))
        while steps:
            pipeline.plan_step(
                settings,
                run_id,
                steps.pop(),
                publish=tasks.publish_page,
                enqueue_step=lambda _r, a, _c: steps.append(a),
                enqueue_summary=lambda *_: None,
                queued=queued,
            )
        wall = time.perf_counter() - t0
        result = {
            "accounts": accounts,
            "drain_per_s": drain_per_s,
            "budget_accounts": settings.plan_queue_accounts,
            "wall_s": round(wall, 1),
            "backpressure_waits": waits[0],
            "redis_used_memory_base_mib": round(base / 2**20, 1),
            "redis_used_memory_peak_mib": round(peak[0] / 2**20, 1),
            "redis_peak_info_mib": round(int(r.info("memory")["used_memory_peak"]) / 2**20, 1),
        }
        log(f"fan-out {accounts:,}: {result}")
        return result
    finally:
        with shielded():
            if drain is not None:
                drain.stopped.set()
            if settings is not None:
                get_engine(settings).dispose()
            drop_db(name)
            r.flushdb()


def runs(args: argparse.Namespace) -> dict[str, Any]:
    """The same nightly run (bench.nightly_bench's full run) on a young database, then on an aged
    one; their per-account costs side by side."""
    from bench import nightly_bench

    full = nightly_bench.parse_args(
        [
            "--accounts", str(args.accounts), "--users", str(args.accounts // 5),
            "--latency-ms", "100", "--skip-planning", "--skip-rate",
        ]
    )  # fmt: skip
    users = args.accounts // 5

    def aged(settings: Settings, url: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        added = history.seed_accounts(
            url,
            first_user=users + 1,
            users=args.history_accounts // 5,
            per_user=5,
            users_per_tenant=10,
            prefix="h",
            active=False,
            token=b"not-a-token",
        )
        log(f"aged: {args.history_accounts:,} more accounts in {added}")
        seeded = history.seed_history(
            url, days=args.days, item_days=args.item_days, today=settings.business_day(), log=log
        )
        sizes = history.table_sizes(url)
        log(f"aged: history in {time.perf_counter() - t0:.0f} s {seeded}; sizes {sizes}")
        return {
            "history_accounts": args.history_accounts,
            "days": args.days,
            "item_days": args.item_days,
            "seconds": round(time.perf_counter() - t0),
            "accounts_s": added,
            "history_s": seeded,
            "table_sizes": sizes,
        }

    common = {
        "accounts": args.accounts,
        "users": users,
        "workers": 2,
        "concurrency": 2,
        "rate_limit": 0,
        "noop": args.noop,
        "probes": True,
    }
    young = nightly_bench.run_phase(full, "young", **common)
    nightly_bench._ratio(young)
    old = nightly_bench.run_phase(full, "aged", prepare=aged, **common)
    nightly_bench._ratio(old)
    return {"young": young, "aged": old, "compared": compare(young, old)}


def compare(young: dict[str, Any], aged: dict[str, Any]) -> dict[str, Any]:
    """Aged over young, per account: what a year of history costs the nightly run."""

    def per_account(r: dict[str, Any], *path: str) -> float | None:
        value: Any = r
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else None

    out: dict[str, Any] = {}
    for name, path in (
        ("worker_cpu_ms_per_account", ("cpu", "ms_per_account", "workers")),
        ("postgres_cpu_ms_per_account", ("cpu", "ms_per_account", "postgres")),
        ("statements_per_account", ("db_statements", "per_account_excl_probes")),
        ("ratio_to_ceiling", ("ratio_to_ceiling",)),
        ("accounts_per_s", ("accounts_per_s",)),
    ):
        y, a = per_account(young, *path), per_account(aged, *path)
        out[name] = {"young": y, "aged": a, "aged_over_young": round(a / y, 3) if y and a else None}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--phases", default="planning,fanout,runs", help="comma-separated: planning, fanout, runs"
    )
    ap.add_argument("--plan-sizes", default="1000000,10000000")
    ap.add_argument("--fanout-accounts", type=int, default=1_000_000)
    ap.add_argument("--drain-per-s", type=float, default=100.0, help="messages/s taken off the refresh queue")
    ap.add_argument("--accounts", type=int, default=100_000, help="accounts the nightly run refreshes")
    ap.add_argument(
        "--history-accounts", type=int, default=900_000, help="more accounts in the aged database"
    )
    ap.add_argument("--days", type=int, default=90, help="days of snapshots of every account")
    ap.add_argument("--item-days", type=int, default=35, help="days of run items and audit rows (retention)")
    ap.add_argument("--noop", type=int, default=20_000, help="no-op messages of the ceiling")
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    phases = set(args.phases.split(","))
    started = datetime.now(UTC)
    res: dict[str, Any] = {
        "started": started.isoformat(),
        "machine": machine_facts(),
        "args": {**vars(args), "out": str(args.out)},
    }
    if "planning" in phases:
        res["planning"] = [planning_at(int(n)) for n in args.plan_sizes.split(",")]
    if "fanout" in phases:
        res["fanout"] = fanout(args.fanout_accounts, args.drain_per_s)
    if "runs" in phases:
        res["runs"] = runs(args)
    out = args.out or RESULTS / f"steady-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(res, indent=2, default=str))
    (RESULTS / "latest-steady.json").write_text(json.dumps(res, indent=2, default=str))
    log(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
