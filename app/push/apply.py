"""A queued Powens push applied to the store: the worker side of the push path. Plain functions, no
Celery inside and no Powens call.

Balance events (``CONNECTION_SYNCED``, ``ACCOUNT_SYNCED``) are judged and written by the refresh's own
write path (``app.refresh.verdict``, ``app.refresh.write``): the same mapping, the same rules, the
same audit row, counter and telemetry event (trigger ``webhook``, actor ``system:powens-webhook``), in
one transaction for the whole event (the connection's own fields included). Each account of an event
is its own outcome, recorded under a key made of Powens' user, account, ``last_update`` and state: a
redelivered event finds its outcome recorded and writes nothing. A push that brings nothing newer than
what is stored, or concerns a deleted account, is superseded: nothing is written or recorded (a push
updates the latest records only; the day's snapshot is the nightly run's).

Status events (``ACCOUNT_DISABLED``, ``ACCOUNT_ENABLED``, ``CONNECTION_DELETED``) change statuses
only, by the write path's status rule (``app.store.states.next_account_status``): a word older than
the one that set the current status changes nothing, so a redelivered ``ACCOUNT_DISABLED`` cannot
undo a later enable. A push's word is dated when the receiver took it (the message carries that
time).

Rows are found by Powens' ids within the Powens user a tenant linked, so a push never reaches another
tenant's rows. A Powens user no tenant linked is counted and logged (nothing written). An account
Powens found that we have not registered yet is registered from the push, through the one registration
path and in that user's tenant — with webhooks flowing, the nightly run may never list that user again.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import jsonio
from app.errors import Reason
from app.ops import metrics
from app.ops.metrics import PushOutcome
from app.policy import POWENS_PUSH
from app.powens.errors import PowensError
from app.powens.models import PowensAccount, PowensConnection
from app.push.events import Event
from app.refresh import write
from app.refresh.deps import Deps
from app.refresh.outcomes import Attempt, Subject
from app.refresh.verdict import Where, judge
from app.store import external
from app.store.db import session_scope
from app.store.models import BankAccount, RefreshAttempt
from app.store.registry import register_accounts
from app.store.states import AccountStatus, Trigger, next_account_status

log = logging.getLogger(__name__)
ENDPOINT = "webhook"
RECORDED = frozenset({PushOutcome.STORED, PushOutcome.REGISTERED, PushOutcome.NEEDS_USER, PushOutcome.FAILED})


@dataclass(frozen=True)
class Applied:
    """What became of one account (or of the event, when it names no account we know)."""

    outcome: PushOutcome
    account_id: str | None = None


def apply(deps: Deps, payload: str, received_at: datetime) -> list[Applied]:
    """Apply one queued event (``payload``: its JSON text, as ``app.push.events.reduce`` made it)."""
    event_doc: dict[str, Any] = jsonio.loads(payload)
    event = Event(event_doc["event"])
    t0 = time.perf_counter()
    results = list(_apply(deps, event, event_doc, received_at))
    elapsed = time.perf_counter() - t0
    for result in results:
        metrics.WEBHOOKS.labels(event=event.value, outcome=result.outcome.value).inc()
        if result.outcome in RECORDED:  # as a batch does: the event's time, for each account it recorded
            metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=Trigger.WEBHOOK.value).observe(elapsed)
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
        yield _connection_deleted(deps, user_pk, int(doc["connection"]["id"]), received_at)
        return
    if event in (Event.ACCOUNT_DISABLED, Event.ACCOUNT_ENABLED):
        for raw in doc["accounts"]:
            yield _account_status(deps, user_pk, raw, event, received_at)
        return
    conn: PowensConnection | None = None
    if event is Event.CONNECTION_SYNCED:
        try:
            conn = PowensConnection.parse(doc["connection"], settings.powens_zone, ENDPOINT)
        except PowensError as err:
            log.warning("Powens push %s: unreadable connection: %s", event, err.message)
            yield Applied(PushOutcome.INVALID_PAYLOAD)
            return
    yield from _balances(deps, user_pk, powens_user_id, doc["accounts"], conn, received_at)


def push_key(powens_user_id: int, pacc: PowensAccount, state: str | None) -> str:
    """The audit key of one account's push: the same account, sync, amounts and state is the same push
    (the amounts tell apart two syncs whose naive time is the same, in the repeated autumn hour)."""
    last = pacc.last_update.isoformat() if pacc.last_update else "none"
    flags = f"{'disabled' if pacc.disabled else ''}:{'deleted' if pacc.deleted else ''}"
    text = (
        f"{powens_user_id}:{pacc.id}:{last}:{pacc.balance}:{pacc.coming}:{state or pacc.error or ''}:{flags}"
    )
    return "push-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _balances(
    deps: Deps,
    user_pk: int,
    powens_user_id: int,
    raws: list[Any],
    conn: PowensConnection | None,
    received_at: datetime,
) -> Iterator[Applied]:
    """The event's accounts, judged and recorded as one batch of the write path."""
    settings = deps.settings
    parsed: list[PowensAccount] = []
    for raw in raws:
        try:
            parsed.append(PowensAccount.parse(raw, settings.powens_zone, ENDPOINT))
        except PowensError as err:
            log.warning("Powens push: unreadable account: %s", err.message)
            yield Applied(PushOutcome.INVALID_PAYLOAD)
    # One outcome per account: an event naming an account twice keeps its newest word only.
    newest: dict[int, PowensAccount] = {}
    for pacc in parsed:
        held = newest.get(pacc.id)
        if held is None or (pacc.last_update or received_at) >= (held.last_update or received_at):
            newest[pacc.id] = pacc
    parsed = list(newest.values())
    state = conn.state if conn is not None else None  # None: fine (each account's own error counts)
    entries: list[write.Entry] = []
    registered: set[str] = set()
    with session_scope(settings) as session:
        for pacc in parsed:
            found = _find_or_register(deps, session, user_pk, powens_user_id, pacc)
            if found is None:
                yield Applied(PushOutcome.UNKNOWN_ACCOUNT)
                continue
            account, connection, new = found
            if new:
                registered.add(account.id)
            where = Where(account.tenant_id, account.id, connection.id, connection.external_id)
            verdict = judge(
                pacc, where, at=received_at, state=state, pushed=True, said_at=_said(pacc, received_at)
            )
            subject = Subject(account.tenant_id, account.id, POWENS_PUSH.name, Trigger.WEBHOOK)
            key = push_key(powens_user_id, pacc, state)
            entries.append(write.Entry(subject, verdict, Attempt(task_id=key), 1, received_at))
        keys = [e.attempt.task_id for e in entries]
        seen = set(session.scalars(select(RefreshAttempt.task_id).where(RefreshAttempt.task_id.in_(keys))))
    duplicates = [e for e in entries if e.attempt.task_id in seen]
    for e in duplicates:
        yield Applied(PushOutcome.DUPLICATE, e.subject.account_id)
    fresh = [e for e in entries if e.attempt.task_id not in seen]
    if not fresh and (conn is None or duplicates):
        return  # nothing new (a redelivery): the first delivery wrote the connection's fields too

    def connection_fields(session: Session) -> None:
        if conn is not None:
            _update_connection(session, user_pk, conn, received_at)

    applied = write.record(settings, fresh, deps.clock, with_news=connection_fields)
    for done in applied.recorded:
        account_id = done.entry.subject.account_id
        if done.status == "superseded":
            why = {"deleted": PushOutcome.DELETED, "unlinked": PushOutcome.UNKNOWN_USER}
            yield Applied(why.get(done.superseded or "", PushOutcome.OUT_OF_ORDER), account_id)
        elif done.status != "recorded":
            yield Applied(PushOutcome.DUPLICATE, account_id)
        elif done.error is None:
            yield Applied(
                PushOutcome.REGISTERED if account_id in registered else PushOutcome.STORED, account_id
            )
        elif done.error.reason is Reason.NEEDS_USER_ACTION:
            yield Applied(PushOutcome.NEEDS_USER, account_id)
        else:
            yield Applied(PushOutcome.FAILED, account_id)


