"""Trust boundaries, tried as an attacker and as an operator would: forged task messages, the admin
bootstrap, key rotation, token renewal, reconnect links, hostile CLI arguments, fuzzed inputs, and a
scan of everything the service writes for its secrets. Figures go to build/security.json, from which
`python -m tests.report` renders the README's "Security checks" table."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import deque
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app import signing
from app.admin.manage import grant, revoke, rotate_keys
from app.config import Settings
from app.contract import parse_input
from app.devtools.sandbox import Sandbox
from app.errors import InvalidInput, PolicyDenied, Reason, RefreshError
from app.policy import ADMIN, Actor
from app.powens.errors import PowensError
from app.powens.models import PowensAccount
from app.refresh.deps import Deps
from app.refresh.handler import check_policy, execute
from app.refresh.outcomes import Attempt, Failed, Succeeded
from app.refresh.records import map_balances
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, ForcedSync, PowensUser, RefreshAttempt, Tenant
from app.store.states import Trigger
from tests.conftest import ENCRYPTION_KEY, IN_CI, SIGNING_KEY
from tests.e2e import ROOT, run_cli, run_worker, service_env
from tests.helpers import ADMIN_ACTOR, seed_tenant, sum_scrape

UTC_ZONE = ZoneInfo("UTC")
PUSH_KEY = "the-receivers-push-key-" + "7" * 32
RESULTS_FILE = ROOT / "build" / "security.json"
figures: dict[str, dict[str, Any]] = {}
FUZZ_EXAMPLES = 5_000  # per pure fuzz test; with the database-backed ones, over 10,000 cases a run


@pytest.fixture(scope="module", autouse=True)
def _write_figures(request: pytest.FixtureRequest) -> Any:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        return  # a failing run's figures are not the README's
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    RESULTS_FILE.write_text(json.dumps({**previous, **figures}, indent=2))


def note(check: str, **values: Any) -> None:
    figures.setdefault(check, {}).update(values)


# -- authenticated work -------------------------------------------------------------------------------


FORGER = """
import json, sys
from celery import Celery
from kombu import Connection
url, spec = sys.argv[1], json.loads(sys.argv[2])
c = Celery("forger", broker=url)
if spec.get("embed") is not None:
    # A raw protocol-2 message whose body overrides request fields (what Celery merges into the
    # request after the headers): e.g. "args" set to a captured message's genuine arguments.
    headers = {"lang": "py", "task": spec["name"], "id": spec["task_id"], "root_id": spec["task_id"],
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", "origin": "forger",
               **spec["headers"]}
    body = [spec["args"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None,
                                **spec["embed"]}]
    with Connection(url) as conn:
        conn.Producer().publish(body, routing_key="interactive", exchange="", headers=headers,
                                serializer="json")
else:
    link = None
    if spec.get("link"):
        link = c.signature(spec["link"]["name"], args=spec["link"]["args"], immutable=True,
                           queue="interactive")
    c.send_task(spec["name"], args=spec["args"], task_id=spec["task_id"], headers=spec["headers"],
                link=link, queue="interactive")
