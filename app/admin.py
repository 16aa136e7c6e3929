"""Tenants and actors: what the admin shell manages besides refreshes. One transaction per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from app.config import Settings
from app.contract import ID_MAX_LENGTH
from app.errors import InvalidInput
from app.store import repo
from app.store.db import session_scope


@dataclass(frozen=True)
class TenantView:
    id: str
    name: str
    active: bool
    created_at: datetime


@dataclass(frozen=True)
class ActorView:
    name: str
    roles: tuple[str, ...]
    updated_at: datetime


def add_tenant(settings: Settings, tenant_id: str, name: str | None) -> bool:
    """Returns True when the tenant is new."""
    tenant_id = tenant_id.strip()
    if not 1 <= len(tenant_id) <= ID_MAX_LENGTH:
        raise InvalidInput(f"tenant id must be 1 to {ID_MAX_LENGTH} characters")
    with session_scope(settings) as session:
        _, created = repo.add_tenant(session, tenant_id, name or tenant_id, datetime.now(UTC))
    return created


def list_tenants(settings: Settings) -> list[TenantView]:
    with session_scope(settings) as session:
        return [
            TenantView(t.id, t.name, t.active, t.created_at)
            for t in repo.list_tenants(session, active_only=False)
        ]


def grant(settings: Settings, name: str, role: str) -> bool:
    with session_scope(settings) as session:
        return repo.grant_role(session, name, role, datetime.now(UTC))


def revoke(settings: Settings, name: str, role: str) -> bool:
    with session_scope(settings) as session:
        return repo.revoke_role(session, name, role, datetime.now(UTC))


def list_actors(settings: Settings) -> Sequence[ActorView]:
    with session_scope(settings) as session:
        return [ActorView(a.name, tuple(a.roles), a.updated_at) for a in repo.list_actors(session)]
