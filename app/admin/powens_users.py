"""Powens users of a tenant: linking (a token verified with Powens before it is stored), unlinking
(the token deleted, the user's accounts out of every refresh, their history kept) and listing.

One verification rule (``verify_token``): Powens must accept the token (``GET /users/me`` answers) and
say it belongs to the Powens user being linked. ``link_verified`` is what the shell runs; the demo and
the tests' helpers store sandbox tokens they just made with ``link_powens_user``, the same store step
without the Powens call. Linking and unlinking from the shell are audited (who, what, whom, when,
outcome; never the token), refusals too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from app.admin import operations as ops
from app.config import Settings
from app.errors import InvalidInput, NotFound, Reason
from app.policy import Actor, authorize
from app.powens.client import PowensClient
from app.powens.errors import PowensError
from app.refresh.deps import Deps
from app.store import repo
from app.store.db import session_scope
from app.store.secrets import TokenCipher
from app.store.states import AccountStatus

TOKEN_MAX_LENGTH = 4096  # far beyond any Powens token; a header of ours never carries more


@dataclass(frozen=True)
class LinkResult:
    tenant_id: str
    powens_user_id: int
    created: bool  # a new Powens user for the tenant (else its token was replaced, or it was relinked)
    relinked: bool  # it was unlinked: its accounts are back in the refreshes
    restored: int  # how many accounts came back

    def as_json(self) -> dict[str, object]:
        return {
            "tenantId": self.tenant_id,
            "powensUserId": self.powens_user_id,
            "created": self.created,
            "verified": True,
        }


@dataclass(frozen=True)
class UnlinkResult:
    tenant_id: str
    powens_user_id: int
    token_deleted: bool  # False: it was unlinked already
    excluded: int  # accounts this unlink took out of the refreshes
    unlinked_accounts: int  # every account of the user now out of the refreshes for being unlinked
    unlinked_at: datetime

    def as_json(self) -> dict[str, object]:
        return {
            "tenantId": self.tenant_id,
            "powensUserId": self.powens_user_id,
            "tokenDeleted": self.token_deleted,
            "accountsExcluded": self.excluded,
            "unlinkedAt": self.unlinked_at,
        }


@dataclass(frozen=True)
class UserView:
    powens_user_id: int
    linked: bool
    unlinked_at: datetime | None
    accounts: int
    accounts_by_status: dict[str, int]
    last_refreshed_at: datetime | None

    def as_json(self) -> dict[str, object]:
        return {
            "powensUserId": self.powens_user_id,
            "linked": self.linked,
            "unlinkedAt": self.unlinked_at,
            "accounts": self.accounts,
            "accountsByStatus": self.accounts_by_status,
            "lastRefreshedAt": self.last_refreshed_at,
        }


def clean_token(token: str) -> str:
    """The token as read from stdin, refused when it cannot be a Powens token (never echoed)."""
    token = token.strip()
    if not token:
        raise InvalidInput("the Powens token read from stdin is empty: nothing was stored")
    if len(token) > TOKEN_MAX_LENGTH or not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidInput(
            "the text read from stdin is not a Powens token (one line of printable ASCII without "
            f"spaces, at most {TOKEN_MAX_LENGTH} characters): nothing was stored"
        )
    return token


def require_tenant(settings: Settings, tenant_id: str) -> None:
    with session_scope(settings) as session:
        repo.require_tenant(session, tenant_id)


def verify_token(client: PowensClient, token: str, powens_user_id: int) -> None:
    """The one verification rule: Powens accepts the token and says it is ``powens_user_id``'s.

    Raises ``unauthorized`` (Powens refused it), ``invalid_input`` (another user's token), or what
    the call failed with (``provider_unavailable``, ``rate_limited``, ``invalid_response``, ...); the
    messages never carry the token."""
    try:
        owner = client.token_owner(token).value
    except PowensError as err:
        if err.reason is Reason.UNAUTHORIZED:
            answered = f"HTTP {err.status}" + (f", {err.code}" if err.code else "")
            raise PowensError(
                Reason.UNAUTHORIZED,
                f"Powens refused the token ({answered}): it is revoked or invalid; nothing was stored",
                status=err.status,
                code=err.code,
                request_id=err.request_id,
            ) from None
        raise PowensError(
            err.reason,
            f"the token could not be verified: {err.message}; nothing was stored",
            retry_after=err.retry_after,
            status=err.status,
            code=err.code,
            request_id=err.request_id,
        ) from None
    if owner != powens_user_id:
        raise InvalidInput(
            f"the token belongs to Powens user {owner}, not {powens_user_id}: nothing was stored"
        )


def link_powens_user(
    settings: Settings, tenant_id: str, powens_user_id: int, token: str, now: datetime
) -> bool:
    """Store (or replace) a Powens user's permanent token, encrypted, with no Powens call: for the
    demo and the tests, which store sandbox tokens they just made. Returns True when new."""
    cipher = TokenCipher.from_settings(settings)
    return _store(settings, cipher, tenant_id, powens_user_id, clean_token(token), now, None).created


def link_verified(deps: Deps, actor: Actor, tenant_id: str, powens_user_id: int, token: str) -> LinkResult:
    """What ``balances powens link`` does: verify the token with Powens (``verify_token``), then store
    it encrypted; an unlinked user's accounts come back into the refreshes. Audited, refusals too;
    nothing is stored unless Powens vouched for the token."""
    authorize(ops.POWENS_LINK, actor)
    require_tenant(deps.settings, tenant_id)
    cipher = deps.cipher  # a missing or malformed key is said before Powens is asked
    try:
        token = clean_token(token)
        verify_token(deps.client, token, powens_user_id)
        return _store(deps.settings, cipher, tenant_id, powens_user_id, token, deps.clock(), actor)
    except (InvalidInput, PowensError) as exc:  # bad input, refused by Powens, another tenant's user
        _audit(
            deps,
            actor,
            ops.POWENS_LINK.qualified_name,
            tenant_id,
            powens_user_id,
            "refused",
            {"reason": exc.reason.value, "status": exc.status},
        )
        raise


def _store(
    settings: Settings,
    cipher: TokenCipher,
    tenant_id: str,
    powens_user_id: int,
    token: str,
    now: datetime,
    actor: Actor | None,
) -> LinkResult:
    with session_scope(settings) as session:
        repo.require_tenant(session, tenant_id)
        try:
            linked = repo.link_powens_user(session, tenant_id, powens_user_id, cipher.encrypt(token), now)
        except ValueError as exc:  # linked to another tenant
            raise InvalidInput(f"{exc}: nothing was stored") from None
        result = LinkResult(tenant_id, powens_user_id, linked.created, linked.was_unlinked, linked.restored)
        if actor is not None:
            detail = {
                "tenantId": tenant_id,
                "created": result.created,
                "relinked": result.relinked,
                "accountsRestored": result.restored,
                "verified": True,
            }
            repo.audit(
                session, now, actor.name, ops.POWENS_LINK.qualified_name, str(powens_user_id), "done", detail
            )
    return result


def unlink(deps: Deps, actor: Actor, tenant_id: str, powens_user_id: int) -> UnlinkResult:
    """What ``balances powens unlink`` does: delete the stored token and take the user's accounts out
    of nightly runs, on-demand refreshes and pushes (status ``unlinked``; their latest records and
    snapshots stay). Linking the same user again brings them back. Audited."""
    authorize(ops.POWENS_UNLINK, actor)
    now = deps.clock()
    with session_scope(deps.settings) as session:
        repo.require_tenant(session, tenant_id)
        user = repo.powens_user(session, tenant_id, powens_user_id, lock=True)
        if user is None:
            raise NotFound(f"Powens user {powens_user_id} is not linked to tenant {tenant_id!r}")
        was_linked = user.token_encrypted is not None
        excluded = repo.unlink_powens_user(session, user, now)
        held = repo.user_accounts(session, tenant_id).get(user.id)
        out = held.by_status.get(AccountStatus.UNLINKED, 0) if held else 0
        result = UnlinkResult(tenant_id, powens_user_id, was_linked, excluded, out, user.unlinked_at or now)
        detail = {"tenantId": tenant_id, "tokenDeleted": was_linked, "accountsExcluded": excluded}
        repo.audit(
            session, now, actor.name, ops.POWENS_UNLINK.qualified_name, str(powens_user_id), "done", detail
        )
    return result


def list_users(settings: Settings, actor: Actor, tenant_id: str) -> list[UserView]:
    """The tenant's Powens users, linked or not, with their accounts and the last refresh of any."""
    authorize(ops.POWENS_LIST, actor)
    with session_scope(settings) as session:
        repo.require_tenant(session, tenant_id)
        held = repo.user_accounts(session, tenant_id)
        views = []
        for u in repo.powens_users(session, tenant_id, unlinked_too=True):
            mine = held.get(u.id)
            views.append(
                UserView(
                    u.powens_user_id,
                    u.token_encrypted is not None,
                    u.unlinked_at,
                    mine.accounts if mine else 0,
                    dict(mine.by_status) if mine else {},
                    mine.last_refreshed_at if mine else None,
                )
            )
    return views


def _audit(
    deps: Deps,
    actor: Actor,
    operation: str,
    tenant_id: str,
    powens_user_id: int,
    outcome: str,
    detail: dict[str, object],
) -> None:
    with session_scope(deps.settings) as session:
        repo.audit(
            session,
            deps.clock(),
            actor.name,
            operation,
            str(powens_user_id),
            outcome,
            {"tenantId": tenant_id, **detail},
        )