"""


def forge(
    broker_url: str,
    name: str,
    task_id: str,
    args: list[Any],
    headers: dict[str, str],
    *,
    link: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
) -> None:
    """Publish as someone with broker access only would: plain Celery or kombu, without the service's
    code or keys."""
    spec = {"name": name, "task_id": task_id, "args": args, "headers": headers, "link": link, "embed": embed}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_"))}
    subprocess.run(
        [sys.executable, "-c", FORGER, broker_url, json.dumps(spec)],
        cwd="/",  # not the project: the forger has no access to its code or keys
        env=env,
        check=True,
        timeout=60,
    )


@pytest.mark.e2e
def test_forged_task_messages_are_denied_audited_counted_and_never_reach_powens(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    t = seed_tenant(settings, sandbox, "sec-forge", accounts=2)
    acc, other = t.account_ids
    calls = sandbox.state.calls_by_user[t.user.id]
    keys = signing.keys_from(SIGNING_KEY)
    genuine_args = [{"tenantId": "sec-forge", "accountId": other}, "alice", "on_demand"]
    stolen = signing.sign(keys, "balances.refresh_account", "captured-1", genuine_args, {})
    forged = {
        "no signature, the scheduler named": (
            [
                {"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True},
                "system:scheduler",
                "scheduled",
            ],
            {},
        ),
        "no signature, a real admin named": (
            [{"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True}, "alice", "on_demand"],
            {},
        ),
        "a signature made with another key": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {signing.HEADER: signing.sign([b"x" * 40], "balances.refresh_account", "forged-3", [], {})},
        ),
        "a captured signature, the account changed": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {signing.HEADER: stolen},
        ),
        "a captured signature, the task id changed": (genuine_args, {signing.HEADER: stolen}),
        "signed with the webhook receiver's key, good for pushes only": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {
                signing.HEADER: signing.sign(
                    signing.keys_from(PUSH_KEY),
                    "balances.refresh_account",
                    f"forged-{5}",
                    [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
                    {},
                )
            },
        ),
    }
    scheduler_forcing = [
        {"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True},
        "system:scheduler",
        "scheduled",
    ]
    env = service_env(settings.database_url, redis_url, sandbox, BALANCES_PUSH_SIGNING_KEY=PUSH_KEY)
    with run_worker(env, tmp_path / "w.log") as worker:
        before = worker.scrape()
        for i, (args, headers) in enumerate(forged.values()):
            forge(redis_url, "balances.refresh_account", f"forged-{i}", args, headers)
        # The captured message itself, its body rewriting the request's copy of the arguments (what a
        # check of request.args would verify) while the task would run with the forged ones.
        forge(
            redis_url,
            "balances.refresh_account",
            "captured-1",
            scheduler_forcing,
            {signing.HEADER: stolen},
            embed={"args": genuine_args},
        )
        # A forged refresh riding as the callback of another task's message: the carrier is denied,
        # and its callback must never be published (this worker would sign it).
        forge(
            redis_url,
            "balances.sweep_runs",
            "forged-carrier",
            [],
            {},
            link={"name": "balances.refresh_account", "args": scheduler_forcing},
        )
        forged["a captured signature, the arguments rewritten in the body"] = (scheduler_forcing, {})

        def denials() -> int:
            with session_scope(settings) as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(RefreshAttempt)
                        .where(RefreshAttempt.reason == "policy_denied")
                    )
                    or 0
                )

        def carrier_denied() -> bool:
            with session_scope(settings) as s:
                return any(e.outcome == "denied" for e in repo.audit_events(s, "balances.sweep_runs"))

        deadline = time.monotonic() + 60
        while denials() < len(forged) or not carrier_denied():
            assert time.monotonic() < deadline, "forged messages not all denied"
            time.sleep(0.2)
        after = worker.scrape()
    # The worker has shut down warm (every started task finished): a callback the carrier published
    # would now be in a queue or already run; neither happened.
    broker = redis.Redis.from_url(redis_url)
    assert sum(broker.llen(q) for q in ("interactive", "push", "reports", "refresh")) == 0
    assert sandbox.state.calls_by_user[t.user.id] == calls  # no Powens call at all
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0  # no PSD2 slot spent
        assert s.scalar(select(func.count()).select_from(AccountBalance)) == 0  # nothing refreshed
        audits = repo.attempts(s, "sec-forge")
    assert [a.reason for a in audits] == ["policy_denied"] * len(forged)
    assert all(a.task_id is None for a in audits)  # a forger cannot pre-empt a real task's outcome
    failed = "openbanking_balances_refresh_failed_total"
    assert sum_scrape(after, failed) - sum_scrape(before, failed) == len(forged)
    denied = _sample(
        after, "balances_task_executions_total", task="balances.refresh_account", outcome="denied"
    )
    assert denied == len(forged)
    assert _sample(after, "balances_task_executions_total", task="balances.sweep_runs", outcome="denied") == 1
    tried = len(forged) + 1
    note("forged task messages", tried=tried, run=0, denied_audited_counted=len(audits) + 1)


PLANT_ENTRY = """
import sys
from celery import Celery
from celery.schedules import schedule
from redbeat.schedulers import RedBeatSchedulerEntry
url, acc = sys.argv[1:]
c = Celery("forger", broker=url)
c.conf.redbeat_redis_url = url
c.conf.redbeat_key_prefix = "balances:redbeat"  # visible to anyone who can read Redis
args = [{"tenantId": "sec-beat", "accountId": acc, "forceRefresh": True}, "system:scheduler", "scheduled"]
RedBeatSchedulerEntry("planted", "balances.refresh_account", schedule(1), args=args,
                      options={"queue": "interactive"}, app=c).save()
