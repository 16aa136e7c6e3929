"""Tenants and actors: what the admin shell manages besides refreshes. One transaction per call.

Roles change only through ``grant`` and ``revoke``, each audited (who, whom, when, and a refusal too).
The first admin is the bootstrap: while no actor holds ``admin``, anyone who can reach the database
may grant it; from then on only an admin may grant or revoke, and the last admin cannot be revoked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from app.admin import operations as ops
from app.config import Settings
from app.contract import ID_MAX_LENGTH
from app.errors import InvalidInput, PolicyDenied
from app.policy import ADMIN, ROLES, Actor, authorize
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


TENANT_NAME_MAX_LENGTH = 200  # its column


def add_tenant(settings: Settings, tenant_id: str, name: str | None) -> bool:
    """Returns True when the tenant is new."""
    tenant_id = tenant_id.strip()
    if not 1 <= len(tenant_id) <= ID_MAX_LENGTH or not tenant_id.isprintable():
        raise InvalidInput(f"tenant id must be 1 to {ID_MAX_LENGTH} printable characters")
    if name is not None and (len(name) > TENANT_NAME_MAX_LENGTH or not name.isprintable()):
        raise InvalidInput(f"tenant name must be at most {TENANT_NAME_MAX_LENGTH} printable characters")
    with session_scope(settings) as session:
        _, created = repo.add_tenant(session, tenant_id, name or tenant_id, datetime.now(UTC))
    return created


def list_tenants(settings: Settings) -> list[TenantView]:
    with session_scope(settings) as session:
        return [
            TenantView(t.id, t.name, t.active, t.created_at)
            for t in repo.list_tenants(session, active_only=False)
        ]


def grant(settings: Settings, acting: Actor, name: str, role: str) -> bool:
    """Give ``name`` the role. Returns False when it already had it. Raises PolicyDenied (audited)."""
    op = ops.ADMIN_GRANT.qualified_name
    denied: PolicyDenied | None = None
    changed = False
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role[:40]!r}: the roles are {', '.join(ROLES)}")
    with session_scope(settings) as session:
        repo.lock_roles(session)  # two bootstraps at once make one admin, not two
        now = datetime.now(UTC)
        bootstrap = not repo.admins(session)
        try:
            if not bootstrap:
                authorize(ops.ADMIN_GRANT, acting)
        except PolicyDenied as exc:
            denied = exc
            repo.audit(session, now, acting.name, op, name, "denied", {"role": role, "reason": exc.message})
        else:
            changed = repo.grant_role(session, name, role, now)
            detail = {"role": role, "bootstrap": bootstrap, "changed": changed}
            repo.audit(session, now, acting.name, op, name, "done", detail)
    if denied is not None:
        raise denied
    return changed


def revoke(settings: Settings, acting: Actor, name: str, role: str) -> bool:
    """Take the role from ``name``. Returns False when it did not have it."""
    op = ops.ADMIN_REVOKE.qualified_name
    denied: PolicyDenied | None = None
    changed = False
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role[:40]!r}: the roles are {', '.join(ROLES)}")
    refused: InvalidInput | None = None
    with session_scope(settings) as session:
        repo.lock_roles(session)  # two revokes at once cannot leave no admin
        now = datetime.now(UTC)
        holders = repo.admins(session)
        try:
            authorize(ops.ADMIN_REVOKE, acting)
        except PolicyDenied as exc:
            denied = exc
            repo.audit(session, now, acting.name, op, name, "denied", {"role": role, "reason": exc.message})
        else:
            if role == ADMIN and holders == [name]:
                refused = InvalidInput(f"{name!r} is the last admin: grant another admin before revoking it")
                repo.audit(
                    session, now, acting.name, op, name, "refused", {"role": role, "reason": refused.message}
                )
            else:
                changed = repo.revoke_role(session, name, role, now)
                repo.audit(session, now, acting.name, op, name, "done", {"role": role, "changed": changed})
    if denied is not None:
        raise denied
    if refused is not None:
        raise refused
    return changed


def rotate_keys(settings: Settings, acting: Actor, batch: int = 500) -> int:
    """Re-encrypt every stored Powens token under the newest key of BALANCES_ENCRYPTION_KEY.

    With no downtime: workers run with "new,old" (they decrypt both) while this runs, batch by batch in
    short transactions; afterwards the old key can be removed everywhere. Returns the tokens rotated."""
    from sqlalchemy import select

    from app.store.models import PowensUser
    from app.store.secrets import TokenCipher

    authorize(ops.KEYS_ROTATE, acting)
    cipher = TokenCipher.from_settings(settings)
    rotated, last = 0, 0
    while True:
        with session_scope(settings) as session:
            rows = session.scalars(
                select(PowensUser)
                .where(PowensUser.id > last, PowensUser.token_encrypted.is_not(None))  # unlinked: none
                .order_by(PowensUser.id)
                .limit(batch)
                .with_for_update()
            ).all()
            if not rows:
                break
            for row in rows:
                assert row.token_encrypted is not None
                row.token_encrypted = cipher.rotate(row.token_encrypted)
            rotated += len(rows)
            last = rows[-1].id
    with session_scope(settings) as session:
        repo.audit(
            session,
            datetime.now(UTC),
            acting.name,
            ops.KEYS_ROTATE.qualified_name,
            None,
            "done",
            {"tokens": rotated},
        )
    return rotated


UNSIGNED = "(unsigned message)"


def record_denial(settings: Settings, actor: Actor | None, operation: str, reason: str) -> None:
    """A refused admin-shell command, or a task message the service did not sign (``actor`` None),
    leaves its trace too."""
    with session_scope(settings) as session:
        name = actor.name if actor is not None else UNSIGNED
        repo.audit(session, datetime.now(UTC), name, operation, None, "denied", {"reason": reason})


def list_actors(settings: Settings) -> Sequence[ActorView]:
    with session_scope(settings) as session:
        return [ActorView(a.name, tuple(a.roles), a.updated_at) for a in repo.list_actors(session)]
