"""Apply Alembic migrations programmatically (``balances db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from app.config import Settings
from app.store.db import get_engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Each migration in a transaction of its own, begun by Alembic (not by us: a migration that builds
    an index ``CONCURRENTLY`` steps out of it, which Alembic refuses inside a caller's transaction)."""
    engine = get_engine(settings)
    cfg = alembic_config(settings)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def downgrade(settings: Settings, revision: str) -> None:
    """Back to ``revision`` (tests and operators' rollbacks; the shell has no command for it)."""
    engine = get_engine(settings)
    cfg = alembic_config(settings)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(settings: Settings) -> str | None:
    engine = get_engine(settings)
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        row = conn.exec_driver_sql("SELECT version_num FROM alembic_version").first()
        return row[0] if row else None
