"""The command handler of ``openbanking.balances.refresh`` v1.0.0. Plain functions, no Celery inside.

``refresh_balances`` runs one attempt. A retryable failure on a non-final attempt raises
``RetryLater`` and records nothing terminal; every terminal outcome (success, failure, denial) writes
exactly one audit row, one telemetry event and one counter increment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.exc import IntegrityError

from app import metrics, pipeline, telemetry
from app.config import Settings, get_settings
from app.contract import (
    REFRESH_OPERATION,
    AccountBalanceRecord,
    OpenBankingRefreshBalancesInput,
    OpenBankingRefreshBalancesOutput,
    TelemetryEvents,
    parse_input,
)
from app.coordination import Coordinator, Throttled, get_coordinator, throttle
from app.errors import NotFound, Reason, RefreshError
from app.policy import BUILTIN_ACTORS, Actor, authorize
from app.powens.client import EP_ACCOUNTS, PowensClient, get_client
from app.powens.errors import PowensError, classify_state, is_transient_state
from app.powens.models import PowensAccount
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, BankAccount, BankConnection
from app.store.registry import register_new_accounts
from app.store.secrets import TokenCipher

log = logging.getLogger(__name__)


class Trigger(StrEnum):
    SCHEDULED = "scheduled"
    ON_DEMAND = "on_demand"


@dataclass(frozen=True)
class Attempt:
    """Where this call stands in the task's retry sequence."""

    number: int = 1
    max_attempts: int = 1
    task_id: str | None = None
    run_id: str | None = None

    @property
    def final(self) -> bool:
        return self.number >= self.max_attempts


class RetryLater(Exception):
    """A retryable failure on a non-final attempt: the caller schedules the next attempt."""

    def __init__(self, error: RefreshError) -> None:
        super().__init__(error.message)
        self.error = error


class Replayed(Exception):
    """The task already reached a terminal outcome (redelivery): nothing is written again."""


class Deps:
    """What a refresh needs from outside: settings, the Powens client, a clock, the coordinator.

    The client is built on first use, so paths that never call Powens (input and policy checks,
    replays) work without Powens configuration.
    """

    def __init__(
        self,
        settings: Settings,
        client: PowensClient | None = None,
        clock: Callable[[], datetime] | None = None,
        coord: Coordinator | None = None,
    ) -> None:
        self.settings = settings
        self._client = client
        self.clock = clock or (lambda: datetime.now(UTC))
        self._coord = coord

    @classmethod
    def default(cls, settings: Settings | None = None, client: PowensClient | None = None) -> Deps:
        return cls(settings or get_settings(), client)

    @property
    def coord(self) -> Coordinator:
        if self._coord is None:
            self._coord = get_coordinator(self.settings)
        return self._coord

    @property
    def client(self) -> PowensClient:
        if self._client is None:
            s = self.settings
            client = get_client(s)
            if s.powens_rate_limit > 0:
                coord = self.coord
                # Every Powens call of this process passes the cluster-wide limiter first.
                client.before_request = lambda _endpoint: throttle(coord, s.rate_limit_max_wait)
            else:
                client.before_request = None
            self._client = client
        return self._client


def resolve_actor(actor: Actor | str, settings: Settings) -> Actor:
    if isinstance(actor, Actor):
        return actor
    if actor in BUILTIN_ACTORS:
        return BUILTIN_ACTORS[actor]
    with session_scope(settings) as session:
        return Actor(actor, repo.actor_roles(session, actor))


def reconnect_url(settings: Settings, connection_external_id: int) -> str:
    params: dict[str, Any] = {}
    if settings.powens_domain:
        params["domain"] = f"{settings.powens_domain}.biapi.pro"
    if settings.powens_client_id:
        params["client_id"] = settings.powens_client_id
    params["connection_id"] = connection_external_id
    return f"https://webview.powens.com/{settings.powens_webview_lang}/reconnect?{urlencode(params)}"


def check_policy(
    raw_input: Any, actor: Actor | str, trigger: Trigger, *, deps: Deps | None = None
) -> tuple[OpenBankingRefreshBalancesInput, Actor]:
    """Validate and authorize before dispatch. A refusal is terminal: it is recorded, then raised."""
    deps = deps or Deps.default()
    started = deps.clock()
    try:
        inp = parse_input(raw_input)
        who = resolve_actor(actor, deps.settings)
        authorize(REFRESH_OPERATION, who)
        return inp, who
    except RefreshError as err:
        _record_failure(deps, raw_input, actor, trigger, err, Attempt(), started, attempts=0)
        raise


