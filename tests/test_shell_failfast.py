"""The admin shell fails fast and spends nothing on a mistake: unknown input is refused before anything
is dispatched (or a forced sync spent), a message is never published unsigned or to a queue nobody
consumes, `run nightly` leaves no run that nobody plans, and configuration and database problems are
one line that says what to do."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from app.config import Settings
from app.contract import OpenBankingRefreshBalancesInput
from app.devtools.sandbox import Sandbox
from app.store.db import session_scope
from app.store.models import ForcedSync, RefreshAttempt, RefreshRun
from app.store.states import Trigger
from tests.support.data import seed_tenant
from tests.support.processes import ROOT, free_port, run_cli, run_worker, service_env

pytestmark = pytest.mark.e2e


def _env(settings: Settings, sandbox: Sandbox, **extra: str) -> dict[str, str]:
    return service_env(settings.database_url, settings.celery_broker_url, sandbox, **extra)


def _queued(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.celery_broker_url)
    return sum(int(client.llen(q)) for q in ("interactive", "refresh", "reports", "push"))


def _one_line_error(proc: object) -> str:
    """The command's error: one line (off a terminal, stderr also carries the JSON log lines)."""
    stderr = getattr(proc, "stderr", "")
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# -- 5, 6: unknown input is an error, before anything is dispatched or spent -------------------------


@pytest.mark.parametrize(
    ("args", "code", "reason"),
    [
        (["show", "--tenant", "nope"], 1, "not_found"),
        (["show", "--tenant", ""], 2, "invalid_input"),
        (["show", "--tenant", "t" * 200], 2, "invalid_input"),
        (["accounts", "list", "--tenant", "nope"], 1, "not_found"),
        (["show", "--tenant", "known", "--balance-type", "curent"], 2, "invalid_input"),
        (["show", "--tenant", "known", "--account", "acc_nope"], 1, "not_found"),
        (["connections", "list", "--tenant", "nope"], 1, "not_found"),
        (["accounts", "history", "--tenant", "known", "--account", "acc_nope"], 1, "not_found"),
    ],
)
def test_unknown_tenant_account_or_balance_type_is_an_error_not_an_empty_listing(
    settings: Settings, sandbox: Sandbox, args: list[str], code: int, reason: str
) -> None:
    seed_tenant(settings, sandbox, "known")
    proc = run_cli(_env(settings, sandbox), "--as", "alice", *args)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert _one_line_error(proc).startswith(f"{reason}:")
    assert proc.stdout == ""  # no empty table
    as_json = run_cli(_env(settings, sandbox), "--as", "alice", *args, "--json")
    assert as_json.returncode == code and f'"reason": "{reason}"' in as_json.stdout


def test_a_mistyped_balance_type_spends_no_forced_sync_and_dispatches_nothing(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "typo")
    sandbox.state.reset_stats()
    env = _env(settings, sandbox)
    args = ["--as", "alice", "refresh", "--tenant", "typo", "--account", t.account_ids[0]]
    proc = run_cli(env, *args, "--balance-type", "curent", "--force")
    assert proc.returncode == 2, proc.stderr
    assert "unknown balance type 'curent'" in _one_line_error(proc)
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0
    assert _queued(settings) == 0
    assert sandbox.state.stats()["total"] == 0  # not even a read


# -- 3: never unsigned, never to nobody --------------------------------------------------------------


def test_a_process_without_its_signing_key_publishes_nothing(settings: Settings) -> None:
    """Signing is part of sending: a publish without the key raises and puts nothing on the broker (a
    ``before_task_publish`` receiver's exception is swallowed by Celery: the message went unsigned)."""
    from app.config import use_settings
    from app.signing import SigningKeyMissing
    from app.worker.tasks import dispatch_refresh

    use_settings(settings.model_copy(update={"signing_key": None}))
    with pytest.raises(SigningKeyMissing):
        dispatch_refresh(
            OpenBankingRefreshBalancesInput(tenant_id="t", account_id="a"), "alice", Trigger.ON_DEMAND
        )
    assert _queued(settings) == 0


