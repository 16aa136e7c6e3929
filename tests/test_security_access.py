"""Who holds what: the admin bootstrap, key rotation and a wrong key at start, Powens token renewal,
reconnect links.
Figures go to build/security.json (``tests.support.figures``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from app.admin.manage import grant, revoke, rotate_keys
from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.errors import InvalidInput, PolicyDenied, Reason, RefreshError
from app.policy import ADMIN, Actor
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Failed, Succeeded
from app.store import repo
from app.store.db import session_scope
from app.store.models import PowensUser
from app.store.states import Trigger
from tests.conftest import ENCRYPTION_KEY, SIGNING_KEY
from tests.support.data import ADMIN_ACTOR, seed_tenant
from tests.support.processes import ROOT, service_env

UTC_ZONE = ZoneInfo("UTC")
PUSH_KEY = "the-receivers-push-key-" + "7" * 32
FUZZ_EXAMPLES = 5_000  # per pure fuzz test; with the database-backed ones, over 10,000 cases a run
pytestmark = pytest.mark.usefixtures("security_figures")


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


def start_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``celery -A app worker`` as an operator starts it: it must refuse, and exit."""
    argv = [sys.executable, "-m", "celery", "-A", "app", "worker", "--loglevel", "WARNING"]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_bad_key_stops_a_worker_at_start(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    env = service_env(settings.database_url, redis_url, sandbox)
    env.pop("BALANCES_SIGNING_KEY")
    proc = start_worker(env)
    assert proc.returncode != 0 and "BALANCES_SIGNING_KEY" in proc.stderr
    env["BALANCES_SIGNING_KEY"] = SIGNING_KEY
    env["BALANCES_ENCRYPTION_KEY"] = "not-a-fernet-key"
    proc = start_worker(env)
    assert proc.returncode != 0 and "BALANCES_ENCRYPTION_KEY" in proc.stderr + proc.stdout
    assert "not-a-fernet-key" not in proc.stderr + proc.stdout
    # A well-formed key that is not the one the stored tokens were encrypted with: refused at start too.
    seed_tenant(settings, sandbox, "sec-wrongkey", accounts=1)
    from app.store.secrets import generate_key

    env["BALANCES_ENCRYPTION_KEY"] = generate_key()
    proc = start_worker(env)
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
