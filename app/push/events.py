"""The Powens events the service acts on, and what of them goes onto the broker.

Powens posts each event type to the URL registered for it, so the receiver takes the type from the
path it was posted to (``/webhooks/powens/CONNECTION_SYNCED``): the path is part of the signed bytes,
so the type is authenticated with the body. A push to the bare ``/webhooks/powens`` has its type read
from the body's shape, which is unambiguous for what we act on (a ``connection`` with ``accounts``, or a
bank account object).

Before it is queued an event is reduced to what a refresh reads (``app.powens.models.READ_FIELDS``):
no IBAN, account number, BIC or transactions ever reach the broker, and a body of several megabytes
(transactions) becomes a message of a few hundred bytes per account. Pure functions, no I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from app.powens.models import essential


class Event(StrEnum):
    CONNECTION_SYNCED = "CONNECTION_SYNCED"  # a connection and its accounts, as just synced
    ACCOUNT_SYNCED = "ACCOUNT_SYNCED"  # one account, as just synced
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"
    ACCOUNT_ENABLED = "ACCOUNT_ENABLED"
    CONNECTION_DELETED = "CONNECTION_DELETED"


ACCOUNT_EVENTS = frozenset({Event.ACCOUNT_SYNCED, Event.ACCOUNT_DISABLED, Event.ACCOUNT_ENABLED})
CONNECTION_FIELDS = (
    "id",
    "id_user",
    "id_connector",
    "state",
    "error",
    "error_message",
    "last_update",
    "next_try",
    "active",
    "expire",
)
MAX_ACCOUNTS = 1000  # per event: a connection never holds more; beyond, the payload is wrong


class PayloadError(ValueError):
    """A signed body that is not the event it claims to be. The message names what is wrong."""


def named(name: str) -> Event | None:
    """``CONNECTION_SYNCED``, ``connection_synced`` or ``connection-synced``; None when unknown."""
    key = name.strip().upper().replace("-", "_")
    return Event(key) if key in Event.__members__ else None


def infer(body: Any) -> Event | None:
    """The event a body posted to the bare path is (None: not one we act on)."""
    if not isinstance(body, dict):
        return None
    connection = body.get("connection")
    if isinstance(connection, dict) and isinstance(connection.get("accounts"), list):
        return Event.CONNECTION_SYNCED
    if "id" in body and "id_connection" in body:
        return Event.ACCOUNT_DISABLED if body.get("disabled") else Event.ACCOUNT_SYNCED
    return None


def _id(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PayloadError(f"{what} is missing or not an integer id")
    try:
        number = int(value)
    except ValueError:
        raise PayloadError(f"{what} is not an integer id") from None
    if not 0 < number < 2**63:
        raise PayloadError(f"{what} is out of range for an id")
    return number


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{what} is missing or not an object")
    return value


def _connection(raw: dict[str, Any]) -> dict[str, Any]:
    kept = {k: raw[k] for k in CONNECTION_FIELDS if k in raw}
    sources = raw.get("sources")
    if isinstance(sources, list):
        kept["sources"] = [
            {"access_expire": s.get("access_expire")} for s in sources[:50] if isinstance(s, dict)
        ]
    return kept


def reduce(event: Event, body: Any) -> dict[str, Any]:
    """The event as queued: ``{"event", "user", "connection", "accounts"}`` (ids as integers)."""
    body = _object(body, "the body")
    if event is Event.CONNECTION_SYNCED:
        user = _id(_object(body.get("user"), "user").get("id"), "user.id")
        conn = _object(body.get("connection"), "connection")
        accounts = conn.get("accounts")
        if not isinstance(accounts, list):
            raise PayloadError("connection.accounts is missing or not a list")
        if len(accounts) > MAX_ACCOUNTS:
            raise PayloadError(f"connection.accounts has more than {MAX_ACCOUNTS} accounts")
        _id(conn.get("id"), "connection.id")
        return {
            "event": event.value,
            "user": user,
            "connection": _connection(conn),
            "accounts": [essential(a) for a in accounts],
        }
    if event in ACCOUNT_EVENTS:
        _id(body.get("id"), "id")
        return {
            "event": event.value,
            "user": _id(body.get("id_user"), "id_user"),
            "connection": {"id": _id(body.get("id_connection"), "id_connection")},
            "accounts": [essential(body)],
        }
    assert event is Event.CONNECTION_DELETED
    conn = body.get("connection") if isinstance(body.get("connection"), dict) else body
    user_raw = body.get("user")
    user_id = user_raw.get("id") if isinstance(user_raw, dict) else conn.get("id_user")
    return {
        "event": event.value,
        "user": _id(user_id, "id_user"),
        "connection": {"id": _id(conn.get("id"), "connection id")},
        "accounts": [],
    }