def refresh_balances(
    raw_input: Any,
    actor: Actor | str,
    trigger: Trigger | str,
    *,
    attempt: Attempt | None = None,
    deps: Deps | None = None,
) -> OpenBankingRefreshBalancesOutput:
    attempt = attempt or Attempt()
    deps = deps or Deps.default()
    trigger = Trigger(trigger)
    started = deps.clock()
    t0 = time.perf_counter()
    if attempt.task_id is not None:
        replay = outcome_for_task(deps.settings, attempt.task_id, raw_input)
        if replay is not None:
            return replay
    try:
        try:
            inp = parse_input(raw_input)
            who = resolve_actor(actor, deps.settings)
            authorize(REFRESH_OPERATION, who)
            output, request_id = _refresh(inp, who, trigger, attempt, deps)
        except (RefreshError, _Duplicate, Throttled):
            raise
        except Exception as exc:  # a bug: classified once, here
            log.exception("refresh failed with an unexpected error")
            raise RefreshError(Reason.INTERNAL, f"internal error ({type(exc).__name__})") from exc
    except RefreshError as err:
        metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=trigger.value).observe(
            time.perf_counter() - t0
        )
        if err.retryable and not attempt.final:
            metrics.RETRIES.labels(provider=metrics.PROVIDER, reason=err.reason.value).inc()
            raise RetryLater(err) from None
        _record_failure(deps, raw_input, actor, trigger, err, attempt, started, attempts=attempt.number)
        raise
    except _Duplicate:
        replay = outcome_for_task(deps.settings, attempt.task_id or "", raw_input)
        if replay is None:  # pragma: no cover - the unique row we collided with must exist
            raise
        return replay

    metrics.DURATION.labels(provider=metrics.PROVIDER, trigger=trigger.value).observe(
        time.perf_counter() - t0
    )
    metrics.REFRESHED.labels(provider=metrics.PROVIDER, trigger=trigger.value).inc()
    metrics.LAST_SUCCESS.labels(provider=metrics.PROVIDER).set(output.refreshedAt.timestamp())
    telemetry.emit(
        TelemetryEvents.BALANCES_REFRESHED,
        {
            "tenantId": inp.tenantId,
            "accountId": inp.accountId,
            "refreshedAt": output.refreshedAt,
            "balanceCount": len(output.balances),
        },
        operation=REFRESH_OPERATION.qualified_name,
        trigger=trigger.value,
        actor=who.name,
        taskId=attempt.task_id,
        runId=attempt.run_id,
        attempts=attempt.number,
        powensRequestId=request_id,
    )
    return output


class _Duplicate(Exception):
    """Another delivery of the same task committed first."""


