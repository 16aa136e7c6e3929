"""What a single setting's value must be: each check takes the raw value and returns it cleaned, or
raises ``ValueError`` with a message that never repeats a secret value (``Settings`` names the
variable). Checked when the process starts, not at 2 a.m. when the value is first used."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import SecretStr

POWENS_DOMAIN_RE = re.compile(r"^[a-z\d]+(-[a-z\d]+)*$")


def database_url(v: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        backend = make_url(v).get_backend_name()
    except ArgumentError:
        backend = ""
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(
            "not a database URL this service uses: postgresql+psycopg://USER@HOST:5432/DB or sqlite:///PATH"
        )
    return v


def powens_domain(v: str | None) -> str | None:
    if v is not None and v != "" and not POWENS_DOMAIN_RE.match(v):
        raise ValueError("must match [a-z0-9]+(-[a-z0-9]+)*, e.g. acme-sandbox")
    return v or None


def base_url(v: str | None) -> str | None:
    if not v:
        return None
    if not re.match(r"^https?://[^/]+", v):
        raise ValueError("must be an http(s) URL such as http://127.0.0.1:8765/2.0")
    return v.rstrip("/") + "/"


def zone(v: str) -> str:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {v!r}") from exc
    return v


def cron(v: str) -> str:
    if len(v.split()) != 5:
        raise ValueError("must be a 5-field crontab expression such as '0 2 * * *'")
    return v


def fernet_keys(v: SecretStr | None) -> SecretStr | None:
    if v is None or not v.get_secret_value().strip():
        return None
    for key in (k.strip() for k in v.get_secret_value().split(",") if k.strip()):
        try:
            raw = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("each key must be a url-safe base64 32-byte Fernet key (comma-separated)")
    return v


def signing_keys(v: SecretStr | None) -> SecretStr | None:
    if v is None or not v.get_secret_value().strip():
        return None
    if any(len(k.strip()) < 32 for k in v.get_secret_value().split(",") if k.strip()):
        raise ValueError("each key must be at least 32 characters (e.g. `openssl rand -hex 32`)")
    return v


def notify_url(v: SecretStr | None) -> SecretStr | None:
    """An http(s) URL with a host. The message never repeats the value: the URL is a secret."""
    url = v.get_secret_value().strip() if v is not None else ""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(c.isspace() for c in url)
    ):
        raise ValueError("must be an http(s) URL such as https://hooks.example.com/balances")
    return SecretStr(url)


def notify_secret(v: SecretStr | None) -> SecretStr | None:
    if v is None or not v.get_secret_value().strip():
        return None
    if len(v.get_secret_value().strip()) < 16:
        raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
    return SecretStr(v.get_secret_value().strip())
