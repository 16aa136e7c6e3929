"""The nightly run's shared read: each Powens user's account list, read once and shared by the tasks
of all its accounts (single flight through the coordinator).

Only the task's own account is parsed from it, so one unreadable account fails alone. Redis keeps only
the fields a refresh reads (no IBAN, account number or BIC) for ``BALANCES_SHARED_READ_TTL`` seconds.
A failed read is shared too, by the tasks at the same attempt number within that attempt's backoff
window (a user's accounts are published together, so they arrive within it): the tasks of one user
make one Powens call per attempt, not one per account, and a later blip-free attempt reads afresh.
The list also reveals accounts we do not know yet; they are registered (best effort: refreshed from
the next run). Absence from the list never deletes an account.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from app.powens.client import EP_ACCOUNTS
from app.powens.errors import PowensError
from app.powens.models import PowensAccount, essential
from app.refresh import tokens
from app.refresh.coordination import Sharing
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt
from app.refresh.tokens import UserToken
from app.retry import ceiling_seconds
from app.store.db import session_scope
from app.store.registry import register_accounts

log = logging.getLogger(__name__)


def shared_account(
    deps: Deps, attempt: Attempt, user: UserToken, account_external_id: int
) -> tuple[PowensAccount | None, str | None, datetime | None]:
    """The account's entry in its user's shared list (None when the list does not have it), its
    request id, and when the list was asked for (what its status words held from)."""
    settings = deps.settings
    assert attempt.run_id is not None
    key = f"accounts:{attempt.run_id}:{user.powens_user_id}"

    def fetch() -> dict[str, Any]:
        asked = deps.clock()
        raw, rid = tokens.call(deps, user, lambda t: deps.client.list_accounts_raw(t, user.powens_user_id))
        register_listed(deps, user.user_pk, user.powens_user_id, raw)
        # What goes to Redis is only what a refresh reads: no IBAN, account number or BIC.
        return {
            "accounts": [essential(item) for item in raw],
            "request_id": rid,
            "asked_at": asked.isoformat(),
        }

    shared = deps.coord.shared(
        key,
        fetch,
        ttl=settings.shared_read_ttl,
        wait=settings.powens_call_budget,
        sharing=Sharing(
            failure_key=f"{key}:failed:{attempt.number}",
            # until this attempt's retries have all come back (their longest backoff), and a margin
            failure_ttl=ceiling_seconds(attempt.number + 1, settings) + 5,
            lease=settings.lock_lease_seconds,
        ),
    )
    rid = shared.get("request_id")
    asked = shared.get("asked_at")
    asked_at = datetime.fromisoformat(asked) if isinstance(asked, str) else None
    for item in shared["accounts"]:
        if isinstance(item, dict) and str(item.get("id")) == str(account_external_id):
            return PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS), rid, asked_at
    return None, rid, asked_at


def register_listed(deps: Deps, user_pk: int, powens_user_id: int, raw: list[Any]) -> None:
    """Accounts of the user's list that we do not know yet are registered (best effort)."""
    parsed: list[PowensAccount] = []
    for item in raw:
        try:
            parsed.append(PowensAccount.parse(item, deps.settings.powens_zone, EP_ACCOUNTS))
        except PowensError as err:
            ident = item.get("id") if isinstance(item, dict) else None
            log.warning("Powens user %s: account %s not registered: %s", powens_user_id, ident, err.message)
    try:
        with session_scope(deps.settings) as session:
            register_accounts(session, user_pk, [], parsed, deps.clock(), update_existing=False)
    except Exception:  # best effort: discovery or the next run registers them; siblings go on
        log.warning("Powens user %s: new accounts not registered", powens_user_id, exc_info=True)