def _refresh(
    inp: OpenBankingRefreshBalancesInput,
    actor: Actor,
    trigger: Trigger,
    attempt: Attempt,
    deps: Deps,
) -> tuple[OpenBankingRefreshBalancesOutput, str | None]:
    settings = deps.settings
    errors: list[str] = []
    started = deps.clock()
    # Single flight per account: a concurrent refresh of the same account (on-demand and scheduled at
    # once) waits here, then takes the fresh result instead of reading Powens again.
    with deps.coord.account_lock(
        inp.accountId, ttl=settings.powens_call_budget, wait=settings.lock_wait_seconds
    ):
        with session_scope(settings) as session:
            ctx = repo.find_account(session, inp.tenantId, inp.accountId)
            if ctx is None:
                raise NotFound(f"account {inp.accountId!r} not found for tenant {inp.tenantId!r}")
            if inp.connectionId is not None and inp.connectionId != ctx.connection.id:
                raise NotFound(f"account {inp.accountId!r} not found in connection {inp.connectionId!r}")
            if ctx.account.status == "deleted":
                raise NotFound(f"account {inp.accountId!r} was deleted at Powens")
            token = TokenCipher.from_settings(settings).decrypt(ctx.user.token_encrypted)
            powens_user_id = ctx.user.powens_user_id
            user_pk = ctx.user.id
            account_external_id = ctx.account.external_id
            connection_id = ctx.connection.id
            connection_external_id = ctx.connection.external_id
            last = ctx.account.last_refreshed_at
            fresh = last is not None and last >= started
        if fresh:
            errors.append("coalesced with a concurrent refresh of this account; its result is returned")
            return _store(deps, inp, actor, trigger, attempt, None, [], errors, None, started)

        if inp.forceRefresh:
            errors.extend(
                _force_sync(deps, actor, token, powens_user_id, connection_id, connection_external_id)
            )
        if attempt.run_id is not None and not inp.forceRefresh:
            pacc, request_id = _shared_read(
                deps, attempt.run_id, user_pk, powens_user_id, token, account_external_id
            )
        else:
            answer = deps.client.get_account(token, powens_user_id, account_external_id)
            pacc, request_id = answer.value, answer.request_id
        if pacc is None or pacc.deleted is not None:
            raise NotFound(f"account {inp.accountId!r} was deleted at Powens")
        if pacc.disabled is not None:
            raise NotFound(f"account {inp.accountId!r} is disabled at Powens (not synced)")
        if classify_state(pacc.error) is Reason.NEEDS_USER_ACTION:
            _record_connection_state(settings, connection_id, pacc.error, deps.clock())
            raise PowensError(
                Reason.NEEDS_USER_ACTION,
                f"connection {connection_external_id} needs the user (state {pacc.error}); "
                f"reconnect at {reconnect_url(settings, connection_external_id)}",
                request_id=request_id,
            )
        if is_transient_state(pacc.error):
            errors.append(
                f"connection state {pacc.error}: Powens will retry; "
                "balances are from its last successful sync"
            )

        refreshed_at = deps.clock()
        drafts = map_balances(pacc, refreshed_at)
        wanted = inp.balanceTypes
        if wanted:
            for missing in [t for t in wanted if t not in {d.balance_type for d in drafts}]:
                errors.append(f"balance type {missing!r} is not provided by Powens for this account")
            drafts = [d for d in drafts if d.balance_type in wanted]
        if pacc.last_update is None:
            errors.append("Powens reports no successful bank sync yet; lastUpdatedAt is the refresh time")
        return _store(deps, inp, actor, trigger, attempt, pacc, drafts, errors, request_id, refreshed_at)


def _store(
    deps: Deps,
    inp: OpenBankingRefreshBalancesInput,
    actor: Actor,
    trigger: Trigger,
    attempt: Attempt,
    pacc: PowensAccount | None,
    drafts: list[repo.BalanceDraft],
    errors: list[str],
    request_id: str | None,
    refreshed_at: datetime,
) -> tuple[OpenBankingRefreshBalancesOutput, str | None]:
    """The one success transaction: records, snapshot, account and connection state, audit, run item."""
    settings = deps.settings
    day = refreshed_at.astimezone(settings.business_zone).date()
    try:
        with session_scope(settings) as session:
            account = session.get(BankAccount, inp.accountId, with_for_update=True)
            assert account is not None
            if pacc is not None:
                repo.upsert_balances(session, account, drafts, refreshed_at=refreshed_at, day=day)
                _update_account(account, pacc, refreshed_at)
                conn = session.get(BankConnection, account.connection_id)
                if conn is not None and conn.state != (pacc.error or None):
                    conn.state = pacc.error or None
                    conn.updated_at = refreshed_at
                types = [d.balance_type for d in drafts]
            else:
                types = list(inp.balanceTypes or [])
            stored = repo.latest_balances(session, inp.tenantId, inp.accountId, types or None)
            for row, draft in ((r, d) for r in stored for d in drafts if d.balance_type == r.balance_type):
                if row.last_updated_at > draft.last_updated_at:
                    errors.append(
                        f"Powens returned {draft.balance_type} data older than the stored record; kept it"
                    )
            records = [to_record(r) for r in stored]
            output = OpenBankingRefreshBalancesOutput(
                balances=records, refreshedAt=refreshed_at, errors=errors or None
            )
            repo.add_attempt(
                session,
                task_id=attempt.task_id,
                run_id=attempt.run_id,
                operation=REFRESH_OPERATION.qualified_name,
                tenant_id=inp.tenantId,
                account_id=inp.accountId,
                actor=actor.name,
                trigger=trigger.value,
                outcome="succeeded",
                attempts=attempt.number,
                balance_count=len(records),
                force_refresh=bool(inp.forceRefresh),
                powens_request_id=request_id,
                errors=errors or None,
                started_at=refreshed_at,
                finished_at=deps.clock(),
            )
            if attempt.run_id is not None:
                pipeline.record_item(session, attempt.run_id, inp.accountId, "succeeded", None)
    except IntegrityError:
        if attempt.task_id is not None:
            raise _Duplicate() from None
        raise
    return output, request_id


