"""A tenant's bank connections as an operator sees them, and reconnect links, made at the moment a
person asks for one (never stored, never logged).

A link is audited (who asked, for which connection, when); the link itself — it carries Powens'
temporary code — goes only to the person who asked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from app.admin import operations as ops
from app.config import Settings
from app.errors import NotFound
from app.policy import Actor, authorize
from app.powens.links import reconnect_command, reconnect_url
from app.refresh import tokens
from app.refresh.deps import Deps
from app.refresh.tokens import UserToken
from app.reports.attention import consent_ending, needs_attention
from app.store import repo
from app.store.db import session_scope
from app.store.models import BankAccount, BankConnection, PowensUser
from app.store.states import AccountStatus


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


def connection_list(settings: Settings, tenant_id: str) -> list[dict[str, Any]]:
    """Each connection of the tenant: its Powens state and since when, the bank's last update, its
    consent's end, its active accounts, and — when it needs a person (``needs_attention``) or its
    consent ends within BALANCES_CONSENT_WARNING_DAYS — the command that makes its reconnect link."""
    now = datetime.now(UTC)
    with session_scope(settings) as session:
        repo.require_tenant(session, tenant_id)
        accounts = (
            select(func.count())
            .where(BankAccount.connection_id == BankConnection.id, BankAccount.status == AccountStatus.ACTIVE)
            .scalar_subquery()
        )
        rows = session.execute(
            select(BankConnection, PowensUser.powens_user_id, accounts)
            .join(PowensUser, PowensUser.id == BankConnection.powens_user_pk)
            .where(BankConnection.tenant_id == tenant_id)
            .order_by(BankConnection.external_id)
        ).all()
        listed = []
        for c, powens_user_id, active_accounts in rows:
            why = needs_attention(settings, c.state, c.state_since, now) if c.active else None
            ending = c.active and consent_ending(settings, c.consent_expires_at, now)
            listed.append(
                {
                    "connectionId": c.id,
                    "powensConnectionId": c.external_id,
                    "powensUserId": powens_user_id,
                    "connectorId": c.id_connector,
                    "active": c.active,
                    "state": c.state,
                    "stateSince": c.state_since,
                    "errorMessage": c.error_message,
                    "bankLastUpdate": c.last_update,
                    "nextTry": c.next_try,
                    "consentExpiresAt": c.consent_expires_at,
                    "accounts": int(active_accounts or 0),
                    "needsAttention": why or ("consent_ending" if ending else None),
                    "reconnectCommand": reconnect_command(tenant_id, c.id) if why or ending else None,
                }
            )
        return listed
