"""The retention policy applied now, from the shell (``balances db prune``): what the scheduled task
does (``app.store.retention.prune``), and an audit event saying who deleted what — an operator
deleting history is an administrative act, as a grant or a key rotation is. A dry run changes
nothing and is not audited."""

from __future__ import annotations

from datetime import UTC, datetime

from app.admin.operations import DB_PRUNE
from app.config import Settings
from app.policy import Actor
from app.store import repo
from app.store.db import session_scope
from app.store.retention import Pruned, prune


def prune_now(settings: Settings, actor: Actor, *, dry_run: bool = False) -> Pruned:
    report = prune(settings, dry_run=dry_run)
    if not dry_run:
        detail = {k: v for k, v in report.as_json().items() if k in ("deleted", "partitionsCreated", "more")}
        with session_scope(settings) as session:
            repo.audit(session, datetime.now(UTC), actor.name, DB_PRUNE.qualified_name, None, "done", detail)
    return report
