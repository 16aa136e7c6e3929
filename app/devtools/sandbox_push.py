"""The sandbox's webhooks: what Powens pushes after its syncs, signed as Powens signs them.

Each event goes to ``<webhook URL>/<EVENT>`` (Powens registers one URL per event type) with
``BI-Signature`` and ``BI-Signature-Date`` made with the webhook secret, over the body as sent. Bodies
carry what Powens' carry, IBANs, account numbers and a few transactions included, so the receiver's
reduction is exercised as against Powens. Tests and the benchmark may pass another secret or date
(a stale or forged push); a send returns the receiver's HTTP status (``0``: it could not be reached).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import requests

from app.jsonio import dumps
from app.push.signature import DATE_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)


class Pusher:
    def __init__(self, url: str, secret: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self.session = requests.Session()
        self.sent = 0
        self._lock = threading.Lock()

    def send(
        self,
        event: str,
        body: Any,
        *,
        date: datetime | None = None,
        secret: str | None = None,
        to_event_path: bool = True,
    ) -> int:
        url = f"{self.url}/{event}" if to_event_path else self.url
        raw = dumps(body).encode()
        when = (date or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")
        headers = {
            "Content-Type": "application/json",
            DATE_HEADER: when,
            SIGNATURE_HEADER: sign((secret or self.secret).encode(), "POST", urlsplit(url).path, when, raw),
        }
        try:
            with self._lock:  # one requests.Session is not meant for concurrent use
                resp = self.session.post(url, data=raw, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            log.warning("sandbox webhook %s not delivered: %s", event, type(exc).__name__)
            return 0
        self.sent += 1
        return resp.status_code


def transactions(account_id: int, day: datetime | None, n: int = 3) -> list[dict[str, Any]]:
    """A few transactions, as a real push carries them (the receiver drops them before queuing)."""
    return [
        {
            "id": account_id * 1000 + i,
            "id_account": account_id,
            "date": (day or datetime.now(UTC)).date().isoformat(),
            "value": -12.5 * (i + 1),
            "original_wording": f"CARD PAYMENT {i} FR7630001007941234567890185",
        }
        for i in range(n)
    ]


def connection_synced(
    user_id: int, connection: dict[str, Any], accounts: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"user": {"id": user_id}, "connection": {**connection, "accounts": accounts}}