def _said(pacc: PowensAccount, received_at: datetime) -> datetime:
    """When a push's status word held: the time Powens says the account was disabled or deleted when
    it says so (a late re-send of an old ACCOUNT_DISABLED is then older than a later enable), else
    when the push arrived (ACCOUNT_ENABLED carries no time of its own). Never later than arrival."""
    said = pacc.deleted or pacc.disabled
    # Powens' times are whole seconds: the word held by the end of its second, at the latest.
    return min(said + timedelta(seconds=1), received_at) if said is not None else received_at


def _find_or_register(
    deps: Deps, session: Session, user_pk: int, powens_user_id: int, pacc: PowensAccount
) -> tuple[Any, Any, bool] | None:
    found = external.account(session, user_pk, pacc.id)
    if found is not None:
        return found[0], found[1], False
    # Powens found an account we had not registered: registered now, in the tenant that linked this
    # Powens user (the one registration path), so pushes keep discovery going too.
    register_accounts(session, user_pk, [], [pacc], deps.clock(), update_existing=False)
    session.flush()
    found = external.account(session, user_pk, pacc.id)
    if found is None:
        return None
    log.info("Powens push: account %s of Powens user %s registered", pacc.id, powens_user_id)
    return found[0], found[1], True


def _update_connection(session: Session, user_pk: int, conn: PowensConnection, now: datetime) -> None:
    """The connection's own fields, when this sync is not older than the one held (its state is the
    write path's, with the accounts')."""
    row = external.connection(session, user_pk, conn.id)
    if row is None:
        return
    if row.last_update is not None and (conn.last_update is None or conn.last_update < row.last_update):
        return  # not newer than the sync the row holds
    row.error_message = conn.error_message
    row.last_update = conn.last_update or row.last_update
    row.next_try = conn.next_try
    if row.active:  # a connection CONNECTION_DELETED deactivated stays so, whatever a late push says
        row.active = conn.active
    if conn.consent_expires_at is not None:
        row.consent_expires_at = conn.consent_expires_at
    row.updated_at = now


