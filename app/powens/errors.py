"""Powens errors and connection states mapped, once, to the fixed failure reasons.

Powens' error envelope is ``{code, description, message, request_id}``. We branch on ``code`` first
(case-insensitively: ``wrongPass`` and ``wrongpass`` both occur), then on the HTTP status.
"""

from __future__ import annotations

from typing import Any

from app.errors import Reason, RefreshError
from app.retry import retry_after_seconds

# Connection states (docs/powens.md "Syncing with the bank"), lower-cased.
USER_ACTION_STATES = frozenset(
    s.lower()
    for s in (
        "SCARequired",
        "webauthRequired",
        "additionalInformationNeeded",
        "decoupled",
        "actionNeeded",
        "passwordExpired",
        "wrongpass",
    )
)
TRANSIENT_STATES = frozenset(s.lower() for s in ("validating", "rateLimiting", "websiteUnavailable", "bug"))

_CODE_REASONS: dict[str, Reason] = {
    "toomanysync": Reason.RATE_LIMITED,
    "ratelimiting": Reason.RATE_LIMITED,
    "websiteunavailable": Reason.PROVIDER_UNAVAILABLE,
    "bug": Reason.PROVIDER_UNAVAILABLE,
    "maintenance": Reason.PROVIDER_UNAVAILABLE,
    "invalidaccesstoken": Reason.UNAUTHORIZED,
    "invalidtoken": Reason.UNAUTHORIZED,
    "unauthorized": Reason.UNAUTHORIZED,
    "forbidden": Reason.UNAUTHORIZED,
    "accountnotfound": Reason.NOT_FOUND,
    "usernotfound": Reason.NOT_FOUND,
    "connectionnotfound": Reason.NOT_FOUND,
    "noaccount": Reason.NOT_FOUND,
    "notfound": Reason.NOT_FOUND,
}
_CODE_REASONS.update({state: Reason.NEEDS_USER_ACTION for state in USER_ACTION_STATES})


class PowensError(RefreshError):
    """An error answered by (or on the way to) Powens, already classified."""


def classify_state(state: str | None) -> Reason | None:
    """Reason for a connection in ``state``; ``None`` when data can be used (fine or transient).

    Transient states are Powens' to retry; the data we read is its last good sync, so it is kept with
    a non-fatal note. ``notSupported`` and unknown states cannot be solved by retrying: the connection
    needs a person (Powens: treat unknown states as a generic non-resolvable case).
    """
    if state is None or state == "":
        return None
    s = state.lower()
    if s in TRANSIENT_STATES:
        return None
    return Reason.NEEDS_USER_ACTION


def is_transient_state(state: str | None) -> bool:
    return bool(state) and str(state).lower() in TRANSIENT_STATES


def error_from_response(
    status: int, body: Any, *, endpoint: str, retry_after: str | None = None
) -> PowensError:
    """Map a non-2xx answer to a PowensError. ``body`` is the parsed JSON (or None)."""
    code = description = message = None
    request_id: str | None = None
    if isinstance(body, dict):
        code = body.get("code")
        description = body.get("description")
        message = body.get("message")
        rid = body.get("request_id")
        request_id = None if rid is None else str(rid)
    code_s = str(code) if code else None
    reason = _CODE_REASONS.get(code_s.lower()) if code_s else None
    if reason is None:
        reason = _status_reason(status)
    detail = description or message or ""
    text = f"Powens {endpoint} answered HTTP {status}"
    if code_s:
        text += f" ({code_s})"
    if detail:
        text += f": {str(detail)[:200]}"
    return PowensError(
        reason,
        text,
        retry_after=retry_after_seconds(retry_after),
        request_id=request_id,
        status=status,
        code=code_s,
    )


def _status_reason(status: int) -> Reason:
    if status in (401, 403):
        return Reason.UNAUTHORIZED
    if status == 404:
        return Reason.NOT_FOUND
    if status == 429:
        return Reason.RATE_LIMITED
    if status >= 500:
        return Reason.PROVIDER_UNAVAILABLE
    # 400/409/other: our request was wrong for Powens; a bug on our side.
    return Reason.INTERNAL