def _shared_read(
    deps: Deps, run_id: str, user_pk: int, powens_user_id: int, token: str, account_external_id: int
) -> tuple[PowensAccount | None, str | None]:
    """All accounts of one Powens user, read once per run and shared by its accounts' tasks."""
    settings = deps.settings

    def fetch() -> dict[str, Any]:
        raw, rid = deps.client.list_accounts_raw(token, powens_user_id)
        parsed = [PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS) for item in raw]
        # New accounts found at Powens during the run are registered (refreshed from the next run).
        register_new_accounts(settings, user_pk, parsed, deps.clock())
        return {"accounts": raw, "request_id": rid}

    shared = deps.coord.shared(
        f"accounts:{run_id}:{powens_user_id}",
        fetch,
        ttl=settings.shared_read_ttl,
        wait=settings.powens_call_budget,
    )
    for item in shared["accounts"]:
        if isinstance(item, dict) and str(item.get("id")) == str(account_external_id):
            return PowensAccount.parse(item, settings.powens_zone, EP_ACCOUNTS), shared.get("request_id")
    return None, shared.get("request_id")


def map_balances(pacc: PowensAccount, refreshed_at: datetime) -> list[repo.BalanceDraft]:
    """Powens ``balance``/``coming`` to canonical types (DESIGN.md "The command", step 3)."""
    last = pacc.last_update or refreshed_at
    meta = {
        "provider": "powens",
        "powensAccountId": pacc.id,
        "powensConnectionId": pacc.id_connection,
        "powensAccountType": pacc.type,
    }
    if pacc.id_user is not None:
        meta["powensUserId"] = pacc.id_user
    drafts = [
        repo.BalanceDraft(
            balance_type="current",
            current_balance=pacc.balance,
            available_balance=(pacc.balance + pacc.coming) if pacc.coming is not None else None,
            currency=pacc.currency,
            last_updated_at=last,
            metadata={**meta, "source": "balance"},
        )
    ]
    if pacc.coming is not None:
        drafts.append(
            repo.BalanceDraft(
                balance_type="uncleared",
                current_balance=pacc.coming,
                available_balance=None,
                currency=pacc.currency,
                last_updated_at=last,
                metadata={**meta, "source": "coming"},
            )
        )
    return drafts


def to_record(row: AccountBalance) -> AccountBalanceRecord:
    return AccountBalanceRecord(
        id=row.id,
        accountId=row.account_id,
        tenantId=row.tenant_id,
        connectionId=row.connection_id,
        balanceType=row.balance_type,
        currentBalance=row.current_balance,
        availableBalance=row.available_balance,
        currency=row.currency,
        lastUpdatedAt=row.last_updated_at,
        createdAt=row.created_at,
        metadata=row.metadata_,
    )


def _update_account(account: BankAccount, pacc: PowensAccount, now: datetime) -> None:
    account.name = pacc.name
    account.currency = pacc.currency
    account.balance = pacc.balance
    account.coming = pacc.coming
    if account.powens_last_update is None or (
        pacc.last_update is not None and pacc.last_update >= account.powens_last_update
    ):
        account.powens_last_update = pacc.last_update
    account.last_refreshed_at = now
    account.updated_at = now


def _record_connection_state(
    settings: Settings, connection_id: str, state: str | None, now: datetime
) -> None:
    """Keep the connection's state current even when the refresh fails (summaries list it)."""
    with session_scope(settings) as session:
        conn = session.get(BankConnection, connection_id)
        if conn is not None:
            conn.state = state
            conn.updated_at = now


