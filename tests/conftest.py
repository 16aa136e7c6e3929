"""Real services for the tests: a fresh PostgreSQL database per session, a Redis db, the sandbox.

Under CI=true a missing PostgreSQL or Redis fails the run; elsewhere the tests that need it skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text

from app.config import Settings, load_settings, use_settings
from app.devtools.sandbox import Sandbox, SandboxState
from app.store.db import get_engine
from app.store.migrate import upgrade
from app.store.models import Base
from app.store.secrets import generate_key
from tests.support.figures import security_figures  # noqa: F401 - the security suites' figures

PG_ADMIN_DSN = os.environ.get("BALANCES_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BALANCES_TEST_REDIS", "redis://127.0.0.1:6379/13")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Fuzzing explores new inputs on every developer run (and remembers what failed in .hypothesis/); CI
# replays a fixed sequence, so a build's result depends on the code, not on the draw.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if IN_CI:
    hypothesis_settings.load_profile("ci")
ENCRYPTION_KEY = generate_key()
SIGNING_KEY = "test-signing-" + uuid.uuid4().hex + uuid.uuid4().hex


def unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({type(exc).__name__}: {exc})"
    if IN_CI:
        pytest.fail(f"{message}; under CI=true a missing service is a failure", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"balances_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", exc)
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.flushdb()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[Sandbox]:
    with Sandbox(SandboxState(seed=1234)) as sb:
        yield sb


@pytest.fixture
def sandbox(sandbox_server: Sandbox) -> Iterator[Sandbox]:
    """The session's sandbox server; each test leaves it without scripted faults."""
    yield sandbox_server
    sandbox_server.state.clear_faults()
    sandbox_server.state.knobs.latency_ms = 0


def make_settings(database_url: str, sandbox: Sandbox, **extra: object) -> Settings:
    extra.setdefault("celery_broker_url", REDIS_URL)
    extra.setdefault("powens_rate_limit", 0)
    return load_settings(
        database_url=database_url,
        powens_base_url_override=sandbox.base_url,
        powens_client_id="test-client",
        encryption_key=ENCRYPTION_KEY,
        signing_key=SIGNING_KEY,
        retry_base_seconds=0.05,
        retry_cap_seconds=0.5,
        metrics_port=0,
        **extra,
    )


@pytest.fixture(scope="session")
def pg_migrated(pg_url: str, sandbox_server: Sandbox) -> str:
    upgrade(make_settings(pg_url, sandbox_server))
    return pg_url


@pytest.fixture
def settings(pg_migrated: str, redis_url: str, sandbox: Sandbox) -> Iterator[Settings]:
    """Settings on the session's PostgreSQL database, emptied before each test."""
    s = make_settings(pg_migrated, sandbox)
    engine = get_engine(s)
    with engine.begin() as conn:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    use_settings(s)
    yield s
    use_settings(None)
