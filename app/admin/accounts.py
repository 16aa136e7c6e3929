"""Account discovery (the ``openbanking.accounts.sync`` sibling). Linking Powens users: ``powens_users``.

Discovery reads each of the tenant's linked Powens users' connections and accounts (``?all``, so disabled
ones are seen too) and registers them through the one registration path (``app.store.registry``).
An account's status follows what Powens says of it; absence from a list never deletes it. A transient
Powens failure is retried the way a refresh is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from app.contract import ACCOUNTS_SYNC_OPERATION, TelemetryEvents
from app.errors import NotFound, RefreshError
from app.ops import telemetry
from app.policy import Actor, authorize
from app.powens.client import PowensClient
from app.powens.models import Answer, PowensAccount, PowensConnection
from app.refresh import tokens
from app.refresh.deps import Deps
from app.refresh.tokens import UserToken
from app.retry import backoff_seconds
from app.store import repo
from app.store.db import session_scope
from app.store.registry import register_accounts

log = logging.getLogger(__name__)
T = TypeVar("T")
_rng = random.SystemRandom()


@dataclass
class SyncResult:
    synced: int = 0
    failed: int = 0
    created: int = 0
    errors: list[str] = field(default_factory=list)

    def as_contract(self) -> dict[str, object]:
        out: dict[str, object] = {"synced": self.synced, "failed": self.failed}
        if self.errors:
            out["errors"] = self.errors
        return out


def _connections(client: PowensClient, user: UserToken, token: str) -> Answer[list[PowensConnection]]:
    return client.list_connections(token, user.powens_user_id)


def _accounts(client: PowensClient, user: UserToken, token: str) -> Answer[list[PowensAccount]]:
    return client.list_accounts(token, user.powens_user_id)


def _with_retries(deps: Deps, call: Callable[[], T]) -> T:
    """A Powens read retried the way a refresh is: retryable failures (5xx, timeouts, 429) back off
    with full jitter, honouring Retry-After, up to BALANCES_MAX_ATTEMPTS."""
    settings = deps.settings
    for attempt in range(1, settings.max_attempts + 1):
        try:
            return call()
        except RefreshError as err:
            if not err.retryable or attempt == settings.max_attempts:
                raise
            delay = backoff_seconds(attempt, settings, err.retry_after, _rng)
            log.info("Powens read failed (%s); retrying in %.1fs", err.reason.value, delay)
            deps.sleep(delay)
    raise AssertionError("unreachable")


def sync_accounts(tenant_id: str, actor: Actor, deps: Deps) -> SyncResult:
    authorize(ACCOUNTS_SYNC_OPERATION, actor)
    settings = deps.settings
    with session_scope(settings) as session:
        if repo.get_tenant(session, tenant_id) is None:
            raise NotFound(f"tenant {tenant_id!r} does not exist")
        users = [UserToken.of(deps, u) for u in repo.powens_users(session, tenant_id)]
    result = SyncResult()
    client = deps.client
    for user in users:
        powens_user_id, user_pk = user.powens_user_id, user.user_pk
        try:
            conns = _with_retries(deps, partial(tokens.call, deps, user, partial(_connections, client, user)))
            accounts = _with_retries(deps, partial(tokens.call, deps, user, partial(_accounts, client, user)))
        except RefreshError as err:
            result.failed += 1
            result.errors.append(f"Powens user {powens_user_id}: {err.reason.value}: {err.message}")
            telemetry.emit(
                TelemetryEvents.ACCOUNTS_SYNC_FAILED,
                {"tenantId": tenant_id, "userId": str(powens_user_id), "error": err.message},
                actor=actor.name,
                reason=err.reason.value,
            )
            continue
        with session_scope(settings) as session:
            created = register_accounts(
                session, user_pk, conns.value, accounts.value, deps.clock(), update_existing=True
            )
        result.synced += len(accounts.value)
        result.created += created
        telemetry.emit(
            TelemetryEvents.ACCOUNTS_SYNCED,
            {"tenantId": tenant_id, "userId": str(powens_user_id), "synced": len(accounts.value)},
            actor=actor.name,
        )
    return result
