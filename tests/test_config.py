from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings
from app.store.secrets import TokenCipher


def test_base_url_from_domain_and_override() -> None:
    assert (
        load_settings(powens_domain="acme-sandbox").powens_base_url == "https://acme-sandbox.biapi.pro/2.0/"
    )
    s = load_settings(powens_domain="acme", powens_base_url_override="http://127.0.0.1:8765/2.0")
    assert s.powens_base_url == "http://127.0.0.1:8765/2.0/"


def test_a_malformed_variable_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POWENS_DOMAIN", "Not A Domain!")
    with pytest.raises(ConfigError, match="POWENS_DOMAIN"):
        load_settings()


def test_missing_powens_location_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="POWENS_DOMAIN or POWENS_BASE_URL"):
        _ = load_settings(powens_domain=None, powens_base_url_override=None).powens_base_url


def test_unknown_timezone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCES_POWENS_TIMEZONE", "Mars/Olympus")
    with pytest.raises(ConfigError, match="BALANCES_POWENS_TIMEZONE"):
        load_settings()


def test_retry_cap_must_fit_in_the_visibility_timeout() -> None:
    with pytest.raises(ConfigError, match="BALANCES_VISIBILITY_TIMEOUT"):
        load_settings(retry_cap_seconds=4000, visibility_timeout=3600)


def test_missing_or_bad_encryption_key_names_the_variable_but_not_the_value() -> None:
    with pytest.raises(ConfigError, match="BALANCES_ENCRYPTION_KEY is not set"):
        TokenCipher.from_settings(load_settings(encryption_key=None))
    # A malformed key stops the process as it loads its settings, not at the first token it reads.
    with pytest.raises(ConfigError, match="BALANCES_ENCRYPTION_KEY: each key must be") as info:
        load_settings(encryption_key="hunter2-not-a-key")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="BALANCES_SIGNING_KEY: each key must be at least 32") as info:
        load_settings(signing_key="short-secret")
    assert "short-secret" not in str(info.value)


def test_token_round_trip_and_key_rotation() -> None:
    from app.store.secrets import generate_key

    old, new = generate_key(), generate_key()
    blob = TokenCipher([old]).encrypt("sbx_secret_token")
    assert b"sbx_secret_token" not in blob
    assert TokenCipher([new, old]).decrypt(blob) == "sbx_secret_token"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        TokenCipher([new]).decrypt(blob)
