"""JSON text with exact money: ``Decimal`` is written as a JSON number, digit for digit.

``json`` cannot write a Decimal as a number without going through float; pydantic writes it as a
string. Neither is what the contract's consumers expect (``"currentBalance": 1234.56``).
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel


def decimal_text(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError(f"non-finite amount {value}")
    text = format(value, "f")
    return text


def rfc3339(moment: datetime, *, seconds: bool = False) -> str:
    """The one timestamp format the service writes: RFC 3339 in UTC with ``Z``
    (``2026-12-07T21:12:37.123456Z``; ``seconds`` drops the fraction, for tables). A naive datetime
    is UTC (SQLite gives them back so)."""
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="seconds" if seconds else "auto") + "Z"


def to_plain(obj: Any) -> Any:
    """Models, dates and containers to JSON-ready values, Decimals kept as Decimal."""
    if isinstance(obj, BaseModel):
        return to_plain(obj.model_dump(mode="python", exclude_none=False))
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, datetime):
        return rfc3339(obj)
    if isinstance(obj, date):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    return obj


def dumps(obj: Any, *, indent: int | None = None, drop_none: bool = False) -> str:
    if drop_none:
        return _dumps(_drop_none(to_plain(obj)), indent)
    try:
        # The C encoder walks the document; only what it does not know (Decimal, datetime, a model)
        # comes back to Python. A key it cannot write (a date as a key) takes the slow road below.
        return _dumps(obj, indent)
    except _KeyTypeError:
        return _dumps(to_plain(obj), indent)


class _KeyTypeError(Exception):
    pass


def _dumps(plain: Any, indent: int | None) -> str:
    numbers: list[str] = []
    # A placeholder nobody can spell in advance: a string from outside equal to one would otherwise be
    # replaced by a number (and the amount it stood for left as a string).
    nonce = secrets.token_hex(8)

    def default(o: Any) -> Any:
        if isinstance(o, Decimal):
            numbers.append(decimal_text(o))
            return f"\x00dec{nonce}:{len(numbers) - 1}\x00"
        if isinstance(o, Mapping | BaseModel | datetime | date | uuid.UUID):
            return to_plain(o)
        raise TypeError(f"{type(o).__name__} is not JSON serializable")

    try:
        text = json.dumps(plain, default=default, indent=indent, ensure_ascii=False)
    except TypeError as exc:
        if str(exc).startswith("keys must be"):
            raise _KeyTypeError(str(exc)) from exc
        raise
    if not numbers:
        return text
    # One pass over the text (one replace per amount would be quadratic in a big document).
    placeholder = re.compile(re.escape(f'"\\u0000dec{nonce}:') + r"(\d+)" + re.escape('\\u0000"'))
    return placeholder.sub(lambda m: numbers[int(m.group(1))], text)


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def loads(text: str | bytes) -> Any:
    """Parse JSON keeping every non-integer number exact."""
    return json.loads(text, parse_float=Decimal)
