"""Powens payloads as typed values: the subset of fields we use, validated at the boundary.

Anything missing, mistyped or unknown (a currency outside ISO 4217, an absurd amount) raises
``invalid_response``. What Powens' OpenAPI marks nullable (``balance``, ``coming``, ``currency``,
``last_update``) may be null: a bank that has not reported yet is "no balance yet", not an error.
Naive Powens datetimes are read in the Powens zone and returned in UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

from app.contract import ISO_4217
from app.errors import Reason
from app.powens.errors import PowensError

POWENS_DATETIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def invalid(what: str, endpoint: str) -> PowensError:
    return PowensError(Reason.INVALID_RESPONSE, f"Powens {endpoint} sent an invalid payload: {what}")


def parse_powens_datetime(value: Any, zone: ZoneInfo, *, field: str, endpoint: str) -> datetime | None:
    return powens_datetime_readings(value, zone, field=field, endpoint=endpoint)[0]


def powens_datetime_readings(
    value: Any, zone: ZoneInfo, *, field: str, endpoint: str
) -> tuple[datetime | None, datetime | None]:
    """A Powens datetime in UTC, and its second reading when it is a naive wall time the zone shows
    twice (the repeated hour of the autumn change): which one Powens meant is decided against what is
    stored (``PowensAccount.last_update_against``). The second is None for every other time."""
    if value is None or value == "":
        return None, None
    if not isinstance(value, str):
        raise invalid(f"{field} is not a datetime string", endpoint)
    text = value.strip()
    # Powens sometimes adds fractional seconds or an offset: let fromisoformat handle those.
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        parsed = None
        for fmt in POWENS_DATETIME_FORMATS:
            try:
                parsed = datetime.strptime(text, fmt)  # noqa: DTZ007 - naive by Powens' contract
                break
            except ValueError:
                continue
    if parsed is None:
        raise invalid(f"{field} {text[:40]!r} is not a datetime", endpoint)
    naive = parsed.tzinfo is None
    if naive:
        parsed = parsed.replace(tzinfo=zone)
    try:
        first = parsed.astimezone(UTC)
        later = parsed.replace(fold=1).astimezone(UTC) if naive else first
        return first, later if later > first else None  # shown twice (not a spring gap's time)
    except (OverflowError, ValueError):  # a date UTC cannot hold once converted (year 1 or 9999)
        raise invalid(f"{field} {text[:40]!r} is out of range", endpoint) from None


# The columns that keep these fields (app.store.models).
LIMITS = {"name": 300}

# No bank balance reaches a quintillion in any currency: beyond this, the payload is wrong. The bound
# also keeps sums and forecasts (which go through float for the trend) far from overflow.
MAX_AMOUNT = Decimal(10) ** 18
MAX_DECIMAL_PLACES = 30
MAX_ID = 2**63


def parse_amount(value: Any, *, field: str, endpoint: str) -> Decimal | None:
    """A JSON number as an exact Decimal; null stays None (Powens marks amounts nullable)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float):
        raise invalid(f"{field} is not a number", endpoint)
    if isinstance(value, float):
        # Only reached when a caller parsed JSON without parse_float=Decimal: go through repr so the
        # shortest round-tripping text, not the binary expansion, is kept.
        value = repr(value)
    try:
        amount = Decimal(value) if not isinstance(value, Decimal) else value
    except (InvalidOperation, TypeError, ValueError):
        raise invalid(f"{field} is not a number", endpoint) from None
    if not amount.is_finite():
        raise invalid(f"{field} is not finite", endpoint)
    if abs(amount) >= MAX_AMOUNT:
        raise invalid(f"{field} {amount:.3e} is beyond any bank balance (|amount| < 1e18)", endpoint)
    if -amount.as_tuple().exponent > MAX_DECIMAL_PLACES:  # type: ignore[operator]
        raise invalid(f"{field} has more than {MAX_DECIMAL_PLACES} decimal places", endpoint)
    return amount


