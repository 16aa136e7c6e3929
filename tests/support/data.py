"""Arrange helpers: real rows through the public functions, real sandbox users."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app.admin.accounts import sync_accounts
from app.admin.powens_users import link_powens_user
from app.config import Settings
from app.devtools.sandbox import Sandbox, SUser
from app.policy import ADMIN, Actor
from app.refresh.deps import Deps
from app.store import repo
from app.store.db import session_scope

ADMIN_ACTOR = Actor("alice", frozenset({ADMIN}))


@dataclass
class Seeded:
    tenant_id: str
    user: SUser  # the first of ``users``
    account_ids: list[str]  # canonical ids, in Powens id order
    external: dict[str, int]  # canonical id -> Powens id
    users: list[SUser]


def seed_tenant(
    settings: Settings,
    sandbox: Sandbox,
    tenant_id: str,
    *,
    connections: int = 1,
    accounts: int = 2,
    users: int = 1,
) -> Seeded:
    """A tenant with ``users`` Powens users, each with ``connections`` x ``accounts`` accounts."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        repo.add_tenant(session, tenant_id, tenant_id, now)
        repo.grant_role(session, "alice", ADMIN, now)
    made = [
        sandbox.state.create_user(connections=connections, accounts_per_connection=accounts)
        for _ in range(users)
    ]
    for user in made:
        link_powens_user(settings, tenant_id, user.id, user.token, now)
    sync_accounts(tenant_id, ADMIN_ACTOR, Deps.default(settings))
    ours = {user.id for user in made}
    with session_scope(settings) as session:
        rows = [a for a, _c, u in repo.list_accounts(session, tenant_id) if u.powens_user_id in ours]
    rows.sort(key=lambda a: a.external_id)
    return Seeded(tenant_id, made[0], [a.id for a in rows], {a.id: a.external_id for a in rows}, made)


def telemetry_events(caplog_records: Iterable[Any]) -> list[dict[str, Any]]:
    from app.jsonio import loads

    return [loads(r.getMessage()) for r in caplog_records if r.name == "openbanking.telemetry"]


def nightly_run(settings: Settings, name: str) -> str:
    """The nightly run keyed ``name`` (its tick), planned over today's active accounts when new: the
    run items a scheduled refresh records its outcome against."""
    from app.nightly import pipeline
    from app.store.states import Trigger

    run_id, created = pipeline.start_run(
        settings, trigger=Trigger.SCHEDULED, actor="system:scheduler", tick=name
    )
    if created:
        pipeline.plan_run(settings, run_id, lambda *_: None, lambda *_: None)
    return run_id
