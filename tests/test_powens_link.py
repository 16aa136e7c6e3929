"""Linking and unlinking Powens users through the real shell (``balances powens link|unlink|list``),
against the sandbox and PostgreSQL.

``powens link`` used to store whatever it was given: it printed "linked", exited 0, and every later
sync of that user failed ``unauthorized``. Now the token is verified with Powens first (``GET
/users/me`` must answer, with the user being linked), and nothing is stored otherwise. Unlinking
deletes the token and takes the user's accounts out of every refresh; linking again brings them back.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import responses
from sqlalchemy import func, select, text

from app import jsonio
from app.config import Settings
from app.devtools.sandbox import Sandbox, SUser
from app.errors import Reason
from app.nightly.batch import run_batch
from app.policy import ADMIN, VIEWER
from app.powens.client import PowensClient
from app.powens.errors import PowensError
from app.push.apply import apply
from app.push.events import Event, reduce
from app.refresh.deps import Deps
from app.refresh.handler import execute
from app.refresh.outcomes import Failed, Succeeded
from app.store import repo, runs
from app.store.db import session_scope
from app.store.models import AccountBalance, AuditEvent, BankAccount, BankConnection, PowensUser, RunItem
from app.store.states import AccountStatus, ItemStatus, Trigger
from tests.support.data import Seeded, nightly_run, seed_tenant
from tests.support.processes import free_port, run_cli, service_env

LINK = "balances.powens.link.v1.0.0"
UNLINK = "balances.powens.unlink.v1.0.0"


@pytest.fixture
def env(settings: Settings, sandbox: Sandbox, redis_url: str) -> dict[str, str]:
    return service_env(settings.database_url, redis_url, sandbox)


def tenant(settings: Settings, tenant_id: str) -> None:
    """A tenant, the admin alice and the viewer vera."""
    now = datetime.now(UTC)
    with session_scope(settings) as s:
        repo.add_tenant(s, tenant_id, tenant_id, now)
        repo.grant_role(s, "alice", ADMIN, now)
        repo.grant_role(s, "vera", VIEWER, now)


def shell(
    env: dict[str, str], *args: str, stdin: str | None = None, actor: str = "alice"
) -> subprocess.CompletedProcess[str]:
    return run_cli(env, "--as", actor, *args, stdin=stdin)


def link(
    env: dict[str, str], tenant_id: str, user_id: int, token: str, *more: str, actor: str = "alice"
) -> subprocess.CompletedProcess[str]:
    args = ("powens", "link", "--tenant", tenant_id, "--user-id", str(user_id), *more)
    return shell(env, *args, stdin=token + "\n", actor=actor)


def unlink(
    env: dict[str, str], tenant_id: str, user_id: int, *more: str, actor: str = "alice"
) -> subprocess.CompletedProcess[str]:
    return shell(
        env, "powens", "unlink", "--tenant", tenant_id, "--user-id", str(user_id), *more, actor=actor
    )


def said(proc: subprocess.CompletedProcess[str]) -> str:
    """What the shell said, telemetry lines aside."""
    return "\n".join(line for line in proc.stderr.splitlines() if not line.startswith('{"event": '))


def stored_tokens(settings: Settings) -> dict[int, bytes | None]:
    with session_scope(settings) as s:
        rows = s.execute(text("SELECT powens_user_id, token_encrypted FROM powens_users")).all()
    return {int(r[0]): None if r[1] is None else bytes(r[1]) for r in rows}


def token_of(settings: Settings, user_id: int) -> str | None:
    blob = stored_tokens(settings).get(user_id)
    return None if blob is None else Deps(settings).cipher.decrypt(blob)


def audit_rows(settings: Settings, operation: str) -> list[AuditEvent]:
    with session_scope(settings) as s:
        rows = list(repo.audit_events(s, operation))
        s.expunge_all()
    return rows


def never_shown(proc: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in proc.stdout + proc.stderr


# -- link: verified before anything is stored ----------------------------------------------------------


def test_a_token_powens_refuses_is_refused_and_nothing_is_stored(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    tenant(settings, "lk-refused")
    user = sandbox.state.create_user()
    made_up = "sbx_" + "0" * 40
    proc = link(env, "lk-refused", user.id, made_up)
    assert proc.returncode == 1, proc.stderr
    assert said(proc).startswith("unauthorized: Powens refused the token (HTTP 401, invalidAccessToken)")
    assert "nothing was stored" in said(proc)
    never_shown(proc, made_up)
    assert stored_tokens(settings) == {}
    # --json: the error as a value on stdout
    proc = link(env, "lk-refused", user.id, made_up, "--json")
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error["reason"] == "unauthorized" and "nothing was stored" in error["message"]
    never_shown(proc, made_up)
    # A token Powens revoked is refused too, and does not replace the good one already stored.
    assert link(env, "lk-refused", user.id, user.token).returncode == 0
    revoked = user.token
    sandbox.state.revoke_token(user.id)
    proc = link(env, "lk-refused", user.id, revoked)
    assert proc.returncode == 1 and said(proc).startswith("unauthorized:")
    assert token_of(settings, user.id) == revoked  # the stored token is still the one stored before
    refusals = [e for e in audit_rows(settings, LINK) if e.outcome == "refused"]
    assert [(e.actor, e.subject, (e.detail or {})["reason"]) for e in refusals] == [
        ("alice", str(user.id), "unauthorized")
    ] * 3
    assert all(made_up not in json.dumps(e.detail) and revoked not in json.dumps(e.detail) for e in refusals)


def test_the_token_of_another_powens_user_is_refused(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    tenant(settings, "lk-other")
    mine, theirs = sandbox.state.create_user(), sandbox.state.create_user()
    proc = link(env, "lk-other", mine.id, theirs.token)
    assert proc.returncode == 2, proc.stderr
    assert said(proc) == (
        f"invalid_input: the token belongs to Powens user {theirs.id}, not {mine.id}: nothing was stored"
    )
    never_shown(proc, theirs.token)
    assert stored_tokens(settings) == {}


def test_powens_unreachable_stores_nothing(settings: Settings, sandbox: Sandbox, env: dict[str, str]) -> None:
    tenant(settings, "lk-down")
    user = sandbox.state.create_user()
    down = dict(env, POWENS_BASE_URL=f"http://127.0.0.1:{free_port()}/2.0/")  # nothing listens there
    proc = link(down, "lk-down", user.id, user.token, "--json")
    assert proc.returncode == 1, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["reason"] == "provider_unavailable"
    assert "could not be verified" in error["message"] and "nothing was stored" in error["message"]
    never_shown(proc, user.token)
    assert stored_tokens(settings) == {}


def test_an_unknown_tenant_is_not_found_before_the_token_is_read(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    tenant(settings, "lk-known")
    user = sandbox.state.create_user()
    asked = sandbox.state.calls["GET /users/{id_user}"]
    # Nothing on stdin: had the token been read first, this would be an empty token (invalid_input, 2).
    proc = shell(env, "powens", "link", "--tenant", "lk-nobody", "--user-id", str(user.id), stdin="")
    assert proc.returncode == 1, proc.stderr
    assert said(proc).startswith("not_found: no tenant 'lk-nobody'")
    assert sandbox.state.calls["GET /users/{id_user}"] == asked  # Powens was not asked either
    # An empty token (the tenant exists) is bad input, refused before Powens is asked.
    proc = shell(env, "powens", "link", "--tenant", "lk-known", "--user-id", str(user.id), stdin="\n")
    assert proc.returncode == 2 and said(proc).startswith("invalid_input: the Powens token read from stdin")
    assert sandbox.state.calls["GET /users/{id_user}"] == asked
    assert stored_tokens(settings) == {}


def test_a_good_token_is_verified_then_linked(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    tenant(settings, "lk-good")
    user = sandbox.state.create_user()
    asked = sandbox.state.calls["GET /users/{id_user}"]
    proc = link(env, "lk-good", user.id, user.token, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "tenantId": "lk-good",
        "powensUserId": user.id,
        "created": True,
        "verified": True,
    }
    assert sandbox.state.calls["GET /users/{id_user}"] == asked + 1  # one call proved it
    assert token_of(settings, user.id) == user.token
    assert user.token.encode() not in (stored_tokens(settings)[user.id] or b"")  # encrypted at rest
    proc = link(env, "lk-good", user.id, user.token)
    assert proc.returncode == 0
    assert said(proc) == (
        f"Powens user {user.id} linked to tenant lk-good (token verified): the stored token was replaced"
    )
    never_shown(proc, user.token)
    done = [e for e in audit_rows(settings, LINK) if e.outcome == "done"]
    assert [(e.actor, e.subject, (e.detail or {})["created"]) for e in done] == [
        ("alice", str(user.id), True),
        ("alice", str(user.id), False),
    ]
    # The user can be synced now: what the unverified link let through failed here, unauthorized.
    sync = shell(env, "accounts", "sync", "--tenant", "lk-good", "--json")
    assert sync.returncode == 0 and json.loads(sync.stdout) == {"synced": len(user.accounts), "failed": 0}


def test_a_user_linked_to_another_tenant_is_not_taken_over(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    tenant(settings, "lk-first")
    tenant(settings, "lk-second")
    user = sandbox.state.create_user()
    assert link(env, "lk-first", user.id, user.token).returncode == 0
    proc = link(env, "lk-second", user.id, user.token)
    assert proc.returncode == 2 and said(proc) == (
        f"invalid_input: Powens user {user.id} is linked to another tenant (or was, and it keeps it): "
        "nothing was stored"
    )
    with session_scope(settings) as s:
        assert (
            s.scalar(select(PowensUser.tenant_id).where(PowensUser.powens_user_id == user.id)) == "lk-first"
        )
    refused = [e for e in audit_rows(settings, LINK) if e.outcome == "refused"]
    assert [(e.subject, (e.detail or {})["tenantId"], (e.detail or {})["reason"]) for e in refused] == [
        (str(user.id), "lk-second", "invalid_input")
    ]


# -- unlink, and linking again -----------------------------------------------------------------------------


def first_balance(settings: Settings, t: Seeded, account_id: str) -> None:
    outcome = execute(
        {"tenantId": t.tenant_id, "accountId": account_id}, "alice", Trigger.ON_DEMAND, deps=Deps(settings)
    )
    assert isinstance(outcome, Succeeded)


def planned(settings: Settings, tick: str) -> set[str]:
    run_id = nightly_run(settings, tick)
    with session_scope(settings) as s:
        return set(s.scalars(select(RunItem.account_id).where(RunItem.run_id == run_id)))


def statuses(settings: Settings, account_ids: list[str]) -> list[str]:
    with session_scope(settings) as s:
        rows = {
            a: st
            for a, st in s.execute(
                select(BankAccount.id, BankAccount.status).where(BankAccount.id.in_(account_ids))
            )
        }
    return [rows[a] for a in account_ids]


def accounts_of(t: Seeded, user: SUser) -> list[str]:
    return [a for a in t.account_ids if t.external[a] in user.accounts]


def push_synced(settings: Settings, account: Any) -> list[str]:
    """An ACCOUNT_SYNCED push as the receiver queues it, applied as the worker applies it."""
    payload = jsonio.dumps(reduce(Event.ACCOUNT_SYNCED, jsonio.loads(jsonio.dumps(account.wire(None)))))
    return [a.outcome.value for a in apply(Deps(settings), payload, datetime.now(UTC))]


def test_unlink_deletes_the_token_takes_the_accounts_out_of_refreshes_and_relink_brings_them_back(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    t = seed_tenant(settings, sandbox, "lk-unlink", users=2, accounts=2)
    tenant(settings, "lk-unlink")
    gone, kept = t.users
    gone_accounts, kept_accounts = accounts_of(t, gone), accounts_of(t, kept)
    first_balance(settings, t, gone_accounts[0])
    assert planned(settings, "lk-before") == set(t.account_ids)

    proc = unlink(env, "lk-unlink", gone.id)
    assert proc.returncode == 0, proc.stderr
    assert said(proc) == (
        f"Powens user {gone.id} unlinked from tenant lk-unlink: token deleted, "
        "2 accounts excluded from refreshes; history kept"
    )
    # The token (its ciphertext) is gone from the database; the row stays, saying since when.
    assert stored_tokens(settings) == {gone.id: None, kept.id: stored_tokens(settings)[kept.id]}
    with session_scope(settings) as s:
        row = s.scalar(select(PowensUser).where(PowensUser.powens_user_id == gone.id))
        assert row is not None and row.token_encrypted is None and row.unlinked_at is not None
        kept_history = s.scalar(
            select(func.count())
            .select_from(AccountBalance)
            .where(AccountBalance.account_id == gone_accounts[0])
        )
    assert kept_history  # its balance history stays
    assert statuses(settings, gone_accounts) == [AccountStatus.UNLINKED] * 2
    assert statuses(settings, kept_accounts) == [AccountStatus.ACTIVE] * 2

    # The next nightly plan skips them; an on-demand refresh is refused without calling Powens; a
    # push for that user is no longer applied.
    assert planned(settings, "lk-after") == set(kept_accounts)
    calls = sandbox.state.calls_by_user[gone.id]
    refused = execute(
        {"tenantId": "lk-unlink", "accountId": gone_accounts[1]},
        "alice",
        Trigger.ON_DEMAND,
        deps=Deps(settings),
    )
    assert isinstance(refused, Failed) and refused.error.reason is Reason.NOT_FOUND
    assert "unlinked" in refused.error.message
    pushed = gone.accounts[t.external[gone_accounts[1]]]
    pushed.balance = Decimal("777.01")
    assert push_synced(settings, pushed) == ["unknown_user"]
    assert sandbox.state.calls_by_user[gone.id] == calls
    with session_scope(settings) as s:
        assert (
            s.scalar(
                select(func.count())
                .select_from(AccountBalance)
                .where(AccountBalance.account_id == gone_accounts[1])
            )
            == 0
        )
    # Accounts sync skips the unlinked user.
    sync = shell(env, "accounts", "sync", "--tenant", "lk-unlink", "--json")
    assert sync.returncode == 0 and json.loads(sync.stdout) == {"synced": 2, "failed": 0}

    audits = audit_rows(settings, UNLINK)
    assert [(e.actor, e.subject, e.outcome) for e in audits] == [("alice", str(gone.id), "done")]
    assert audits[0].detail == {"tenantId": "lk-unlink", "tokenDeleted": True, "accountsExcluded": 2}

    # Unlinking again changes nothing, and says so.
    again = unlink(env, "lk-unlink", gone.id, "--json")
    assert again.returncode == 0
    doc = json.loads(again.stdout)
    assert (doc["tokenDeleted"], doc["accountsExcluded"], doc["powensUserId"]) == (False, 0, gone.id)

    listed = shell(env, "powens", "list", "--tenant", "lk-unlink", "--json", actor="vera")
    assert listed.returncode == 0, listed.stderr
    by_user = {u["powensUserId"]: u for u in json.loads(listed.stdout)}
    assert (by_user[gone.id]["linked"], by_user[gone.id]["accountsByStatus"]) == (False, {"unlinked": 2})
    assert (by_user[kept.id]["linked"], by_user[kept.id]["accounts"]) == (True, 2)
    assert by_user[gone.id]["lastRefreshedAt"] is not None and by_user[gone.id]["unlinkedAt"] is not None

    # Linking the same user again (verified) brings its accounts back.
    proc = link(env, "lk-unlink", gone.id, gone.token)
    assert proc.returncode == 0, proc.stderr
    assert said(proc) == (
        f"Powens user {gone.id} linked to tenant lk-unlink (token verified): linked again, "
        "2 accounts back in the refreshes"
    )
    never_shown(proc, gone.token)
    assert statuses(settings, gone_accounts) == [AccountStatus.ACTIVE] * 2
    assert token_of(settings, gone.id) == gone.token
    assert planned(settings, "lk-relinked") == set(t.account_ids)
    back = execute(
        {"tenantId": "lk-unlink", "accountId": gone_accounts[1]},
        "alice",
        Trigger.ON_DEMAND,
        deps=Deps(settings),
    )
    assert isinstance(back, Succeeded)


def test_a_run_planned_before_the_unlink_records_the_users_accounts_as_not_found(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    t = seed_tenant(settings, sandbox, "lk-race", users=2, accounts=1)
    tenant(settings, "lk-race")
    gone, kept = t.users
    run_id = nightly_run(settings, "lk-race-run")
    assert unlink(env, "lk-race", gone.id).returncode == 0
    items = [i for page in runs.item_pages(settings, run_id, 100, pending_only=True) for i in page]
    calls = sandbox.state.calls_by_user[gone.id]
    result = run_batch(Deps(settings), run_id, items, None)
    assert (result.succeeded, result.failed) == (1, 1)
    assert sandbox.state.calls_by_user[gone.id] == calls  # no Powens call for the unlinked user
    with session_scope(settings) as s:
        items_now = s.execute(
            select(RunItem.account_id, RunItem.status, RunItem.reason).where(RunItem.run_id == run_id)
        ).all()
    outcomes = {account: reason for account, _status, reason in items_now}
    status = {account: item_status for account, item_status, _reason in items_now}
    assert outcomes == {accounts_of(t, gone)[0]: "not_found", accounts_of(t, kept)[0]: None}
    assert status[accounts_of(t, gone)[0]] == ItemStatus.FAILED


def test_the_operator_views_leave_out_an_unlinked_users_connections(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    from app.reports.attention import service_counts, tenant_views

    t = seed_tenant(settings, sandbox, "lk-views", users=2, accounts=1)
    tenant(settings, "lk-views")
    gone, kept = t.users
    now = datetime.now(UTC)
    with session_scope(settings) as s:
        for c in s.scalars(select(BankConnection).where(BankConnection.tenant_id == "lk-views")):
            c.set_state("SCARequired", now)

    def needing() -> tuple[set[int], int]:
        with session_scope(settings) as s:
            views = tenant_views(s, settings, "lk-views", now)
            counted = service_counts(s, settings, now).needing
        return {c["powensConnectionId"] for c in views["connectionsNeedingUser"]}, counted

    assert needing() == (set(gone.connections) | set(kept.connections), 2)
    assert unlink(env, "lk-views", gone.id).returncode == 0
    assert needing() == (set(kept.connections), 1)  # nobody can reconnect what nobody refreshes


# -- who may, and what is not there -----------------------------------------------------------------------


def test_only_an_admin_links_or_unlinks(settings: Settings, sandbox: Sandbox, env: dict[str, str]) -> None:
    t = seed_tenant(settings, sandbox, "lk-denied", accounts=1)
    tenant(settings, "lk-denied")
    other = sandbox.state.create_user()
    before = stored_tokens(settings)
    for actor in ("mallory", "vera"):  # nobody, then a viewer
        proc = link(env, "lk-denied", other.id, other.token, actor=actor)
        assert proc.returncode == 3 and said(proc).startswith("policy_denied:"), proc.stderr
        never_shown(proc, other.token)
        proc = unlink(env, "lk-denied", t.user.id, actor=actor)
        assert proc.returncode == 3 and said(proc).startswith("policy_denied:")
    assert stored_tokens(settings) == before
    assert statuses(settings, t.account_ids) == [AccountStatus.ACTIVE]
    with session_scope(settings) as s:
        denials = s.execute(
            select(AuditEvent.actor, AuditEvent.operation).where(AuditEvent.outcome == "denied")
        ).all()
    assert sorted(denials) == sorted(
        [("mallory", LINK), ("mallory", UNLINK), ("vera", LINK), ("vera", UNLINK)]
    )
    assert shell(env, "powens", "list", "--tenant", "lk-denied", actor="mallory").returncode == 3


def test_unlinking_an_unknown_tenant_or_user_is_not_found(
    settings: Settings, sandbox: Sandbox, env: dict[str, str]
) -> None:
    t = seed_tenant(settings, sandbox, "lk-unknown", accounts=1)
    tenant(settings, "lk-elsewhere")
    proc = unlink(env, "lk-nobody", t.user.id)
    assert proc.returncode == 1 and said(proc).startswith("not_found: no tenant 'lk-nobody'")
    proc = unlink(env, "lk-unknown", t.user.id + 1000, "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["reason"] == "not_found"
    proc = unlink(env, "lk-elsewhere", t.user.id)  # another tenant's user is not found either
    assert proc.returncode == 1 and said(proc).startswith("not_found: Powens user")
    assert token_of(settings, t.user.id) == t.user.token
    assert shell(env, "powens", "list", "--tenant", "lk-nobody").returncode == 1


# -- the client's call ------------------------------------------------------------------------------------

BASE = "https://acme-sandbox.biapi.pro/2.0/"


def client() -> PowensClient:
    return PowensClient(BASE, zone=ZoneInfo("Europe/Paris"), read_timeout=2)


@responses.activate
def test_token_owner_reads_the_users_id_and_maps_errors_at_the_one_boundary() -> None:
    responses.get(BASE + "users/me", json={"id": 42, "signin": "2026-01-02 10:00:00", "platform": "x"})
    assert client().token_owner("tok").value == 42
    assert responses.calls[0].request.headers["Authorization"] == "Bearer tok"
    for status, body, reason in (
        (401, {"code": "invalidAccessToken", "description": "bad"}, Reason.UNAUTHORIZED),
        (403, {"code": "forbidden", "description": "no"}, Reason.UNAUTHORIZED),
        (503, {"code": "maintenance", "description": "later"}, Reason.PROVIDER_UNAVAILABLE),
        (200, {"id": "not-an-id"}, Reason.INVALID_RESPONSE),
        (200, ["not", "a", "user"], Reason.INVALID_RESPONSE),
    ):
        responses.reset()
        responses.get(BASE + "users/me", json=body, status=status)
        with pytest.raises(PowensError) as info:
            client().token_owner("tok")
        assert info.value.reason is reason, (status, body)
