"""A queued Powens push applied to the store: the worker side of the push path. Plain functions, no
Celery inside and no Powens call.

Balance events (``CONNECTION_SYNCED``, ``ACCOUNT_SYNCED``) go through the refresh's own write path
(``app.refresh.write_path``): the same mapping, the same "never replace by older data" rule, the
same snapshot, the same audit row, counter and telemetry event (trigger ``webhook``, actor
``system:powens-webhook``). Each account of an event is its own outcome, recorded under a key made
of Powens' user, account, ``last_update`` and state: a redelivered event finds its outcome already
recorded and writes nothing, and an event older than what is stored writes nothing either. Status
events (``ACCOUNT_DISABLED``, ``ACCOUNT_ENABLED``, ``CONNECTION_DELETED``) update the account or
connection only.

Rows are found by Powens' ids within the Powens user a tenant linked, so a push never reaches another
tenant's rows. A Powens user no tenant linked is counted and logged (nothing written). An account
Powens found that we have not registered yet is registered from the push, through the one registration
path and in that user's tenant — with webhooks flowing, the nightly run may never list that user again.
A push for a deleted account (or one older than what is stored, found again under the account's row
lock) writes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from app import jsonio
from app.contract import OpenBankingRefreshBalancesInput
from app.errors import Reason, RefreshError
from app.ops import metrics
from app.ops.metrics import PushOutcome
from app.policy import POWENS_PUSH
from app.powens.errors import PowensError
from app.powens.models import PowensAccount, PowensConnection
from app.push.events import Event
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt, Subject, Succeeded, record, replay
from app.refresh.write_path import Where, judge, store
from app.store import external
from app.store.db import session_scope
from app.store.models import BankAccount
from app.store.registry import register_accounts
from app.store.states import AccountStatus, Trigger

log = logging.getLogger(__name__)
ENDPOINT = "webhook"


@dataclass(frozen=True)
class Applied:
    """What became of one account (or of the event, when it names no account we know)."""

    outcome: PushOutcome
    account_id: str | None = None


def apply(deps: Deps, payload: str, received_at: datetime) -> list[Applied]:
    """Apply one queued event (``payload``: its JSON text, as ``app.push.events.reduce`` made it)."""
    event_doc: dict[str, Any] = jsonio.loads(payload)
    event = Event(event_doc["event"])
    results = list(_apply(deps, event, event_doc, received_at))
    for result in results:
        metrics.WEBHOOKS.labels(event=event.value, outcome=result.outcome.value).inc()
    return results


def _apply(deps: Deps, event: Event, doc: dict[str, Any], received_at: datetime) -> Iterator[Applied]:
    settings = deps.settings
    powens_user_id = int(doc["user"])
    with session_scope(settings) as session:
        user = external.user(session, powens_user_id)
        user_pk = user.id if user is not None else None
    if user_pk is None:
        log.warning(
            "Powens push %s for Powens user %s, whom no tenant linked: ignored", event, powens_user_id
        )
        yield Applied(PushOutcome.UNKNOWN_USER)
        return
    if event is Event.CONNECTION_DELETED:
        yield _connection_deleted(deps, user_pk, int(doc["connection"]["id"]))
        return
    if event in (Event.ACCOUNT_DISABLED, Event.ACCOUNT_ENABLED):
        for raw in doc["accounts"]:
            yield _account_status(deps, user_pk, raw, event)
        return
    state: str | None = None
    if event is Event.CONNECTION_SYNCED:
        try:
            conn = PowensConnection.parse(doc["connection"], settings.powens_zone, ENDPOINT)
        except PowensError as err:
            log.warning("Powens push %s: unreadable connection: %s", event, err.message)
            yield Applied(PushOutcome.INVALID_PAYLOAD)
            return
        state = conn.state  # None: the connection is fine (each account's own error still counts)
        _update_connection(deps, user_pk, conn)
    for raw in doc["accounts"]:
        yield _balances(deps, user_pk, powens_user_id, raw, state, received_at)


def push_key(powens_user_id: int, pacc: PowensAccount, state: str | None) -> str:
    """The audit key of one account's push: the same account, sync and state is the same push."""
    last = pacc.last_update.isoformat() if pacc.last_update else f"none:{pacc.balance}:{pacc.coming}"
    flags = f"{'disabled' if pacc.disabled else ''}:{'deleted' if pacc.deleted else ''}"
    text = f"{powens_user_id}:{pacc.id}:{last}:{state or pacc.error or ''}:{flags}"
    return "push-" + hashlib.sha256(text.encode()).hexdigest()[:40]


