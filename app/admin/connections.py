"""Reconnect links, made at the moment a person asks for one (never stored, never logged).

Audited (who asked, for which connection, when); the link itself — it carries Powens' temporary code —
goes only to the person who asked.
"""

from __future__ import annotations

from app.admin import operations as ops
from app.errors import NotFound
from app.policy import Actor, authorize
from app.powens.links import reconnect_url
from app.refresh import tokens
from app.refresh.deps import Deps
from app.refresh.tokens import UserToken
from app.store import repo
from app.store.db import session_scope


def reconnect_link(deps: Deps, actor: Actor, tenant_id: str, connection_id: str) -> str:
    authorize(ops.RECONNECT_LINK, actor)
    with session_scope(deps.settings) as session:
        found = repo.find_connection(session, tenant_id, connection_id)
        if found is None:
            raise NotFound(f"connection {connection_id!r} not found for tenant {tenant_id!r}")
        connection, user_row = found
        user = UserToken.of(deps, user_row)
        external_id = connection.external_id
    code = tokens.call(deps, user, deps.client.temporary_code)
    with session_scope(deps.settings) as session:
        detail = {"powensConnectionId": external_id}
        repo.audit(
            session,
            deps.clock(),
            actor.name,
            ops.RECONNECT_LINK.qualified_name,
            connection_id,
            "done",
            detail,
        )
    return reconnect_url(deps.settings, external_id, code)
