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


def test_status_columns_refuse_values_outside_their_enum(settings: Settings, tmp_path: Path) -> None:
    import pytest
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from app.store import runs
    from app.store.states import RunStatus, Trigger

    sqlite = load_settings(database_url=f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(sqlite)
    for s in (settings, sqlite):
        run_id, _ = runs.create_run(s, trigger=Trigger.ON_DEMAND, actor="alice")
        with pytest.raises(IntegrityError), get_engine(s).begin() as conn:
            conn.execute(text("UPDATE refresh_runs SET status = 'sweeping' WHERE id = :id"), {"id": run_id})
        with pytest.raises(IntegrityError), get_engine(s).begin() as conn:
            conn.execute(text("UPDATE refresh_runs SET trigger = 'manual' WHERE id = :id"), {"id": run_id})
    # ... and the code refuses a move its table does not list, before reaching the database.
    with pytest.raises(ValueError, match="cannot move from completed to running"):
        runs.move_run(None, "r", RunStatus.COMPLETED, RunStatus.RUNNING)  # type: ignore[arg-type]


def test_runs_started_from_the_shell_before_0003_become_on_demand(tmp_path: Path) -> None:
    from sqlalchemy import text

    s = load_settings(database_url=f"sqlite:///{tmp_path / 'm3.db'}")
    upgrade(s, "0002")
    with get_engine(s).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO refresh_runs (id, kind, trigger, status, actor, total_tenants, total_accounts,"
                " powens_calls, created_at) VALUES ('r1', 'nightly', 'manual', 'completed', 'alice', 0, 0,"
                " NULL, '2026-11-01 02:00:00')"
            )
        )
    upgrade(s)
    with get_engine(s).connect() as conn:
        assert conn.execute(text("SELECT trigger FROM refresh_runs")).scalar_one() == "on_demand"
        columns = {c["name"] for c in inspect(conn).get_columns("refresh_runs")}
    assert "powens_calls" not in columns
