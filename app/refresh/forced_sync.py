"""Forcing a bank sync before a refresh, within the PSD2 budget of background accesses.

PSD2 (RTS Art. 36(5)(b)) allows 4 accesses per connection per 24 h without the user. A slot is taken
under a row lock on the connection, so two workers cannot both take the last one; it is given back when
the request never reached Powens (the rate limiter re-queued the task first) or Powens started no sync
(409: one is running). A refresh forces at most once: its retries read what Powens has.
"""

from __future__ import annotations

from datetime import timedelta

from app.jsonio import rfc3339
from app.policy import Actor
from app.powens.errors import PowensError
from app.refresh import tokens
from app.refresh.coordination import Throttled
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt
from app.refresh.tokens import UserToken
from app.store import repo
from app.store.db import session_scope


def force_sync(
    deps: Deps,
    actor: Actor,
    attempt: Attempt,
    user: UserToken,
    connection_id: str,
    connection_external_id: int,
) -> tuple[list[str], str | None]:
    """Force a bank sync within the quota; past it, say so (the refresh reads what Powens has).
    Returns the notes and the connection's state as the sync left it (the refresh's verdict records
    it, in the refresh's own transaction)."""
    settings = deps.settings
    now = deps.clock()
    with session_scope(settings) as session:
        repo.lock_connection(session, connection_id)
        if attempt.task_id is not None and repo.forced_by_task(session, connection_id, attempt.task_id):
            return ["forced sync already made by an earlier attempt of this refresh; read its result"], None
        used = repo.forced_syncs_since(session, connection_id, now - timedelta(hours=24))
        if used >= settings.force_sync_quota:
            oldest = repo.oldest_forced_sync_since(session, connection_id, now - timedelta(hours=24))
            when = (oldest or now) + timedelta(hours=24)
            return [
                f"forced sync skipped: quota of {settings.force_sync_quota} background syncs per 24 h "
                f"reached for connection {connection_external_id}; next forced sync allowed at "
                f"{rfc3339(when, seconds=True)}; read the last synced data"
            ], None
        slot = repo.record_forced_sync(session, connection_id, now, actor.name, attempt.task_id).id
    try:
        answer = tokens.call(
            deps, user, lambda t: deps.client.sync_connection(t, user.powens_user_id, connection_external_id)
        )
    except Throttled:
        _release(deps, slot)
        raise
    except PowensError as err:
        if err.status == 409:
            _release(deps, slot)
            return ["forced sync not started: a sync of this connection is already running"], None
        raise
    return [], answer.value.state


def _release(deps: Deps, slot: int) -> None:
    with session_scope(deps.settings) as session:
        repo.release_forced_sync(session, slot)