def decimal_places(amount: Decimal) -> int:
    exponent = amount.as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _int(value: Any, *, field: str, endpoint: str, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise invalid(f"{field} is not an integer id", endpoint)
    try:
        number = int(value)
    except ValueError:
        raise invalid(f"{field} is not an integer id", endpoint) from None
    if not 0 < number < MAX_ID:  # Powens ids are positive; ours are BIGINT columns
        raise invalid(f"{field} {str(number)[:24]} is out of range for an id", endpoint)
    return number


def _str(value: Any, *, field: str = "", endpoint: str = "", limit: int = 0) -> str | None:
    """A text field, refused when longer than the column that keeps it or holding a NUL character,
    which PostgreSQL text cannot store (a clean invalid_response, never a database error half-way
    through a write)."""
    if value is None:
        return None
    text = str(value)
    if limit and len(text) > limit:
        raise invalid(f"{field} is longer than {limit} characters", endpoint)
    if "\x00" in text:
        raise invalid(f"{field} contains a NUL character", endpoint)
    return text


def parse_user_id(raw: Any, endpoint: str) -> int:
    """The ``id`` of a Powens user object (``GET /users/{id}``)."""
    if not isinstance(raw, dict):
        raise invalid("the user object is missing", endpoint)
    user_id = _int(raw.get("id"), field="id", endpoint=endpoint)
    assert user_id is not None  # required
    return user_id


@dataclass(frozen=True)
class PowensAccount:
    id: int
    id_connection: int
    id_user: int | None
    name: str
    original_name: str | None
    number: str | None
    iban: str | None
    bic: str | None
    balance: Decimal | None  # None: the bank has not reported a balance yet
    coming: Decimal | None
    currency: str | None
    currency_precision: int | None
    type: str
    usage: str | None
    last_update: datetime | None
    disabled: datetime | None
    deleted: datetime | None
    error: str | None
    # ``last_update``'s second reading, when Powens' naive time falls in the repeated autumn hour.
    last_update_later: datetime | None = None

    def last_update_against(self, held: datetime | None, at: datetime) -> datetime | None:
        """Powens' ``last_update`` in UTC, read against the one already held. A naive Paris time in
        the repeated autumn hour has two readings: the later one when the earlier would be older than
        what is held and the later is not after the answer arrived (``at``: Powens' last sync cannot
        be in the future); else the earlier one."""
        first, later = self.last_update, self.last_update_later
        if first is None or later is None or held is None:
            return first
        return later if first < held <= later and later <= at else first

    def is_news_against(self, held: datetime | None, at: datetime) -> bool:
        """Whether this answer is at least as new as the one held (ties are news): the account row
        and its connection's state follow only such answers, never back to an older one."""
        if held is None:
            return True
        last = self.last_update_against(held, at)
        return last is not None and last >= held

    @classmethod
    def parse(cls, raw: Any, zone: ZoneInfo, endpoint: str) -> PowensAccount:
        if not isinstance(raw, dict):
            raise invalid("account is not an object", endpoint)
        cur = raw.get("currency")
        if isinstance(cur, dict):
            code, precision = cur.get("id"), cur.get("precision")
        else:
            code, precision = cur, None
        if code is not None and (not isinstance(code, str) or code not in ISO_4217):
            raise invalid(f"unknown currency {str(code)[:8]!r}", endpoint)
        name = raw.get("name") or raw.get("original_name")
        if not isinstance(name, str) or not name.strip():
            raise invalid("account name is missing", endpoint)
        _str(name.strip(), field="name", endpoint=endpoint, limit=LIMITS["name"])
        acc_id = _int(raw.get("id"), field="id", endpoint=endpoint)
        conn_id = _int(raw.get("id_connection"), field="id_connection", endpoint=endpoint)
        assert acc_id is not None and conn_id is not None
        balance = parse_amount(raw.get("balance"), field="balance", endpoint=endpoint)
        last_update, last_update_later = powens_datetime_readings(
            raw.get("last_update"), zone, field="last_update", endpoint=endpoint
        )
        return cls(
            id=acc_id,
            id_connection=conn_id,
            id_user=_int(raw.get("id_user"), field="id_user", endpoint=endpoint, required=False),
            name=name.strip(),
            original_name=_str(raw.get("original_name"), field="original_name", endpoint=endpoint, limit=300),
            number=_str(raw.get("number"), field="number", endpoint=endpoint, limit=64),
            iban=_str(raw.get("iban"), field="iban", endpoint=endpoint, limit=64),
            bic=_str(raw.get("bic"), field="bic", endpoint=endpoint, limit=16),
            balance=balance,
            coming=parse_amount(raw.get("coming"), field="coming", endpoint=endpoint),
            currency=code,
            currency_precision=precision
            if isinstance(precision, int) and not isinstance(precision, bool)
            else None,
            type=_str(raw.get("type") or "unknown", field="type", endpoint=endpoint, limit=64) or "unknown",
            usage=_str(raw.get("usage"), field="usage", endpoint=endpoint, limit=16),
            last_update=last_update,
            disabled=parse_powens_datetime(raw.get("disabled"), zone, field="disabled", endpoint=endpoint),
            deleted=parse_powens_datetime(raw.get("deleted"), zone, field="deleted", endpoint=endpoint),
            error=_str(raw.get("error"), field="error", endpoint=endpoint, limit=64),
            last_update_later=last_update_later,
        )


@dataclass(frozen=True)
class PowensConnection:
    id: int
    id_user: int | None
    id_connector: int | None
    state: str | None
    error_message: str | None
    last_update: datetime | None
    next_try: datetime | None
    active: bool
    # The PSD2 consent's end: the earliest of ``expire`` and ``sources[].access_expire``.
    consent_expires_at: datetime | None = None

    @classmethod
    def parse(cls, raw: Any, zone: ZoneInfo, endpoint: str) -> PowensConnection:
        if not isinstance(raw, dict):
            raise invalid("connection is not an object", endpoint)
        conn_id = _int(raw.get("id"), field="id", endpoint=endpoint)
        assert conn_id is not None
        # Older Powens payloads call the state "error".
        state = raw.get("state", raw.get("error"))
        return cls(
            id=conn_id,
            id_user=_int(raw.get("id_user"), field="id_user", endpoint=endpoint, required=False),
            id_connector=_int(
                raw.get("id_connector"), field="id_connector", endpoint=endpoint, required=False
            ),
            state=_str(state, field="state", endpoint=endpoint, limit=64),
            error_message=_str(
                raw.get("error_message"), field="error_message", endpoint=endpoint, limit=2000
            ),
            last_update=parse_powens_datetime(
                raw.get("last_update"), zone, field="last_update", endpoint=endpoint
            ),
            next_try=parse_powens_datetime(raw.get("next_try"), zone, field="next_try", endpoint=endpoint),
            active=bool(raw.get("active", True)),
            consent_expires_at=_consent_end(raw, zone, endpoint),
        )


def _consent_end(raw: dict[str, Any], zone: ZoneInfo, endpoint: str) -> datetime | None:
    ends = [parse_powens_datetime(raw.get("expire"), zone, field="expire", endpoint=endpoint)]
    sources = raw.get("sources")
    if isinstance(sources, list):
        for source in sources[:50]:
            if isinstance(source, dict):
                ends.append(
                    parse_powens_datetime(
                        source.get("access_expire"), zone, field="sources.access_expire", endpoint=endpoint
                    )
                )
    known = [e for e in ends if e is not None]
    return min(known) if known else None


# What a refresh reads of a Powens account: what the nightly shared read keeps in Redis and what a
# push carries onto the broker. No IBAN, account number or BIC, and no transactions.
READ_FIELDS = (
    "id",
    "id_connection",
    "id_user",
    "name",
    "original_name",
    "balance",
    "coming",
    "type",
    "usage",
    "last_update",
    "disabled",
    "deleted",
    "error",
)


def essential(item: Any) -> Any:
    """A Powens account payload reduced to ``READ_FIELDS`` (and its currency's id and precision)."""
    if not isinstance(item, dict):
        return item  # left for the account's own parse to refuse
    kept = {k: item[k] for k in READ_FIELDS if k in item}
    currency = item.get("currency")
    kept["currency"] = (
        {k: currency[k] for k in ("id", "precision") if k in currency}
        if isinstance(currency, dict)
        else currency
    )
    return kept


T = TypeVar("T")


@dataclass(frozen=True)
class Answer(Generic[T]):
    """A parsed Powens answer with the request id kept for the audit row."""

    value: T
    request_id: str | None
