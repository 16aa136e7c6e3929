from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect

from app.config import Settings, load_settings
from app.store.db import get_engine
from app.store.migrate import current_revision, upgrade
from app.store.models import Base


def _check(settings: Settings) -> None:
    upgrade(settings)
    upgrade(settings)  # idempotent
    assert current_revision(settings) is not None
    tables = set(inspect(get_engine(settings)).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables


def test_migrations_create_every_table_on_sqlite(tmp_path: Path) -> None:
    _check(load_settings(database_url=f"sqlite:///{tmp_path / 'm.db'}"))


def test_migrations_match_the_models_on_postgresql(pg_migrated: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    settings = load_settings(database_url=pg_migrated)
    _check(settings)
    with get_engine(settings).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    # Money/UTCDateTime are TypeDecorators over NUMERIC/TIMESTAMPTZ: no type drift is reported for them.
    assert [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")] == []
