"""Powens' webhook signature (its HMAC auth provider), checked before anything else is read.

``BI-Signature = base64(HMAC-SHA256(secret, METHOD + "." + path + "." + date + "." + raw_body))`` with
METHOD upper-case, path the URL path (no host, no query), date the raw ``BI-Signature-Date`` header
(ISO 8601 with an offset, or ``Z``) and raw_body the exact bytes received. Several secrets may be valid
at once (a rotation: newest first); each is compared in constant time. A valid signature with a date
too far from now is a replay, refused as such; the receiver checks the date first, before reading the
body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime

SIGNATURE_HEADER = "BI-Signature"
DATE_HEADER = "BI-Signature-Date"


def signed_bytes(method: str, path: str, date: str, body: bytes) -> bytes:
    return f"{method.upper()}.{path}.{date}.".encode() + body


def sign(secret: bytes, method: str, path: str, date: str, body: bytes) -> str:
    digest = hmac.new(secret, signed_bytes(method, path, date, body), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def parse_date(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None  # without an offset the instant is unknown


def date_within(date: str, now: datetime, tolerance_seconds: float) -> bool:
    when = parse_date(date)
    return when is not None and abs((now.astimezone(UTC) - when).total_seconds()) <= tolerance_seconds


def valid(secrets: list[bytes], method: str, path: str, signature: str, date: str, body: bytes) -> bool:
    """Whether ``signature`` is the HMAC of the request under one of ``secrets`` (every secret is
    tried, in constant time: the time taken does not say which one matched)."""
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    message = signed_bytes(method, path, date, body)
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(hmac.new(secret, message, hashlib.sha256).digest(), given)
    return matched
