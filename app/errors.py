"""The closed failure taxonomy (fixed reason labels: docs/design.md "Failure reasons").

Errors are mapped to a reason once, at the boundary where they happen (Powens client, policy, input
validation), and passed on as values; no layer re-interprets them.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from app.jsonio import rfc3339


class Reason(StrEnum):
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    RATE_LIMITED = "rate_limited"
    NEEDS_USER_ACTION = "needs_user_action"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    INVALID_RESPONSE = "invalid_response"
    INVALID_INPUT = "invalid_input"
    POLICY_DENIED = "policy_denied"
    INTERNAL = "internal"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset({Reason.PROVIDER_UNAVAILABLE, Reason.RATE_LIMITED, Reason.INTERNAL})


class RefreshError(Exception):
    """A refresh failed for ``reason``. ``message`` is safe to log: it never carries a secret."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
        status: int | None = None,
        code: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.request_id = request_id
        self.status = status
        self.code = code
        # When trying again makes sense (a rate limit's end), for whoever reads the failure.
        self.next_attempt_at = next_attempt_at

    @property
    def retryable(self) -> bool:
        return self.reason.retryable

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason.value!r}, message={self.message!r})"

    def as_json(self) -> dict[str, dict[str, str]]:
        body = {"reason": self.reason.value, "message": self.message}
        if self.next_attempt_at is not None:
            body["nextAttemptAt"] = rfc3339(self.next_attempt_at)
        return {"error": body}


class PolicyDenied(RefreshError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.POLICY_DENIED, message)


class InvalidInput(RefreshError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.INVALID_INPUT, message)


class NotFound(RefreshError):
    def __init__(self, message: str) -> None:
        super().__init__(Reason.NOT_FOUND, message)