class Superseded(Exception):
    """Found under the account's row lock: what is stored is newer than this push, or the account is
    deleted. The push's transaction is rolled back: nothing written, no audit row."""

    def __init__(self, outcome: PushOutcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


def _balances(
    deps: Deps, user_pk: int, powens_user_id: int, raw: Any, state: str | None, received_at: datetime
) -> Applied:
    settings = deps.settings
    try:
        pacc = PowensAccount.parse(raw, settings.powens_zone, ENDPOINT)
    except PowensError as err:
        log.warning("Powens push: unreadable account: %s", err.message)
        return Applied(PushOutcome.INVALID_PAYLOAD)
    registered = False
    with session_scope(settings) as session:
        found = external.account(session, user_pk, pacc.id)
        if found is None:
            # Powens found an account we had not registered: registered now, in the tenant that linked
            # this Powens user (the one registration path), so pushes keep discovery going too.
            register_accounts(session, user_pk, [], [pacc], deps.clock(), update_existing=False)
            session.flush()
            found = external.account(session, user_pk, pacc.id)
            registered = found is not None
            if found is None:
                return Applied(PushOutcome.UNKNOWN_ACCOUNT)
            log.info("Powens push: account %s of Powens user %s registered", pacc.id, powens_user_id)
        account, connection = found
        tenant_id, account_id = account.tenant_id, account.id
        where = Where(connection.id, connection.external_id)
        held, deleted = account.powens_last_update, account.status == AccountStatus.DELETED
    if deleted:
        return Applied(PushOutcome.DELETED, account_id)
    key = push_key(powens_user_id, pacc, state)
    if replay(settings, key) is not None:
        return Applied(PushOutcome.DUPLICATE, account_id)
    if _older(pacc, held):
        return Applied(PushOutcome.OUT_OF_ORDER, account_id)
    inp = OpenBankingRefreshBalancesInput(tenant_id=tenant_id, account_id=account_id)
    subject = Subject.of(inp, POWENS_PUSH, Trigger.WEBHOOK)
    attempt = Attempt(task_id=key)

    def store_unless_superseded(session: Session) -> Any:
        # Checked again under the row lock the write takes anyway: a newer push (or a delete) may have
        # committed since the checks above.
        row = session.get(BankAccount, account_id, with_for_update=True)
        if row is None or row.status == AccountStatus.DELETED:
            raise Superseded(PushOutcome.DELETED)
        if _older(pacc, row.powens_last_update):
            raise Superseded(PushOutcome.OUT_OF_ORDER)
        return store(session, deps, inp, read, None)

    t0 = time.perf_counter()
    try:
        read = judge(deps, inp, where, pacc, None, [], state=state, pushed=True)
        read.refreshed_at = received_at
        outcome = record(
            settings,
            subject,
            attempt,
            attempts=1,
            started_at=received_at,
            clock=deps.clock,
            store=store_unless_superseded,
        )
    except Superseded as late:
        return Applied(late.outcome, account_id)
    except RefreshError as err:
        failed = record(
            settings, subject, attempt, attempts=1, started_at=received_at, clock=deps.clock, error=err
        )
        if failed.replayed:
            return Applied(PushOutcome.DUPLICATE, account_id)
        needs_user = err.reason is Reason.NEEDS_USER_ACTION
        return Applied(PushOutcome.NEEDS_USER if needs_user else PushOutcome.FAILED, account_id)
    finally:
        metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=Trigger.WEBHOOK.value).observe(
            time.perf_counter() - t0
        )
    if isinstance(outcome, Succeeded) and not outcome.replayed:
        return Applied(PushOutcome.REGISTERED if registered else PushOutcome.STORED, account_id)
    return Applied(PushOutcome.DUPLICATE, account_id)


def _older(pacc: PowensAccount, held: datetime | None) -> bool:
    older = held is not None and pacc.last_update is not None and pacc.last_update < held
    if older:
        log.info("Powens push for account %s is older than the stored data: nothing written", pacc.id)
    return older


def _update_connection(deps: Deps, user_pk: int, conn: PowensConnection) -> None:
    """The connection's own fields, when this sync is not older than the one held."""
    now = deps.clock()
    with session_scope(deps.settings) as session:
        row = external.connection(session, user_pk, conn.id)
        if row is None:
            return
        if (
            row.last_update is not None
            and conn.last_update is not None
            and conn.last_update < row.last_update
        ):
            return
        row.error_message = conn.error_message
        row.last_update = conn.last_update or row.last_update
        row.next_try = conn.next_try
        if row.active:  # a connection CONNECTION_DELETED deactivated stays so, whatever a late push says
            row.active = conn.active
        if conn.consent_expires_at is not None:
            row.consent_expires_at = conn.consent_expires_at
        row.updated_at = now


def _account_status(deps: Deps, user_pk: int, raw: Any, event: Event) -> Applied:
    try:
        pacc = PowensAccount.parse(raw, deps.settings.powens_zone, ENDPOINT)
    except PowensError as err:
        log.warning("Powens push %s: unreadable account: %s", event, err.message)
        return Applied(PushOutcome.INVALID_PAYLOAD)
    status = AccountStatus.DISABLED if event is Event.ACCOUNT_DISABLED else AccountStatus.ACTIVE
    with session_scope(deps.settings) as session:
        found = external.account(session, user_pk, pacc.id)
        if found is None:
            return Applied(PushOutcome.UNKNOWN_ACCOUNT)
        account, _ = found
        if account.status != AccountStatus.DELETED or status is AccountStatus.ACTIVE:
            account.status = status
            account.updated_at = deps.clock()
        return Applied(PushOutcome.STATUS_UPDATED, account.id)


def _connection_deleted(deps: Deps, user_pk: int, external_id: int) -> Applied:
    now = deps.clock()
    with session_scope(deps.settings) as session:
        row = external.connection(session, user_pk, external_id)
        if row is None:
            return Applied(PushOutcome.UNKNOWN_ACCOUNT)
        row.active = False
        row.updated_at = now
        external.set_connection_accounts_status(session, row.id, AccountStatus.DELETED, now)
    return Applied(PushOutcome.STATUS_UPDATED)
