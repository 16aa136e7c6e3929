"""The nightly run's shared read: each Powens user's account list, read once and shared by the tasks
of all its accounts (single flight through the coordinator).

Only the task's own account is parsed from it, so one unreadable account fails alone. A failed read is
shared too, by every task at the same attempt number, for the run's retry window: the tasks of one user
make one Powens call per attempt, not one per account. The list also reveals accounts we do not know
yet; they are registered (refreshed from the next run). Absence from the list never deletes an account.
"""

from __future__ import annotations

import logging
from typing import Any

from app.coordination import Sharing
from app.deps import Deps
from app.outcomes import Attempt
from app.powens.client import EP_ACCOUNTS
from app.powens.errors import PowensError
from app.powens.models import PowensAccount
from app.store.db import session_scope
from app.store.registry import register_accounts

log = logging.getLogger(__name__)


def shared_account(
    deps: Deps, attempt: Attempt, user_pk: int, powens_user_id: int, token: str, account_external_id: int
) -> tuple[PowensAccount | None, str | None]:
    """The account's entry in its user's shared list (None when the list does not have it)."""
    settings = deps.settings
    assert attempt.run_id is not None
    key = f"accounts:{attempt.run_id}:{powens_user_id}"

    def fetch() -> dict[str, Any]:
        raw, rid = deps.client.list_accounts_raw(token, powens_user_id)
        _register(deps, user_pk, powens_user_id, raw)
        return {"accounts": raw, "request_id": rid}

    shared = deps.coord.shared(
        key,
        fetch,
        ttl=settings.shared_read_ttl,
        wait=settings.powens_call_budget,
        sharing=Sharing(
            failure_key=f"{key}:failed:{attempt.number}",
            failure_ttl=settings.retry_cap_seconds + settings.task_time_limit,
            lease=settings.lock_lease_seconds,
        ),
    )
    rid = shared.get("request_id")
    for item in shared["accounts"]:
        if isinstance(item, dict) and str(item.get("id")) == str(account_external_id):
            return PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS), rid
    return None, rid


def _register(deps: Deps, user_pk: int, powens_user_id: int, raw: list[Any]) -> None:
    parsed: list[PowensAccount] = []
    for item in raw:
        try:
            parsed.append(PowensAccount.parse(item, deps.settings.powens_zone, EP_ACCOUNTS))
        except PowensError as err:
            ident = item.get("id") if isinstance(item, dict) else None
            log.warning("Powens user %s: account %s not registered: %s", powens_user_id, ident, err.message)
    with session_scope(deps.settings) as session:
        register_accounts(session, user_pk, [], parsed, deps.clock(), update_existing=False)
