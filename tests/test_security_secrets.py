"""The secrets scan: after a run with failures and retries, no secret or full IBAN anywhere the service
writes (logs, telemetry, metrics, Redis, the database); the scrubber's fast path changes nothing.
Figures go to build/security.json (``tests.support.figures``)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections import deque
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.store.db import session_scope
from app.store.models import RefreshAttempt, RefreshRun
from tests.conftest import ENCRYPTION_KEY, IN_CI, SIGNING_KEY
from tests.support.data import seed_tenant
from tests.support.figures import note
from tests.support.polling import wait_until
from tests.support.processes import free_port, run_cli, run_worker, service_env

UTC_ZONE = ZoneInfo("UTC")
PUSH_KEY = "the-receivers-push-key-" + "7" * 32
FUZZ_EXAMPLES = 5_000  # per pure fuzz test; with the database-backed ones, over 10,000 cases a run
pytestmark = pytest.mark.usefixtures("security_figures")


# -- the secrets scan -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_no_secret_or_full_iban_anywhere_after_a_run_with_failures_and_retries(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    tenants = [seed_tenant(settings, sandbox, f"sec-scan-{i}", accounts=2) for i in range(3)]
    retry, sca = tenants[0], tenants[1]
    sandbox.state.scripted[retry.external[retry.account_ids[0]]] = deque([(503, None)])  # a retry
    next(iter(sca.user.connections.values())).state = "SCARequired"  # a failure
    sandbox.state.revoke_token(tenants[2].user.id)  # a token renewal
    # The run report's hook: its URL's path and query are a credential (a Slack webhook's are), as is
    # its HMAC key. Nothing listens there: every attempt fails, and is logged.
    hook_path, hook_query = "/services/T0/B0/hook-path-secret-5e884898", "sig=hook-query-secret-a665a459"
    hook_secret = "hook-hmac-secret-" + "3" * 20
    env = service_env(
        settings.database_url,
        redis_url,
        sandbox,
        POWENS_CLIENT_SECRET=sandbox.state.client_secret,
        BALANCES_NOTIFY_URL=f"http://127.0.0.1:{free_port()}{hook_path}?{hook_query}",
        BALANCES_NOTIFY_SECRET=hook_secret,
        BALANCES_NOTIFY_MAX_ATTEMPTS="2",
        BALANCES_NOTIFY_RETRY_BASE_SECONDS="0.05",
    )
    cli_output: list[str] = []
    with run_worker(env, tmp_path / "w.log") as worker:
        for t in tenants:
            for acc in t.account_ids:
                proc = run_cli(
                    env, "--as", "alice", "refresh", "--tenant", t.tenant_id, "--account", acc, "--json"
                )
                cli_output.append(proc.stdout + proc.stderr)
        proc = run_cli(env, "--as", "alice", "run", "nightly", "--json", "--timeout", "120")
        cli_output.append(proc.stdout + proc.stderr)
        run_id = json.loads(proc.stdout)["runId"]
        wait_until(lambda: report_outcome(settings, run_id), "the run report's delivery to end", 60)
        proc = run_cli(env, "--as", "alice", "accounts", "list", "--tenant", retry.tenant_id, "--json")
        cli_output.append(proc.stdout + proc.stderr)
        metrics_body = worker.scrape()
        processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        logs = worker.log.read_text(errors="replace")
        redis_dump = dump_redis(broker)
    with session_scope(settings) as s:
        messages = " ".join(m or "" for m in s.scalars(select(RefreshAttempt.message)))
    dump = pg_dump(settings.database_url)
    secrets = {
        "a Powens token": [u.token for u in sandbox.state.users.values()] + list(_old_tokens(sandbox)),
        "the client secret": [sandbox.state.client_secret],
        "a full IBAN": [a.iban for t in tenants for a in t.user.accounts.values() if a.iban],
        "a full account number": [a.number for t in tenants for a in t.user.accounts.values()],
        "the encryption key": [ENCRYPTION_KEY],
        "the signing key": [SIGNING_KEY],
        "the run report's URL (path, query) and key": [hook_path, hook_query, hook_secret],
    }
    places = {
        "worker logs and telemetry": logs,
        "CLI output": "\n".join(cli_output),
        "/metrics": metrics_body,
        "error messages": messages,
        "pg_dump": dump,
        "Redis keys and values": redis_dump,
        "process list": processes,
    }
    assert "telemetry" in logs or '"event": "openbanking.' in logs
    assert "run report of" in logs and "failed after 2 attempt(s)" in logs  # the hook's lines are scanned
    hits = [
        (what, where)
        for what, values in secrets.items()
        for v in values
        for where, text in places.items()
        if v in text
    ]
    assert hits == []
    note(
        "secrets scan",
        places=len(places),
        secrets=sum(len(v) for v in secrets.values()),
        hits=len(hits),
    )


def report_outcome(settings: Settings, run_id: str) -> str | None:
    with session_scope(settings) as s:
        return s.scalar(select(RefreshRun.report_outcome).where(RefreshRun.id == run_id))


def _old_tokens(sandbox: Sandbox) -> list[str]:
    """Tokens Powens revoked: the sandbox derives them from the user id and generation."""
    import hashlib
    import hmac

    out = []
    for uid, generation in sandbox.state.token_generation.items():
        for g in range(generation):
            mac = hmac.new(str(sandbox.state.seed).encode(), f"user:{uid}:{g}".encode(), hashlib.sha256)
            out.append(f"sbx_{mac.hexdigest()[:40]}")
    return out


def dump_redis(client: redis.Redis) -> str:
    """Every key and value, message bodies decoded (kombu keeps them base64)."""
    parts: list[str] = []
    for key in client.scan_iter("*"):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            values = list(client.smembers(key))
        parts.append(key.decode(errors="replace"))
        for value in values:
            text = value.decode(errors="replace")
            parts.append(text)
            try:
                body = json.loads(text).get("body")
                if isinstance(body, str):
                    parts.append(base64.b64decode(body).decode(errors="replace"))
            except (ValueError, AttributeError):
                pass
    return "\n".join(parts)


def pg_dump(url: str) -> str:
    import shutil

    exe = shutil.which("pg_dump")
    if exe is None:
        message = "pg_dump is not installed (it comes with PostgreSQL's client)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    return subprocess.run([exe, "--data-only", plain], capture_output=True, text=True, check=True).stdout


@given(
    st.lists(
        st.sampled_from(
            [
                "Bearer sbx_0123456789abcdef",
                "token=abc",
                '"client_secret": "x"',
                "gAAAAABfernetfernetfernet01234",
                "FR7630004000031234567890143",
                "GB29 NWBK 6016 1331 9268 19",
                "client_\u017fecret=abc",  # letters (?i) folds and str.lower does not
                "cl\u0131ent_secret=abc",
                "cl\u0130ent_secret=abc",
                "\u0131T60 1234 5678 9012 3456",
                "to\u212aen=k",
                "acc_0432",
                "2026-11-24T04:51",
                " ",
                '{"k": 1}',
            ]
        )
        | st.text(max_size=12),
        max_size=12,
    ).map("".join)
)
@hsettings(max_examples=400, deadline=None)
def test_the_scrubbers_fast_path_changes_nothing(line: str) -> None:
    """Each pattern runs only when what it needs is in the line: the result is the same as always
    running every pattern."""
    from app.ops import logs

    expected = line
    for pattern, repl in logs._SCRUB:
        expected = pattern.sub(repl, expected)
    assert logs.scrub(line) == expected
