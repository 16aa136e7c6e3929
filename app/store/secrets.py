"""Powens tokens at rest: Fernet (AES-128-CBC + HMAC-SHA256) with BALANCES_ENCRYPTION_KEY."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.config import ConfigError, Settings


class TokenCipher:
    def __init__(self, keys: list[str]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])
        except (ValueError, TypeError):
            raise ConfigError(
                "BALANCES_ENCRYPTION_KEY is malformed: it must be a url-safe base64 32-byte Fernet key "
                "(several, comma-separated, newest first, to rotate)"
            ) from None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenCipher:
        if settings.encryption_key is None or not settings.encryption_key.get_secret_value().strip():
            raise ConfigError(
                "BALANCES_ENCRYPTION_KEY is not set: it is required to store or read Powens tokens "
                "(generate one with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            )
        keys = [k.strip() for k in settings.encryption_key.get_secret_value().split(",") if k.strip()]
        return cls(keys)

    def encrypt(self, token: str) -> bytes:
        return self._fernet.encrypt(token.encode())

    def rotate(self, blob: bytes) -> bytes:
        """The same token encrypted under the newest key (MultiFernet: decrypt with any, encrypt with
        the first)."""
        try:
            return self._fernet.rotate(bytes(blob))
        except InvalidToken:
            raise ConfigError(
                "a stored Powens token cannot be decrypted with BALANCES_ENCRYPTION_KEY "
                "(wrong or rotated-out key)"
            ) from None

    def decrypt(self, blob: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(blob)).decode()
        except InvalidToken:
            raise ConfigError(
                "a stored Powens token cannot be decrypted with BALANCES_ENCRYPTION_KEY "
                "(wrong or rotated-out key)"
            ) from None


def generate_key() -> str:
    return Fernet.generate_key().decode()


def key_opens_stored_tokens(settings: Settings) -> bool | None:
    """Whether BALANCES_ENCRYPTION_KEY decrypts a stored token (the newest one): a well-formed but
    wrong key is caught when a process starts, not at 2 a.m. on the first refresh. None: nothing
    stored yet to check against."""
    from sqlalchemy import select

    from app.store.db import session_scope
    from app.store.models import PowensUser

    cipher = TokenCipher.from_settings(settings)
    with session_scope(settings) as session:
        blob = session.scalar(
            select(PowensUser.token_encrypted)
            .where(PowensUser.token_encrypted.is_not(None))
            .order_by(PowensUser.updated_at.desc())
            .limit(1)
        )
    if blob is None:
        return None
    try:
        cipher.decrypt(blob)
    except ConfigError:
        return False
    return True
