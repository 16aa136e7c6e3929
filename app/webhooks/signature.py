"""Powens' webhook signature (its HMAC auth provider), checked before anything else is read.

``BI-Signature = base64(HMAC-SHA256(secret, METHOD + "." + path + "." + date + "." + raw_body))`` with
METHOD upper-case, path the URL path (no host, no query), date the raw ``BI-Signature-Date`` header
(ISO 8601 with an offset, or ``Z``) and raw_body the exact bytes received. Several secrets may be valid
at once (a rotation: newest first); each is compared in constant time. A valid signature with a date
too far from now is a replay, refused as such.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime
from enum import StrEnum

SIGNATURE_HEADER = "BI-Signature"
DATE_HEADER = "BI-Signature-Date"


class Verdict(StrEnum):
    VALID = "valid"
    BAD_SIGNATURE = "rejected_signature"  # missing, malformed, or made with no secret we hold
    STALE = "rejected_stale"  # authentic, but dated outside the tolerance window (or undated)


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


def check(
    secrets: list[bytes],
    method: str,
    path: str,
    signature: str | None,
    date: str | None,
    body: bytes,
    now: datetime,
    tolerance_seconds: float,
) -> Verdict:
    if not secrets or not signature or date is None:
        return Verdict.BAD_SIGNATURE
    try:
        given = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError):
        return Verdict.BAD_SIGNATURE
    message = signed_bytes(method, path, date, body)
    valid = False
    for secret in secrets:  # every secret is tried: the time taken does not say which one matched
        expected = hmac.new(secret, message, hashlib.sha256).digest()
        valid |= hmac.compare_digest(expected, given)
    if not valid:
        return Verdict.BAD_SIGNATURE
    when = parse_date(date)
    if when is None or abs((now.astimezone(UTC) - when).total_seconds()) > tolerance_seconds:
        return Verdict.STALE
    return Verdict.VALID
