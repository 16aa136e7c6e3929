"""Authenticated task messages: work is authorized where it executes.

Every message the service publishes (the admin shell, beat, a worker fanning out or retrying) carries
an HMAC-SHA256 over the task's name, id, arguments and keyword arguments — the actor and the trigger
among them — under ``BALANCES_SIGNING_KEY``, a key only the service's own processes hold. A worker
runs a message only when the signature verifies: anyone who can merely write to the broker cannot name
the scheduler or an admin as the actor, change the account, or add ``forceRefresh``. Replaying a
captured message is harmless: it carries its task id, whose outcome the audit table already holds.

Several keys, comma-separated, newest first: messages are signed with the first and accepted under
any, so a key is rotated without downtime (deploy the new key in second place everywhere, then first,
then drop the old one). See docs/design.md "Authenticated work" and README "Threat model".
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

HEADER = "balances_signature"


class SigningKeyMissing(RuntimeError):
    """No BALANCES_SIGNING_KEY: this process can neither sign nor verify task messages."""


def keys_from(secret: str | None) -> list[bytes]:
    return [k.strip().encode() for k in (secret or "").split(",") if k.strip()]


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def canonical(name: str, task_id: str, args: Any, kwargs: Any, retries: int = 0) -> bytes:
    """The signed bytes: the same on the publishing side (Python values) and the worker's (their JSON
    round trip), since both go through one JSON normalisation first. ``retries`` is signed too: it is
    the attempt number a refresh counts its retries by."""
    plain = json.loads(json.dumps([name, task_id, args, kwargs or {}, int(retries or 0)], default=str))
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(keys: list[bytes], name: str, task_id: str, args: Any, kwargs: Any, retries: int = 0) -> str:
    if not keys:
        raise SigningKeyMissing("BALANCES_SIGNING_KEY is not set: task messages cannot be signed")
    key = keys[0]
    digest = hmac.new(key, canonical(name, task_id, args, kwargs, retries), hashlib.sha256).hexdigest()
    return f"{key_id(key)}.{digest}"


def verify(
    keys: list[bytes], signature: Any, name: str, task_id: str, args: Any, kwargs: Any, retries: int = 0
) -> bool:
    """Constant-time check of ``signature`` against every configured key."""
    if not isinstance(signature, str) or "." not in signature:
        return False
    kid, digest = signature.split(".", 1)
    body = canonical(name, task_id, args, kwargs, retries)
    for key in keys:
        if hmac.compare_digest(kid, key_id(key)):
            expected = hmac.new(key, body, hashlib.sha256).hexdigest()
            return hmac.compare_digest(digest, expected)
    return False


def seal(keys: list[bytes], label: str, text: str) -> str:
    """``text`` with an HMAC over ``label`` (where it is stored) and itself: what the service keeps in
    Redis for its own later use (a shared read, a shared failure), which a Redis writer cannot plant."""
    if not keys:
        raise SigningKeyMissing("BALANCES_SIGNING_KEY is not set: shared values cannot be sealed")
    mac = hmac.new(keys[0], f"{label}\n{text}".encode(), hashlib.sha256).hexdigest()
    return f"{key_id(keys[0])}.{mac}\n{text}"


def unseal(keys: list[bytes], label: str, sealed: str) -> str | None:
    """The text of a sealed value, or None when it was not sealed by one of ``keys`` for ``label``."""
    head, sep, text = sealed.partition("\n")
    if not sep or "." not in head:
        return None
    kid, mac = head.split(".", 1)
    for key in keys:
        if hmac.compare_digest(kid, key_id(key)):
            expected = hmac.new(key, f"{label}\n{text}".encode(), hashlib.sha256).hexdigest()
            return text if hmac.compare_digest(mac, expected) else None
    return None