RedBeatSchedulerEntry("sweep-nightly-runs", "balances.refresh_account", schedule(1), args=args,
                      options={"queue": "interactive"}, app=c).save()  # a configured name, another task
"""


@pytest.mark.e2e
def test_a_schedule_entry_planted_in_redis_is_deleted_by_beat_and_never_sent(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    from tests.e2e import free_port

    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    t = seed_tenant(settings, sandbox, "sec-beat", accounts=1)
    calls = sandbox.state.calls_by_user[t.user.id]
    env = service_env(settings.database_url, redis_url, sandbox)
    benv = dict(env, BALANCES_METRICS_PORT=str(free_port()), BALANCES_METRICS_DIR=str(tmp_path / "mb"))
    log = tmp_path / "beat.log"
    with run_worker(env, tmp_path / "w.log"), log.open("wb") as fh:
        beat = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "app",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(tmp_path / "s"),
            ],
            cwd=ROOT,
            env=benv,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "Acquired lock" not in log.read_text(errors="replace"):
                assert beat.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
            fenv = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_"))}
            subprocess.run(
                [sys.executable, "-c", PLANT_ENTRY, redis_url, t.account_ids[0]],
                cwd="/",
                env=fenv,
                check=True,
            )
            while log.read_text(errors="replace").count("is not the service's: deleted") < 2:
                assert beat.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        finally:
            beat.terminate()
            beat.wait(timeout=30)
    assert not broker.exists("balances:redbeat:planted")
    assert sum(broker.llen(q) for q in ("interactive", "push", "reports", "refresh")) == 0
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(RefreshAttempt)) == 0
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0
    assert sandbox.state.calls_by_user[t.user.id] == calls


# -- the admin bootstrap -------------------------------------------------------------------------------


def test_admin_grant_is_a_bootstrap_once_and_every_role_change_is_audited(settings: Settings) -> None:
    nobody = Actor("nobody")
    assert grant(settings, nobody, "root-admin", ADMIN)  # no admin yet: the bootstrap
    with pytest.raises(PolicyDenied):
        grant(settings, Actor("mallory"), "mallory", ADMIN)  # from now on, only an admin
    boss = Actor("root-admin", frozenset({ADMIN}))
    assert grant(settings, boss, "bob", ADMIN)
    assert revoke(settings, boss, "bob", ADMIN)
    with pytest.raises(InvalidInput, match="last admin"):
        revoke(settings, boss, "root-admin", ADMIN)  # nobody could ever grant again
    with session_scope(settings) as s:
        events = [(e.actor, e.operation.split(".v")[0], e.subject, e.outcome) for e in repo.audit_events(s)]
        bootstrap = repo.audit_events(s)[0].detail
    assert events == [
        ("nobody", "balances.actors.grant", "root-admin", "done"),
        ("mallory", "balances.actors.grant", "mallory", "denied"),
        ("root-admin", "balances.actors.grant", "bob", "done"),
        ("root-admin", "balances.actors.revoke", "bob", "done"),
        ("root-admin", "balances.actors.revoke", "root-admin", "refused"),  # refusals leave a trace too
    ]
    assert bootstrap is not None and bootstrap["bootstrap"] is True
    with pytest.raises(InvalidInput, match="unknown role"):
        grant(settings, boss, "eve", "superuser")  # only the roles the policy knows


# -- keys ----------------------------------------------------------------------------------------------


def test_keys_rotate_reencrypts_every_token_then_the_old_key_can_go(
    settings: Settings, sandbox: Sandbox
) -> None:
    from app.store.secrets import generate_key

    seed_tenant(settings, sandbox, "sec-rot-1", accounts=1)
    seed_tenant(settings, sandbox, "sec-rot-2", accounts=1)
    new = generate_key()
    both = settings.model_copy(update={"encryption_key": _secret(f"{new},{ENCRYPTION_KEY}")})
    assert rotate_keys(both, ADMIN_ACTOR, batch=1) == 2  # batch of 1: several transactions, no downtime
    only_new = settings.model_copy(update={"encryption_key": _secret(new)})
    deps = Deps(only_new)
    with session_scope(settings) as s:
        for user in s.scalars(select(PowensUser)):
            assert deps.cipher.decrypt(user.token_encrypted).startswith("sbx_")
    outcome = execute(
        {"tenantId": "sec-rot-1", "accountId": _first_account(settings, "sec-rot-1")},
        "alice",
        Trigger.ON_DEMAND,
        deps=deps,
    )
    assert isinstance(outcome, Succeeded)


def _secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def _first_account(settings: Settings, tenant: str) -> str:
    with session_scope(settings) as s:
        return repo.list_accounts(s, tenant)[0][0].id


def test_a_bad_key_stops_a_worker_at_start(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    env = service_env(settings.database_url, redis_url, sandbox)
    env.pop("BALANCES_SIGNING_KEY")
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "BALANCES_SIGNING_KEY" in proc.stderr
    env["BALANCES_SIGNING_KEY"] = SIGNING_KEY
    env["BALANCES_ENCRYPTION_KEY"] = "not-a-fernet-key"
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "BALANCES_ENCRYPTION_KEY" in proc.stderr + proc.stdout
    assert "not-a-fernet-key" not in proc.stderr + proc.stdout
    # A well-formed key that is not the one the stored tokens were encrypted with: refused at start too.
    seed_tenant(settings, sandbox, "sec-wrongkey", accounts=1)
    from app.store.secrets import generate_key

    env["BALANCES_ENCRYPTION_KEY"] = generate_key()
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "does not decrypt the stored Powens tokens" in proc.stderr


# -- Powens credentials --------------------------------------------------------------------------------


def test_a_revoked_token_is_renewed_once_with_the_client_credentials(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "sec-renew", accounts=1)
    acc = t.account_ids[0]
    sandbox.state.revoke_token(t.user.id)  # Powens revoked it: the stored one now answers 401
    without = Deps(settings.model_copy(update={"powens_client_secret": None}))
    refused = execute({"tenantId": "sec-renew", "accountId": acc}, "alice", Trigger.ON_DEMAND, deps=without)
    assert isinstance(refused, Failed) and refused.error.reason is Reason.UNAUTHORIZED
    wrong = Deps(settings.model_copy(update={"powens_client_secret": _secret("not-the-secret")}))
    refused = execute({"tenantId": "sec-renew", "accountId": acc}, "alice", Trigger.ON_DEMAND, deps=wrong)
    assert isinstance(refused, Failed) and refused.error.reason is Reason.UNAUTHORIZED  # once, then no more
    good = Deps(settings.model_copy(update={"powens_client_secret": _secret(sandbox.state.client_secret)}))
    renews, reads = sandbox.state.calls["POST /auth/renew"], sandbox.state.calls_by_user[t.user.id]
    renewed = execute({"tenantId": "sec-renew", "accountId": acc}, "alice", Trigger.ON_DEMAND, deps=good)
    assert isinstance(renewed, Succeeded)
    assert sandbox.state.calls["POST /auth/renew"] == renews + 1  # renewed once...
    assert sandbox.state.calls_by_user[t.user.id] == reads + 1  # ...and read once with the new token
    again = execute({"tenantId": "sec-renew", "accountId": acc}, "alice", Trigger.ON_DEMAND, deps=good)
    assert isinstance(again, Succeeded) and sandbox.state.calls["POST /auth/renew"] == renews + 1
    with session_scope(settings) as s:
        user = s.scalar(select(PowensUser).where(PowensUser.powens_user_id == t.user.id))
        assert (
            user is not None
            and good.cipher.decrypt(user.token_encrypted) == sandbox.state.users[t.user.id].token
        )
        assert [e.operation for e in repo.audit_events(s, "powens.token.renew")] == ["powens.token.renew"]


def test_a_reconnect_link_carries_a_fresh_code_and_is_never_stored(
    settings: Settings, sandbox: Sandbox
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from app.admin.connections import reconnect_link

    t = seed_tenant(settings, sandbox, "sec-link", accounts=1)
    with session_scope(settings) as s:
        connection_id = repo.list_accounts(s, "sec-link")[0][1].id
    deps = Deps(settings)
    first = reconnect_link(deps, ADMIN_ACTOR, "sec-link", connection_id)
    second = reconnect_link(deps, ADMIN_ACTOR, "sec-link", connection_id)
    codes = [parse_qs(urlsplit(u).query)["code"][0] for u in (first, second)]
    assert codes[0] != codes[1] and all(c.startswith("sbxcode_") for c in codes)
    assert parse_qs(urlsplit(first).query)["connection_id"] == [str(next(iter(t.user.connections)))]
    with pytest.raises(PolicyDenied):
        reconnect_link(deps, Actor("mallory"), "sec-link", connection_id)
    with pytest.raises(RefreshError) as info:
        reconnect_link(deps, ADMIN_ACTOR, "another-tenant", connection_id)
    assert info.value.reason is Reason.NOT_FOUND
    with session_scope(settings) as s:
        events = repo.audit_events(s, "balances.connections.reconnect_link.v1.0.0")
        assert len(events) == 2 and all(codes[0] not in json.dumps(e.detail) for e in events)


# -- hostile input ---------------------------------------------------------------------------------------

HOSTILE = [
    ("an unknown account", ["refresh", "--tenant", "sec-cli", "--account", "acc_does_not_exist"]),
    ("an unknown tenant", ["refresh", "--tenant", "nobody-here", "--account", "acc_x"]),
    ("SQL in the tenant", ["refresh", "--tenant", "x'; DROP TABLE tenants; --", "--account", "a"]),
    ("SQL in the account", ["refresh", "--tenant", "sec-cli", "--account", "1 OR 1=1"]),
    ("a huge tenant id", ["refresh", "--tenant", "t" * 100_000, "--account", "a"]),
    ("control characters", ["refresh", "--tenant", "sec-cli", "--account", "acc\x1b[31m\nforged log line"]),
    (
        "a huge balance type",
        ["refresh", "--tenant", "sec-cli", "--account", "a", "--balance-type", "x" * 5000],
    ),
    ("a newline in the actor", ["--as", "alice\n", "show", "--tenant", "sec-cli"]),
    ("SQL in a summary", ["summary", "--tenant", "'; SELECT pg_sleep(10); --"]),
    ("an unknown run", ["run", "status", "run_\x07nope"]),  # (argv cannot carry NUL)
    (
        "an unknown connection",
        ["connections", "reconnect-link", "--tenant", "sec-cli", "--connection", "con_nope"],
    ),
    ("a Powens user id beyond any column", ["powens", "link", "--tenant", "sec-cli", "--user-id", "9" * 25]),
    ("a negative Powens user id", ["powens", "link", "--tenant", "sec-cli", "--user-id", "-4"]),
    ("a tenant name beyond its column", ["tenant", "add", "sec-long", "--name", "n" * 5000]),
    ("a tenant id with control characters", ["tenant", "add", "sec\x1bx"]),
    ("a role nobody knows", ["admin", "grant", "bob", "--role", "r" * 5000]),
    (
        "a timeout that is not a number",
        ["refresh", "--tenant", "sec-cli", "--account", "a", "--timeout", "nan"],
    ),
    ("a negative timeout", ["run", "nightly", "--timeout", "-5"]),
]


@pytest.mark.e2e
def test_hostile_cli_arguments_get_one_line_a_nonzero_exit_and_dispatch_nothing(
    settings: Settings, sandbox: Sandbox, redis_url: str
) -> None:
    seed_tenant(settings, sandbox, "sec-cli", accounts=1)
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    env = service_env(settings.database_url, redis_url, sandbox)
    for what, args in HOSTILE:
        full = args if args[0] == "--as" else ["--as", "alice", *args]
        proc = run_cli(env, *full)
        # the contract's failure telemetry event is a JSON line on stderr too; the error is the rest
        telemetry = '{"event": "openbanking.balances.'
        lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(telemetry)]
        assert proc.returncode != 0, (what, proc.stdout, proc.stderr)
        assert len(lines) == 1, (what, proc.stderr)  # one clear line, no traceback
        assert "Traceback" not in proc.stderr + proc.stdout
    assert [k for k in broker.keys("*") if not k.startswith(b"_kombu")] == []  # nothing was dispatched
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(Tenant)) == 1  # and nothing was dropped
    note("hostile CLI arguments", tried=len(HOSTILE), dispatched=0, multi_line_errors=0)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=300),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
contract_like = st.fixed_dictionaries(
    {},
    optional={
        "tenantId": json_values,
        "accountId": json_values,
        "connectionId": json_values,
        "balanceTypes": json_values,
        "forceRefresh": json_values,
        "extra": json_values,
    },
)


@hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(contract_like)
def test_fuzzed_contract_input_is_a_model_or_a_clean_invalid_input(raw: dict[str, Any]) -> None:
    try:
        inp = parse_input(raw)
    except InvalidInput as exc:
        assert exc.reason is Reason.INVALID_INPUT and "\n" not in exc.message
    else:
        assert 1 <= len(inp.tenant_id) <= 128 and 1 <= len(inp.account_id) <= 128
    _count("fuzzed contract inputs")


amounts = st.one_of(
    st.none(),
    st.decimals(allow_nan=False, allow_infinity=False, places=None),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.booleans(),
)
# Dates as Powens writes them (naive, or with an offset), over the whole range Python can hold: the
# year 1 and the year 9999 cannot be converted to UTC from every zone.
powens_dates = st.one_of(
    st.datetimes().map(lambda d: d.strftime("%Y-%m-%d %H:%M:%S")),
    st.datetimes(
        timezones=st.sampled_from([UTC_ZONE, ZoneInfo("America/New_York"), ZoneInfo("Asia/Tokyo")])
    ).map(lambda d: d.isoformat()),
    st.dates().map(lambda d: d.isoformat()),
)
# Ids around every boundary a column has.
powens_ids = st.one_of(
    st.integers(), st.integers(min_value=2**62, max_value=2**65), st.text(max_size=10), st.none()
)
powens_like = st.fixed_dictionaries(
    {},
    optional={
        "id": powens_ids,
        "id_connection": powens_ids,
        "id_user": st.one_of(powens_ids, st.booleans()),
        "name": st.one_of(st.text(max_size=400), st.none(), st.integers()),
        "original_name": st.one_of(st.text(max_size=400), st.none()),
        "balance": amounts,
        "coming": amounts,
        "currency": st.one_of(
            st.none(),
            st.text(max_size=5),
            st.fixed_dictionaries(
                {"id": st.one_of(st.sampled_from(["EUR", "USD", "ZZZ", ""]), st.integers())},
                optional={"precision": st.one_of(st.integers(), st.text(max_size=3))},
            ),
        ),
        "type": st.one_of(st.text(max_size=80), st.none()),
        "usage": st.one_of(st.sampled_from(["PRIV", "ORGA", "ASSO"]), st.text(max_size=30), st.none()),
        "last_update": st.one_of(
            st.none(), st.text(max_size=25), st.just("2026-11-23 10:00:00"), st.integers(), powens_dates
        ),
        "disabled": st.one_of(st.none(), st.just("2026-11-23 10:00:00"), st.text(max_size=10), powens_dates),
        "deleted": st.one_of(st.none(), st.just("2026-11-23 10:00:00")),
        "iban": st.one_of(st.none(), st.text(max_size=80)),
        "number": st.one_of(st.none(), st.text(max_size=80)),
        "error": st.one_of(st.none(), st.text(max_size=80)),
    },
)


@hsettings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(powens_like)
def test_fuzzed_powens_accounts_are_records_or_a_clean_invalid_response(raw: dict[str, Any]) -> None:
    from datetime import UTC, datetime

    try:
        acc = PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/users/{id_user}/accounts")
    except PowensError as exc:
        assert exc.reason is Reason.INVALID_RESPONSE
    else:
        for draft in map_balances(acc, datetime.now(UTC)):
            assert (
                isinstance(draft.current_balance, Decimal) and abs(draft.current_balance) < Decimal(10) ** 18
            )
    _count("fuzzed Powens payloads")


def _sample(body: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _count(check: str) -> None:
    figures.setdefault(check, {"cases": 0, "uncaught": 0})
    figures[check]["cases"] += 1


def test_fuzzed_input_through_the_handler_never_writes_on_rejection(
    settings: Settings, sandbox: Sandbox
) -> None:
    """The same fuzz, now through the handler on the real database: a rejection writes its audit row
    and nothing else."""
    seed_tenant(settings, sandbox, "sec-fuzz", accounts=1)
    cases = 0

    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(contract_like)
    def one(raw: dict[str, Any]) -> None:
        nonlocal cases
        cases += 1
        with session_scope(settings) as s:
            balances = s.scalar(select(func.count()).select_from(AccountBalance))
        try:
            check_policy(raw, "alice", Trigger.ON_DEMAND, deps=Deps(settings))
        except RefreshError as exc:
            assert exc.reason in (Reason.INVALID_INPUT, Reason.NOT_FOUND)
        with session_scope(settings) as s:
            assert s.scalar(select(func.count()).select_from(AccountBalance)) == balances

    one()
    figures.setdefault("fuzzed contract inputs", {"cases": 0, "uncaught": 0})
    figures["fuzzed contract inputs"]["cases"] += cases


def test_a_rejected_input_with_nul_and_newlines_is_recorded_with_its_ids_escaped(settings: Settings) -> None:
    # Found by the fuzz above: the failure audit row kept the raw tenantId, and PostgreSQL refused
    # the NUL, so the rejection itself ended in a database error and was never recorded.
    raw = {"tenantId": "ten\x00ant", "accountId": "acc\nforged", "balanceTypes": ["cur\x00rent"]}
    with pytest.raises(InvalidInput):
        check_policy(raw, "alice", Trigger.ON_DEMAND, deps=Deps(settings))
    with session_scope(settings) as s:
        row = s.scalars(select(RefreshAttempt).where(RefreshAttempt.tenant_id == "ten\\x00ant")).one()
        assert row.account_id == "acc\\x0aforged" and row.reason == Reason.INVALID_INPUT.value


def test_fuzzed_powens_payloads_through_the_handler_keep_previous_balances(
    settings: Settings, sandbox: Sandbox
) -> None:
    t = seed_tenant(settings, sandbox, "sec-wire", accounts=1)
    acc = t.account_ids[0]
    first = execute({"tenantId": "sec-wire", "accountId": acc}, "alice", Trigger.ON_DEMAND)
    assert isinstance(first, Succeeded)
    cases = 0

    @hsettings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(powens_like)
    def one(wire: dict[str, Any]) -> None:
        nonlocal cases
        cases += 1
        kept = {k: v for k, v in wire.items() if k not in ("id", "id_connection", "deleted")}
        sandbox.state.wire_overrides[t.external[acc]] = kept
        with session_scope(settings) as s:
            before = {(b.balance_type, b.current_balance) for b in repo.latest_balances(s, "sec-wire", acc)}
        outcome = execute(
            {"tenantId": "sec-wire", "accountId": acc}, "alice", Trigger.ON_DEMAND, attempt=Attempt(3, 3)
        )
        assert isinstance(outcome, Succeeded | Failed)
        if isinstance(outcome, Failed):
            assert outcome.error.reason in (
                Reason.INVALID_RESPONSE,
                Reason.NOT_FOUND,
                Reason.NEEDS_USER_ACTION,
            )
            with session_scope(settings) as s:
                after = {
                    (b.balance_type, b.current_balance) for b in repo.latest_balances(s, "sec-wire", acc)
                }
            assert after == before  # a failure writes nothing but its audit row

    try:
        one()
    finally:
        sandbox.state.wire_overrides.clear()
    figures.setdefault("fuzzed Powens payloads", {"cases": 0, "uncaught": 0})
    figures["fuzzed Powens payloads"]["cases"] += cases


def test_long_strings_from_powens_are_an_invalid_response_not_a_database_error() -> None:
    for field, value in (("name", "n" * 301), ("type", "t" * 65), ("error", "e" * 65)):
        raw = {
            "id": 1,
            "id_connection": 2,
            "name": "ok",
            "balance": 1,
            "currency": {"id": "EUR"},
            field: value,
        }
        with pytest.raises(PowensError) as info:
            PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
        assert info.value.reason is Reason.INVALID_RESPONSE and "longer than" in info.value.message


def test_a_nul_character_from_powens_is_an_invalid_response_not_a_database_error() -> None:
    # PostgreSQL text cannot hold NUL: stored, it would fail the write half-way as a database error
    # (and be re-queued as our own outage); refused at the parser, it is a clean invalid_response.
    for field in ("name", "iban", "type", "error"):
        raw = {"id": 1, "id_connection": 2, "name": "ok", "balance": 1, "currency": {"id": "EUR"}}
        raw[field] = "bad\x00value"
        with pytest.raises(PowensError) as info:
            PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
        assert info.value.reason is Reason.INVALID_RESPONSE and field in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("last_update", "0001-01-01"),  # before UTC can express it in Europe/Paris
        ("last_update", "9999-12-31T23:59:59-05:00"),  # after it
        ("id", 2**63),  # beyond a BIGINT column
        ("id_connection", -5),
        ("id", 0),
    ],
)
def test_out_of_range_dates_and_ids_from_powens_are_an_invalid_response(field: str, value: object) -> None:
    raw = {"id": 1, "id_connection": 2, "name": "ok", "balance": 1, "currency": {"id": "EUR"}, field: value}
    with pytest.raises(PowensError) as info:
        PowensAccount.parse(raw, ZoneInfo("Europe/Paris"), "/x")
    assert info.value.reason is Reason.INVALID_RESPONSE and field in info.value.message


def test_every_log_format_is_scrubbed() -> None:
    import io
    import logging

    from app.ops import logs

    stream = io.StringIO()
    logs.configure("INFO", "text", stream=stream)
    try:
        logging.getLogger("sec").warning(
            "Authorization: Bearer sbx_0123456789abcdef0123 token=abc123secret "
            "iban FR7630004000031234567890143"
        )
    finally:
        logs.configure("WARNING", "json")
    text = stream.getvalue()
    assert "sbx_0123456789abcdef0123" not in text and "abc123secret" not in text
    assert "FR7630004000031234567890143" not in text and "0143" in text


def test_the_sandbox_admin_routes_need_its_token(sandbox: Sandbox) -> None:
    import requests

    assert requests.get(sandbox.admin_url + "stats", timeout=5).status_code == 401
    from app.devtools.sandbox import admin_call

    assert "total" in admin_call(sandbox.admin_url, sandbox.state.admin_token, "stats")


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
    env = service_env(
        settings.database_url, redis_url, sandbox, POWENS_CLIENT_SECRET=sandbox.state.client_secret
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
