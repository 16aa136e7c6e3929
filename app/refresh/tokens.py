"""A Powens user's permanent token in use: decrypted only in memory, renewed once when Powens refuses it.

Permanent tokens do not expire, but they can be revoked. When Powens answers 401 to a user token, the
service asks for a new one with its client credentials (``POST /auth/renew``, ``POWENS_CLIENT_ID`` /
``POWENS_CLIENT_SECRET``), stores it encrypted and tries the call once more; a second refusal is
``unauthorized``. The renewal runs under a row lock on the user: of several tasks refused at once, one
renews and the others take the token it stored. The token never leaves this process unencrypted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from app.errors import NotFound
from app.powens.errors import PowensError
from app.refresh.deps import Deps
from app.store import repo
from app.store.db import session_scope
from app.store.models import PowensUser

T = TypeVar("T")
RENEW_OPERATION = "powens.token.renew"


@dataclass(frozen=True)
class UserToken:
    user_pk: int
    powens_user_id: int
    tenant_id: str
    token: str
    blob: bytes  # as stored: tells whether another task renewed it meanwhile

    @classmethod
    def of(cls, deps: Deps, user: PowensUser) -> UserToken:
        if user.token_encrypted is None:
            raise unlinked(user)
        return cls(
            user.id,
            user.powens_user_id,
            user.tenant_id,
            deps.cipher.decrypt(user.token_encrypted),
            bytes(user.token_encrypted),
        )


def unlinked(user: PowensUser) -> NotFound:
    """A user unlinked from its tenant (``balances powens unlink``) has no token: nothing calls Powens
    for it until it is linked again."""
    return NotFound(
        f"Powens user {user.powens_user_id} is unlinked from tenant {user.tenant_id!r}: no token "
        "(link it again with `balances powens link`)"
    )


def call(deps: Deps, user: UserToken, powens_call: Callable[[str], T]) -> T:
    """``powens_call(token)``, renewing the token once if Powens refuses it (401)."""
    try:
        return powens_call(user.token)
    except PowensError as err:
        if err.status != 401 or not renewable(deps):
            raise
    return powens_call(renew(deps, user))


def renewable(deps: Deps) -> bool:
    s = deps.settings
    return bool(s.powens_client_id and s.powens_client_secret)


def renew(deps: Deps, user: UserToken) -> str:
    settings = deps.settings
    assert settings.powens_client_id and settings.powens_client_secret
    with session_scope(settings) as session:
        row = session.get(PowensUser, user.user_pk, with_for_update=True)
        if row is None:
            return user.token
        if row.token_encrypted is None:  # unlinked while Powens refused the token: nothing to renew
            raise unlinked(row)
        stored = deps.cipher.decrypt(row.token_encrypted)
        if stored != user.token:  # renewed by another task while we waited (compared in clear: a key
            return stored  # rotation re-encrypts the same token into another ciphertext)
        token = deps.client.renew_token(
            settings.powens_client_id,
            settings.powens_client_secret.get_secret_value(),
            user.powens_user_id,
            # The refused token is dead already; any other holder renews through the row we lock.
            revoke_previous=True,
        )
        now = deps.clock()
        row.token_encrypted = deps.cipher.encrypt(token)
        row.updated_at = now
        repo.audit(session, now, "system:service", RENEW_OPERATION, str(user.powens_user_id), "done")
    return token