def _force_sync(
    deps: Deps, actor: Actor, token: str, powens_user_id: int, connection_id: str, connection_external_id: int
) -> list[str]:
    """Force a bank sync within the PSD2 quota; past it, say so and read what Powens has."""
    settings = deps.settings
    now = deps.clock()
    with session_scope(settings) as session:
        # Row lock: two workers forcing the same connection cannot both take the last slot.
        repo.lock_connection(session, connection_id)
        used = repo.forced_syncs_since(session, connection_id, now - timedelta(hours=24))
        if used >= settings.force_sync_quota:
            return [
                f"forced sync skipped: quota of {settings.force_sync_quota} background syncs per 24 h "
                f"reached for connection {connection_external_id}; read the last synced data"
            ]
        repo.record_forced_sync(session, connection_id, now, actor.name)
    try:
        answer = deps.client.sync_connection(token, powens_user_id, connection_external_id)
    except PowensError as err:
        if err.status == 409:
            return ["forced sync not started: a sync of this connection is already running"]
        raise
    conn = answer.value
    _record_connection_state(settings, connection_id, conn.state, deps.clock())
    if classify_state(conn.state) is Reason.NEEDS_USER_ACTION:
        raise PowensError(
            Reason.NEEDS_USER_ACTION,
            f"connection {connection_external_id} needs the user (state {conn.state}); "
            f"reconnect at {reconnect_url(settings, connection_external_id)}",
            request_id=answer.request_id,
        )
    return []


def outcome_for_task(
    settings: Settings, task_id: str, raw_input: Any
) -> OpenBankingRefreshBalancesOutput | None:
    """The stored terminal outcome of a task: its output, its failure raised, or None (not yet).

    A redelivered task gets its outcome again this way and writes nothing; the CLI waits on it, so
    correctness never depends on a Celery result backend.
    """
    with session_scope(settings) as session:
        row = repo.attempt_for_task(session, task_id)
        if row is None:
            return None
        if row.outcome != "succeeded":
            raise RefreshError(Reason(row.reason or "internal"), row.message or "failed")
        stored = repo.latest_balances(session, row.tenant_id or "", row.account_id)
        wanted = raw_input.get("balanceTypes") if isinstance(raw_input, dict) else None
        records = [to_record(r) for r in stored if not wanted or r.balance_type in wanted]
        return OpenBankingRefreshBalancesOutput(
            balances=records, refreshedAt=row.started_at, errors=row.errors or None
        )


def _record_failure(
    deps: Deps,
    raw_input: Any,
    actor: Actor | str,
    trigger: Trigger,
    err: RefreshError,
    attempt: Attempt,
    started: datetime,
    *,
    attempts: int,
) -> None:
    """The terminal failure: its audit row, one telemetry event, one counter increment."""
    tenant_id = account_id = None
    force = False
    if isinstance(raw_input, OpenBankingRefreshBalancesInput):
        raw_input = raw_input.model_dump()
    if isinstance(raw_input, dict):
        tenant_id = _clip(raw_input.get("tenantId"))
        account_id = _clip(raw_input.get("accountId"))
        force = bool(raw_input.get("forceRefresh"))
    actor_name = actor.name if isinstance(actor, Actor) else str(actor)[:128]
    try:
        with session_scope(deps.settings) as session:
            repo.add_attempt(
                session,
                task_id=attempt.task_id,
                run_id=attempt.run_id,
                operation=REFRESH_OPERATION.qualified_name,
                tenant_id=tenant_id,
                account_id=account_id,
                actor=actor_name,
                trigger=trigger.value,
                outcome="failed",
                reason=err.reason.value,
                message=err.message,
                attempts=attempts,
                force_refresh=force,
                powens_request_id=err.request_id,
                started_at=started,
                finished_at=deps.clock(),
            )
            if attempt.run_id is not None and account_id is not None:
                pipeline.record_item(session, attempt.run_id, account_id, "failed", err.reason.value)
    except IntegrityError:
        # Another delivery of this task already recorded its terminal outcome.
        log.info("terminal outcome already recorded for task %s", attempt.task_id)
        return
    metrics.REFRESH_FAILED.labels(
        provider=metrics.PROVIDER, trigger=trigger.value, reason=err.reason.value
    ).inc()
    telemetry.emit(
        TelemetryEvents.BALANCES_REFRESH_FAILED,
        {"tenantId": tenant_id, "accountId": account_id, "error": err.message},
        operation=REFRESH_OPERATION.qualified_name,
        trigger=trigger.value,
        actor=actor_name,
        reason=err.reason.value,
        taskId=attempt.task_id,
        runId=attempt.run_id,
        attempts=attempts,
        powensRequestId=err.request_id,
    )


def _clip(value: Any) -> str | None:
    return None if value is None else str(value)[:128]