def test_refresh_without_the_signing_key_or_a_worker_fails_fast_and_publishes_nothing(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "fast")
    args = ["--as", "alice", "refresh", "--tenant", "fast", "--account", t.account_ids[0]]
    no_key = run_cli(_env(settings, sandbox, BALANCES_SIGNING_KEY=""), *args)
    assert no_key.returncode == 2
    assert "BALANCES_SIGNING_KEY is not set" in _one_line_error(no_key)
    nobody = run_cli(_env(settings, sandbox), *args, timeout=30)  # no worker runs: said in seconds
    assert nobody.returncode == 1
    assert "no worker consumes the 'interactive' queue" in _one_line_error(nobody)
    broker_down = run_cli(
        _env(settings, sandbox, CELERY_BROKER_URL="redis://127.0.0.1:1/0"), *args, timeout=30
    )
    assert broker_down.returncode == 1 and "broker did not answer" in _one_line_error(broker_down)
    assert _queued(settings) == 0
    with session_scope(settings) as s:  # nothing was refreshed, nothing was refused either
        assert s.scalar(select(func.count()).select_from(RefreshAttempt)) == 0


def test_refresh_waits_for_its_outcome_with_a_worker_and_says_what_it_waited_for_when_late(
    settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    t = seed_tenant(settings, sandbox, "waits")
    env = _env(settings, sandbox)
    args = ["--as", "alice", "refresh", "--tenant", "waits", "--account", t.account_ids[0]]
    with run_worker(env, tmp_path / "w.log", queues="interactive"):
        done = run_cli(env, *args, "--json")
        assert done.returncode == 0, done.stderr
        assert '"balanceType": "current"' in done.stdout
        sandbox.state.knobs.latency_ms = 3000
        late = run_cli(env, *args, "--timeout", "0.5")
    assert late.returncode == 4, late.stderr
    assert "still queued or running" in _one_line_error(late)


# -- 4: run nightly ------------------------------------------------------------------------------------


def test_run_nightly_with_no_worker_exits_at_once_and_leaves_no_run(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "nightly")
    proc = run_cli(_env(settings, sandbox), "--as", "alice", "run", "nightly", "--timeout", "5", timeout=30)
    assert proc.returncode == 1
    assert "no worker consumes the 'reports' queue" in _one_line_error(proc)
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(RefreshRun)) == 0
    assert _queued(settings) == 0


def test_run_nightly_still_running_at_its_timeout_exits_4_and_prints_its_status(
    settings: Settings, sandbox: Sandbox, tmp_path: Path
) -> None:
    seed_tenant(settings, sandbox, "slow", accounts=4)
    sandbox.state.knobs.latency_ms = 2000
    env = _env(settings, sandbox)
    with run_worker(env, tmp_path / "w.log"):
        proc = run_cli(env, "--as", "alice", "run", "nightly", "--timeout", "0.5")
        assert proc.returncode == 4, proc.stdout + proc.stderr
        assert "run_" in proc.stdout and "it goes on: balances run status run_" in proc.stderr
        run_id = proc.stderr.split("balances run status ")[1].split()[0]
        finished = run_cli(env, "--as", "alice", "run", "nightly", "--json", timeout=120)
        assert finished.returncode == 0, finished.stderr
    listed = run_cli(env, "--as", "alice", "run", "list", "--format", "tsv")
    assert run_id in listed.stdout


# -- 8, 9: configuration and database problems are one line --------------------------------------------


def test_a_malformed_database_url_is_one_line_naming_the_variable(tmp_path: Path) -> None:
    env = _bare_env(DATABASE_URL="notaurl")
    proc = _cli(env, tmp_path, "--as", "bob", "show", "--tenant", "t")
    assert proc.returncode == 2
    assert "DATABASE_URL: not a database URL" in _one_line_error(proc)


