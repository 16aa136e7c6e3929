"""Links a person follows to fix a Powens connection, and the error that carries them.

A connection in a user-action state (SCA, wrong password, ...) cannot be fixed by retrying: the end
user must reconnect through Powens' webview. The refresh, the summary and the forced sync all say so
the same way.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from app.config import Settings
from app.errors import Reason
from app.powens.errors import PowensError


def reconnect_url(settings: Settings, connection_external_id: int) -> str:
    params: dict[str, Any] = {}
    if settings.powens_domain:
        params["domain"] = f"{settings.powens_domain}.biapi.pro"
    if settings.powens_client_id:
        params["client_id"] = settings.powens_client_id
    params["connection_id"] = connection_external_id
    return f"https://webview.powens.com/{settings.powens_webview_lang}/reconnect?{urlencode(params)}"


def needs_user(
    settings: Settings, connection_external_id: int, state: str | None, request_id: str | None = None
) -> PowensError:
    return PowensError(
        Reason.NEEDS_USER_ACTION,
        f"connection {connection_external_id} needs the user (state {state}); "
        f"reconnect at {reconnect_url(settings, connection_external_id)}",
        request_id=request_id,
    )
