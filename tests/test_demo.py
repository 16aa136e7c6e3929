"""``balances demo`` on a machine with no services: a fresh directory, no DATABASE_URL/broker."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support.processes import ROOT


def no_service_env() -> dict[str, str]:
    """This environment less every setting of ours: what a new user's shell has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_", "CELERY_"))}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_demo(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``balances demo`` as a new user runs it, in ``cwd`` (where its SQLite file lands)."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "demo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_demo_runs_with_no_services_and_prints_refreshed_balances(tmp_path: Path) -> None:
    env = no_service_env()
    # Nothing may need Redis: point coordination at a closed port to prove it is never dialled.
    env["BALANCES_REDIS_URL"] = "redis://127.0.0.1:9/0"
    proc = run_demo(tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "tasks run in-process" in out
    m = re.search(r"(\d+) of (\d+) accounts refreshed, (\d+) failed", out)
    assert m, out
    refreshed, total, failed = map(int, m.groups())
    assert total == 6 and refreshed == 4 and failed == 2  # 3 tenants x 2 accounts; one SCA connection
    assert "needs_user_action" in out
    # A push arrived for the first tenant's connection: the nightly run reads only the other two users.
    assert re.search(r"2 of 2 accounts stored from the push .*; 0 Powens calls", out), out
    assert re.search(r"run run_\S+ completed: 4 ok, 2 failed, 0 stale of 6 accounts; 2 Powens calls", out), (
        out
    )
    assert "needs the user: connection" in out and "trend over" in out
    # The command the demo prints to read its records back works as printed.
    hint = re.search(r"Canonical records: (balances [^(]+?) \(same database;", out)
    assert hint, out
    shown = subprocess.run(
        [sys.executable, "-m", "app.cli", *hint.group(1).split()[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0 and "demo-acme" in shown.stdout, shown.stdout + shown.stderr
    # The embedded default database is a file in the working directory, holding what was printed.
    db = tmp_path / "balances.db"
    assert db.exists()
    with sqlite3.connect(db) as conn:
        outcomes = dict(
            conn.execute(
                "SELECT trigger || ':' || outcome, count(*) FROM refresh_attempts GROUP BY 1"
            ).fetchall()
        )
        assert outcomes == {
            "on_demand:succeeded": 4,
            "on_demand:failed": 2,
            "scheduled:succeeded": 4,
            "scheduled:failed": 2,
            "webhook:succeeded": 2,  # the push
        }
        retried = conn.execute("SELECT attempts FROM refresh_attempts WHERE attempts > 1").fetchall()
        assert retried == [(2,)]  # the account with one scripted 503
        assert conn.execute("SELECT status FROM refresh_runs").fetchall() == [("completed",)]
        assert conn.execute("SELECT count(*) FROM tenant_summaries").fetchone() == (3,)
        assert conn.execute("SELECT count(DISTINCT tenant_id) FROM cashflow_forecasts").fetchone() == (2,)
        amounts = [r[0] for r in conn.execute("SELECT current_balance FROM account_balances")]
        assert all(re.fullmatch(r"-?\d+(\.\d+)?", a) for a in amounts)  # exact decimal text, no float

    # Running it again in the same directory is idempotent: same tenants, same accounts, and each run
    # shows its own push (the third run once counted the earlier runs' pushes: "4 of 2", exit 1).
    for run in (2, 3):
        again = run_demo(tmp_path, env)
        assert again.returncode == 0, again.stdout + again.stderr
        shown = " ".join(again.stdout.split())
        assert re.search(r"2 of 2 accounts stored from the push", shown), again.stdout
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM bank_accounts").fetchone() == (6,)
            completed = "SELECT count(*) FROM refresh_runs WHERE status = 'completed'"
            assert conn.execute(completed).fetchone() == (run,)


def test_an_unmigrated_or_unreachable_database_is_a_clear_error_without_the_url(tmp_path: Path) -> None:
    env = no_service_env()
    for url in (None, "postgresql+psycopg://nobody:s3cretpw@127.0.0.1:1/x"):
        if url:
            env["DATABASE_URL"] = url
        else:
            env.pop("DATABASE_URL", None)
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "--as", "bob", "show", "--tenant", "t"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 1
        assert "balances db upgrade" in " ".join(proc.stderr.split())
        assert "s3cretpw" not in proc.stdout + proc.stderr