def test_a_missing_embedded_database_is_not_created_by_a_read(tmp_path: Path) -> None:
    proc = _cli(_bare_env(), tmp_path, "--as", "bob", "show", "--tenant", "t")
    assert proc.returncode == 1
    line = _one_line_error(proc)
    assert f"no database at {tmp_path / 'balances.db'}" in line and "make demo" in line
    assert not (tmp_path / "balances.db").exists()


def test_a_postgresql_database_that_does_not_exist_is_named_without_the_password(tmp_path: Path) -> None:
    from tests.conftest import PG_ADMIN_DSN

    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    host_part = base.split("//", 1)[1].split("@")[-1]
    url = f"postgresql+psycopg://postgres:s3cretpw@{host_part}/no_such_database_here"
    proc = _cli(_bare_env(DATABASE_URL=url), tmp_path, "--as", "bob", "show", "--tenant", "t")
    assert proc.returncode == 1
    line = _one_line_error(proc)
    assert "'no_such_database_here'" in line and "does not exist" in line and "s3cretpw" not in proc.stderr


def test_webhooks_serve_on_a_busy_metrics_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = _bare_env(POWENS_WEBHOOK_SECRET="s" * 32, BALANCES_PUSH_SIGNING_KEY="k" * 32)
        proc = _cli(
            env, tmp_path, "webhooks", "serve", "--port", str(free_port()), "--metrics-port", str(port)
        )
    assert proc.returncode == 2
    assert f"--metrics-port {port} is in use" in _one_line_error(proc)


def test_the_receiver_does_not_default_to_the_workers_metrics_port() -> None:
    from app.cli.admin_cmds import RECEIVER_METRICS_PORT

    assert Settings.model_fields["metrics_port"].default != RECEIVER_METRICS_PORT


def _bare_env(**extra: str) -> dict[str, str]:
    from tests.test_demo import no_service_env

    return {**no_service_env(), **extra}


def _cli(env: dict[str, str], cwd: Path, *args: str) -> object:
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_refresh_beside_no_database_creates_none_either(tmp_path: Path) -> None:
    proc = _cli(_bare_env(), tmp_path, "--as", "bob", "refresh", "--tenant", "t", "--account", "a")
    assert proc.returncode == 1 and "no database at" in _one_line_error(proc)
    assert not list(tmp_path.glob("balances.db*"))


def test_run_sweep_with_the_broker_down_is_one_line(settings: Settings, sandbox: Sandbox) -> None:
    seed_tenant(settings, sandbox, "sweep-down")
    env = _env(settings, sandbox, CELERY_BROKER_URL="redis://127.0.0.1:1/0")
    proc = run_cli(env, "--as", "alice", "run", "sweep", timeout=120)
    assert proc.returncode == 1 and "could not publish to the broker" in _one_line_error(proc)
    no_key = run_cli(_env(settings, sandbox, BALANCES_SIGNING_KEY=""), "--as", "alice", "run", "sweep")
    assert no_key.returncode == 2 and "BALANCES_SIGNING_KEY is not set" in _one_line_error(no_key)


def test_summary_forecast_and_accounts_sync_refuse_what_is_not_a_tenant_id(
    settings: Settings, sandbox: Sandbox
) -> None:
    seed_tenant(settings, sandbox, "a-tenant")  # alice is an admin
    for command in (("summary",), ("forecast",), ("accounts", "sync")):
        proc = run_cli(_env(settings, sandbox), "--as", "alice", *command, "--tenant", "t" * 200)
        assert proc.returncode == 2 and _one_line_error(proc).startswith("invalid_input:"), command


def test_webhooks_serve_refuses_one_port_for_both(tmp_path: Path) -> None:
    env = _bare_env(POWENS_WEBHOOK_SECRET="s" * 32, BALANCES_PUSH_SIGNING_KEY="k" * 32)
    port = str(free_port())
    proc = _cli(env, tmp_path, "webhooks", "serve", "--port", port, "--metrics-port", port)
    assert proc.returncode == 2 and "both" in _one_line_error(proc)