def _account_status(deps: Deps, user_pk: int, raw: Any, event: Event, said_at: datetime) -> Applied:
    try:
        pacc = PowensAccount.parse(raw, deps.settings.powens_zone, ENDPOINT)
    except PowensError as err:
        log.warning("Powens push %s: unreadable account: %s", event, err.message)
        return Applied(PushOutcome.INVALID_PAYLOAD)
    word = AccountStatus.DISABLED if event is Event.ACCOUNT_DISABLED else AccountStatus.ACTIVE
    with session_scope(deps.settings) as session:
        found = external.account(session, user_pk, pacc.id)
        if found is None:
            return Applied(PushOutcome.UNKNOWN_ACCOUNT)
        account = session.get(BankAccount, found[0].id, with_for_update=True, populate_existing=True)
        assert account is not None
        if account.status == AccountStatus.DELETED:
            return Applied(PushOutcome.DELETED, account.id)
        if _say(account, word, _said(pacc, said_at) if word is AccountStatus.DISABLED else said_at):
            return Applied(PushOutcome.STATUS_UPDATED, account.id)
        return Applied(PushOutcome.OUT_OF_ORDER, account.id)


def _say(account: BankAccount, word: AccountStatus, said_at: datetime) -> bool:
    """Powens' word on the account's status, by the write path's rule. True when it applied."""
    moved = next_account_status(account.status, account.status_at, word, said_at)
    if moved is None:
        return False
    account.status, account.status_at = moved
    account.updated_at = said_at
    return True


def _connection_deleted(deps: Deps, user_pk: int, external_id: int, said_at: datetime) -> Applied:
    with session_scope(deps.settings) as session:
        row = external.connection(session, user_pk, external_id)
        if row is None:
            return Applied(PushOutcome.UNKNOWN_ACCOUNT)
        # The accounts first, then their connection: the lock order of every writer (app.refresh.write).
        accounts = session.scalars(
            select(BankAccount)
            .where(BankAccount.connection_id == row.id)
            .order_by(BankAccount.id)
            .with_for_update()
        )
        for account in accounts:
            _say(account, AccountStatus.DELETED, said_at)
        session.flush()
        row = external.connection(session, user_pk, external_id)
        assert row is not None
        row.active = False
        row.updated_at = said_at
    return Applied(PushOutcome.STATUS_UPDATED)
