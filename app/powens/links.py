"""Reconnect links a person follows to fix a Powens connection, and the error that says how to get one.

A connection in a user-action state (SCA, wrong password, ...) cannot be fixed by retrying: the end
user must reconnect through Powens' webview, whose URL needs a short-lived temporary ``code`` Powens
issues for the user's token (``GET /auth/token/code``). So a link is made at the moment a person asks
for it (``balances connections reconnect-link``), never stored, never written in a summary or a log;
errors and summaries name the command that makes one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from app.config import Settings
from app.errors import Reason
from app.powens.errors import PowensError


def reconnect_url(settings: Settings, connection_external_id: int, code: str) -> str:
    params: dict[str, Any] = {}
    if settings.powens_domain:
        params["domain"] = f"{settings.powens_domain}.biapi.pro"
    if settings.powens_client_id:
        params["client_id"] = settings.powens_client_id
    if settings.powens_redirect_uri:
        params["redirect_uri"] = settings.powens_redirect_uri
    params["code"] = code
    params["connection_id"] = connection_external_id
    return f"https://webview.powens.com/{settings.powens_webview_lang}/reconnect?{urlencode(params)}"


def reconnect_command(tenant_id: str, connection_id: str) -> str:
    return f"balances connections reconnect-link --tenant {tenant_id} --connection {connection_id}"


def needs_user(
    tenant_id: str,
    connection_id: str,
    connection_external_id: int,
    state: str | None,
    request_id: str | None = None,
) -> PowensError:
    return PowensError(
        Reason.NEEDS_USER_ACTION,
        f"connection {connection_external_id} needs the user (state {state}); reconnect link: "
        f"`{reconnect_command(tenant_id, connection_id)}`",
        request_id=request_id,
    )
