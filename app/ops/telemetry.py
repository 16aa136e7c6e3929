"""Telemetry events: one JSON line per event on logger ``openbanking.telemetry``, PII masked.

Masking follows ContractSpec (docs/contract.md "Telemetry"): for the PII keys, a value of 4
characters or fewer becomes all ``*``, a longer one ``*`` x (len-4) + its last 4 characters, null
becomes ''.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from app.jsonio import dumps

logger = logging.getLogger("openbanking.telemetry")

PII_KEYS = frozenset(
    {
        "iban",
        "bic",
        "accountNumberMasked",
        "accountNumber",
        "counterpartyName",
        "counterpartyAccount",
        "description",
        "merchantName",
        "merchantCategoryCode",
        "reference",
    }
)


def mask_value(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    if len(text) <= 4:
        return "*" * len(text)
    return "*" * (len(text) - 4) + text[-4:]


def redact(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: (mask_value(v) if k in PII_KEYS else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def build_event(event: str, properties: Mapping[str, Any], **context: Any) -> dict[str, Any]:
    return {
        "event": event,
        "timestamp": datetime.now(UTC),
        "properties": redact(dict(properties)),
        **{k: v for k, v in context.items() if v is not None},
    }


def emit(event: str, properties: Mapping[str, Any], **context: Any) -> dict[str, Any]:
    """Write the event as one JSON line and return it (the caller may also audit it)."""
    payload = build_event(event, properties, **context)
    logger.info(dumps(payload))
    return payload
