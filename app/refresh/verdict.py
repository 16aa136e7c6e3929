"""What Powens' word about one account comes to, as values: the rules of the write path, pure.

``judge`` reads one Powens answer (a read, or a push) and says what it means — a failure (deleted,
disabled, a connection that needs its user) or balance drafts with their notes — without touching
the store. ``settle`` holds that verdict against the account's row as the writing transaction locked
it and decides everything that is written: which records, what the account row and its connection
become, and whether the answer is news at all. ``app.refresh.write`` applies the decision, for one
account or a batch, in the caller's one transaction. Every entry point — the single refresh, the
nightly batch, the push — goes through these two functions, so no rule exists twice.

The rules (docs/design.md "What Powens' word does to the store"):
- a record is never replaced by one with an older ``lastUpdatedAt`` (the upserts' guard,
  ``app.store.writes.keep_newer``); the account row and its connection's state follow the newest
  answer only (``newer``);
- a deleted account stays deleted: nothing of a later answer is written for it (only account
  discovery, listing it again, brings it back); nor for an account whose Powens user was unlinked
  (only linking the user again brings it back);
- a status word (active, disabled, deleted) applies only when it is not older than the one that set
  the current status (``app.store.states.next_account_status``, which account discovery and the
  push's status events use too): a replayed ``ACCOUNT_DISABLED`` cannot undo a later enable;
- a naive Powens time in the repeated autumn hour takes its later reading when the earlier one would
  be older than what is stored and the later one is not after the answer arrived
  (``PowensAccount.last_update_against``, which account discovery uses too);
- a push that brings nothing newer than what is stored, or concerns a deleted account, is
  superseded: nothing is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from app.config import Settings
from app.errors import NotFound, Reason, RefreshError
from app.jsonio import rfc3339
from app.powens.errors import classify_state, is_transient_state
from app.powens.links import needs_user
from app.powens.models import PowensAccount, decimal_places
from app.refresh.records import map_balances
from app.store.repo import BalanceDraft
from app.store.states import AccountStatus, next_account_status
from app.store.writes import Held, Stored


def deleted(account_id: str) -> NotFound:
    return NotFound(f"account {account_id!r} was deleted at Powens")


def disabled(account_id: str) -> NotFound:
    return NotFound(f"account {account_id!r} is disabled at Powens (not synced)")


def unlinked(account_id: str) -> NotFound:
    return NotFound(
        f"account {account_id!r} is out of refreshes: its Powens user was unlinked from the tenant "
        "(link it again with `balances powens link`)"
    )


def pushed_note(pushed_at: datetime) -> str:
    return f"refreshed from a Powens push at {rfc3339(pushed_at)}; not read again"


@dataclass(frozen=True)
class Where:
    """The account and the connection it belongs to (canonical ids, the connection's Powens id)."""

    tenant_id: str
    account_id: str
    connection_id: str
    connection_external_id: int


@dataclass(frozen=True)
class Verdict:
    """Powens' word about one account, judged; or the failure that ended the refresh before any.

    ``at`` is when the answer arrived (a read's answer, a push's arrival): it stamps what the answer
    sets. ``word_at`` orders its status word against others."""

    at: datetime
    error: RefreshError | None = None
    answer: PowensAccount | None = None  # None: no answer of its own (failed early, coalesced, skipped)
    drafts: tuple[BalanceDraft, ...] = ()
    notes: tuple[str, ...] = ()
    request_id: str | None = None
    state: str | None = None  # the connection's state as Powens gave it (None: fine) ...
    state_known: bool = False  # ... when it gave one
    word: AccountStatus | None = None  # what the answer says the account is
    pushed: bool = False  # Powens sent it (a webhook) rather than we read it
    balance_types: tuple[str, ...] | None = None  # only these were asked for: nothing else dropped
    said_at: datetime | None = None  # when Powens' word held (a read's request, a disable): else ``at``

    @property
    def word_at(self) -> datetime:
        """When the answer's status word held: the moment the read was asked for (an answer cannot
        know what happened after), or what the push itself says."""
        return self.said_at or self.at

    @classmethod
    def failed(cls, at: datetime, error: RefreshError, **kw: Any) -> Verdict:
        return cls(at, error=error, request_id=error.request_id, **kw)


def judge(
    answer: PowensAccount,
    where: Where,
    *,
    at: datetime,
    request_id: str | None = None,
    notes: tuple[str, ...] = (),
    state: str | None = None,
    pushed: bool = False,
    balance_types: tuple[str, ...] | None = None,
    said_at: datetime | None = None,
) -> Verdict:
    """Powens' answer about the account, checked as every path checks it. ``state`` is the
    connection's state when Powens gave it apart from the account (a push); else the account's
    own ``error``."""
    state = state if state is not None else answer.error
    common: dict[str, Any] = {
        "answer": answer,
        "request_id": request_id,
        "pushed": pushed,
        "said_at": said_at,
    }
    if answer.deleted is not None:
        return Verdict(at, error=deleted(where.account_id), word=AccountStatus.DELETED, **common)
    if answer.disabled is not None:
        return Verdict(at, error=disabled(where.account_id), word=AccountStatus.DISABLED, **common)
    stuck = connection_needs_user(
        where, state, at=at, request_id=request_id, answer=answer, pushed=pushed, said_at=said_at
    )
    if stuck is not None:
        return stuck
    found = list(notes)
    if is_transient_state(state):
        found.append(
            f"connection state {state}: Powens will retry; balances are from its last successful sync"
        )
    drafts = _drafts(answer, at, balance_types, found)
    return Verdict(
        at,
        drafts=tuple(drafts),
        notes=tuple(found),
        state=state or None,
        state_known=True,
        word=AccountStatus.ACTIVE,
        balance_types=balance_types,
        **common,
    )


def connection_needs_user(
    where: Where, state: str | None, *, at: datetime, request_id: str | None = None, **kw: Any
) -> Verdict | None:
    """The failure of a connection whose state (an account's ``error``, a forced sync's answer, a
    push) needs its user, with that state to record; None when the state lets data be used."""
    if classify_state(state) is not Reason.NEEDS_USER_ACTION:
        return None
    error = needs_user(where.tenant_id, where.connection_id, where.connection_external_id, state, request_id)
    return Verdict(at, error=error, request_id=request_id, state=state, state_known=True, **kw)


def _drafts(
    answer: PowensAccount, at: datetime, wanted: tuple[str, ...] | None, notes: list[str]
) -> list[BalanceDraft]:
    if answer.balance is None or answer.currency is None:
        # Powens (its OpenAPI) may have no balance or currency yet: the bank has not reported. That is
        # "no balance yet", kept visible as such; the stored records, if any, stay as they are.
        notes.append("no balance yet: Powens has no balance for this account (the bank has not reported)")
        return []
    drafts = map_balances(answer, at)
    if wanted:
        for missing in [t for t in wanted if t not in {d.balance_type for d in drafts}]:
            notes.append(f"balance type {missing!r} is not provided by Powens for this account")
        drafts = [d for d in drafts if d.balance_type in wanted]
    if answer.last_update is None:
        notes.append("Powens reports no successful bank sync yet; lastUpdatedAt is the refresh time")
    if answer.currency_precision is not None and any(
        decimal_places(d.current_balance) > answer.currency_precision for d in drafts
    ):
        notes.append(
            f"an amount has more decimal places than {answer.currency}'s precision "
            f"({answer.currency_precision}); kept exactly as Powens sent it"
        )
    return drafts


# -- settling a verdict against the stored row ---------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What the writing transaction does for one verdict, decided against the locked account row."""

    error: RefreshError | None = None  # the outcome's failure (a success may become one: deleted)
    connection_id: str | None = None  # the account's connection (its records name it)
    drafts: tuple[BalanceDraft, ...] = ()  # latest records to upsert (times resolved)
    drop_unsent: bool = False  # types Powens no longer sends leave the canonical view
    account: dict[str, Any] | None = None  # the account row's new values, or None: unchanged
    connection_state: tuple[str, str | None] | None = None  # (connection id, state) to record
    superseded: Literal["older", "deleted", "unlinked"] | None = None  # a push with nothing to add


def newer(answer: PowensAccount | None, held: Held, at: datetime) -> bool:
    """Whether the answer is news for the account row (``PowensAccount.is_news_against``)."""
    return answer is not None and answer.is_news_against(held.powens_last_update, at)


def settle(verdict: Verdict, held: Held | None, account_id: str | None) -> Change:
    """Decide every write of one verdict against the account row as locked by the transaction."""
    error = verdict.error
    if held is None:
        # Never registered, another tenant's, or removed meanwhile: only the outcome is recorded.
        return Change(error=error or NotFound(f"account {account_id!r} not found"))
    if held.status == AccountStatus.DELETED:
        # Deleted while Powens answered (a push, a 404 of another refresh): it stays deleted. A push
        # for it is not news at all (a late event after CONNECTION_DELETED).
        return Change(superseded="deleted") if verdict.pushed else Change(error=error or deleted(held.id))
    if held.status == AccountStatus.UNLINKED:
        # Its Powens user was unlinked while Powens answered: nothing of the answer is ours to keep.
        return Change(superseded="unlinked") if verdict.pushed else Change(error=error or unlinked(held.id))
    answer = verdict.answer
    is_newer = newer(answer, held, verdict.at)
    if verdict.pushed and answer is not None and not is_newer and verdict.word is AccountStatus.ACTIVE:
        # A push with nothing newer than what is held. (One saying the account is disabled or
        # deleted is a status word: ordered by when it was said, not by the last sync.)
        return Change(superseded="older")
    at = verdict.at
    values: dict[str, Any] = {}
    moved = next_account_status(held.status, held.status_at, verdict.word, verdict.word_at)
    if moved is not None:
        values["status"], values["status_at"] = moved
    drafts: tuple[BalanceDraft, ...] = ()
    if error is None and answer is not None:
        values["last_refreshed_at"] = at
        last = answer.last_update_against(held.powens_last_update, at)
        drafts = verdict.drafts
        if last is not None and last != answer.last_update:
            drafts = tuple(
                replace(d, last_updated_at=last) if d.last_updated_at == answer.last_update else d
                for d in drafts
            )
        if is_newer:
            values["name"] = answer.name
            if answer.balance is not None and answer.currency is not None:  # no balance yet: keep
                values["currency"], values["balance"], values["coming"] = (
                    answer.currency,
                    answer.balance,
                    answer.coming,
                )
            if last is not None:
                values["powens_last_update"] = last
            if verdict.pushed and drafts:
                values["pushed_at"] = at
    account = None
    if values:
        values["updated_at"] = at
        account = {**held._asdict(), **values}
    state = None
    if verdict.state_known and (answer is None or is_newer):
        state = (held.connection_id, verdict.state)
    return Change(
        error=error,
        connection_id=held.connection_id,
        drafts=drafts,
        drop_unsent=bool(drafts) and not verdict.balance_types,
        account=account,
        connection_state=state,
    )


# -- what an outcome shows -----------------------------------------------------------------------------


def shown_types(verdict: Verdict) -> tuple[str, ...] | None:
    """The balance types an outcome shows: those the answer sent, else those asked for, else all."""
    sent = tuple(d.balance_type for d in verdict.drafts)
    return sent or verdict.balance_types or None


def unsent(change: Change, stored: list[Stored]) -> list[Stored]:
    """The latest records that leave the canonical view: of a type the answer no longer sends
    (``coming`` gone: no ``uncleared``), unless what is stored is newer than the answer. Only when
    the answer was for every type (``Change.drop_unsent``). History (snapshots) stays."""
    if not change.drop_unsent or not change.drafts:
        return []
    sent = {d.balance_type for d in change.drafts}
    answered = max(d.last_updated_at for d in change.drafts)
    return [r for r in stored if r.balance_type not in sent and r.last_updated_at <= answered]


def older_notes(drafts: tuple[BalanceDraft, ...], stored: dict[str, datetime]) -> list[str]:
    """A note for every type whose stored record is newer than the answer (kept: never older)."""
    return [
        f"Powens returned {d.balance_type} data older than the stored record; kept it"
        for d in drafts
        if d.balance_type in stored and stored[d.balance_type] > d.last_updated_at
    ]


def pushed_recently(
    settings: Settings, pushed_at: datetime | None, connection_state: str | None, now: datetime
) -> datetime | None:
    """When a push stored this account's balances recently enough that a nightly run need not read
    it. Not when the connection's state, as a later push or refresh left it, needs the user: the run
    reads, and records that failure."""
    if pushed_at is None or classify_state(connection_state) is Reason.NEEDS_USER_ACTION:
        return None
    window = settings.push_freshness_seconds
    return pushed_at if window > 0 and (now - pushed_at).total_seconds() <= window else None
