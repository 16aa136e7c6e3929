from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

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

    from app.store.partitions import schema_names

    settings = load_settings(database_url=pg_migrated)
    _check(settings)
    with get_engine(settings).connect() as conn:
        # The snapshots' partitions are one table of the models (app.store.partitions).
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"include_name": schema_names}), Base.metadata
        )
    # Money/UTCDateTime are TypeDecorators over NUMERIC/TIMESTAMPTZ: no type drift is reported for them.
    assert [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")] == []


def test_status_columns_refuse_values_outside_their_enum(settings: Settings, tmp_path: Path) -> None:
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


# -- 0012: snapshots partitioned by month (PostgreSQL), the audit rows found by age ---------------------


@pytest.fixture
def fresh_pg(pg_url: str) -> Iterator[Settings]:
    """An empty PostgreSQL database of its own (the session's is at head already)."""
    import uuid

    import psycopg

    from tests.conftest import PG_ADMIN_DSN

    name = f"balances_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    settings = load_settings(database_url=pg_url.rsplit("/", 1)[0] + f"/{name}")
    yield settings
    get_engine(settings).dispose()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


TODAY = datetime.now(UTC).date()
ACCOUNTS = ("a1", "a2", "a3")


def _accounts(settings: Settings) -> None:
    with get_engine(settings).begin() as conn:
        conn.execute(text("INSERT INTO tenants VALUES ('t1', 'T', true, now())"))
        conn.execute(
            text(
                "INSERT INTO powens_users (id, tenant_id, powens_user_id, token_encrypted, created_at, "
                "updated_at) VALUES (1, 't1', 1, 'x', now(), now())"
            )
        )
        conn.execute(
            text(
                "INSERT INTO bank_connections (id, tenant_id, powens_user_pk, external_id, active, "
                "created_at, updated_at) VALUES ('c1', 't1', 1, 1, true, now(), now())"
            )
        )
        for n, account in enumerate(ACCOUNTS):
            conn.execute(
                text(
                    "INSERT INTO bank_accounts (id, tenant_id, powens_user_pk, connection_id, external_id, "
                    "name, account_type, status, last_synced_at, created_at, updated_at) VALUES "
                    "(:id, 't1', 1, 'c1', :n, 'n', 'checking', 'active', now(), now(), now())"
                ),
                {"id": account, "n": n},
            )


def _snapshot(
    account: str, day: date, amount: str, updated: datetime, btype: str = "current"
) -> dict[str, Any]:
    return {
        "account_id": account,
        "tenant_id": "t1",
        "balance_type": btype,
        "day": day,
        "current_balance": Decimal(amount),
        "available_balance": None,
        "currency": "EUR",
        "last_updated_at": updated,
        "refreshed_at": updated,
        "carried": False,
    }


def _upsert(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Through the write path's own statement (``app.refresh.write.apply`` calls it)."""
    from app.store import writes
    from app.store.db import session_scope

    with session_scope(settings) as session:
        writes.upsert_snapshots(session, rows)


def _snapshots(settings: Settings) -> list[tuple[Any, ...]]:
    with get_engine(settings).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT id, account_id, balance_type, day, current_balance, last_updated_at, carried "
                    "FROM balance_snapshots ORDER BY id"
                )
            )
        ]


def _catalogue(settings: Settings, sql: str, **params: Any) -> Any:
    with get_engine(settings).connect() as conn:
        return conn.execute(text(sql), params).all()


def test_0012_partitions_existing_snapshots_in_place_and_the_write_path_goes_on(fresh_pg: Settings) -> None:
    from sqlalchemy.exc import IntegrityError

    from app.store import partitions

    s = fresh_pg
    upgrade(s, "0011")
    _accounts(s)
    past = datetime.now(UTC) - timedelta(days=1)
    days = [TODAY - timedelta(days=d) for d in (0, 1, 40, 400)]
    _upsert(s, [_snapshot(a, d, f"{n}.10", past) for n, a in enumerate(ACCOUNTS) for d in days])
    before = _snapshots(s)
    (filenode,) = _catalogue(s, "SELECT relfilenode FROM pg_class WHERE relname = 'balance_snapshots'")[0]

    upgrade(s)

    # Partitioned by range on day; the old table is the partition of everything before the bound, the
    # same file (not a row copied); the next months and a DEFAULT partition beside it.
    assert _catalogue(
        s,
        "SELECT p.partstrat, a.attname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = p.partattrs[0] "
        "WHERE c.relname = 'balance_snapshots'",
    ) == [("r", "day")]
    with get_engine(s).connect() as conn, Session(conn) as session:
        found = partitions.partitions(session)
    bound = partitions.month(TODAY + timedelta(days=1), 1)
    legacy = f"balance_snapshots_before_y{bound.year}m{bound.month:02d}"
    assert found[0] == partitions.Partition(legacy, None, bound)
    assert [(p.start, p.end) for p in found[1:-1]] == [
        (partitions.month(bound, k), partitions.month(bound, k + 1)) for k in range(len(found) - 2)
    ]
    assert found[-2].end == partitions.month(TODAY, 4) and found[-1].default
    assert _catalogue(s, "SELECT relfilenode FROM pg_class WHERE relname = :n", n=legacy) == [(filenode,)]
    assert _snapshots(s) == before
    # The pruned tables are vacuumed once a day's deletes are dead, not a week's.
    vacuum = ["autovacuum_vacuum_scale_factor=0.02", "autovacuum_vacuum_threshold=10000"]
    assert _catalogue(
        s,
        "SELECT relname, reloptions FROM pg_class "
        "WHERE relname IN ('run_items', 'refresh_attempts') ORDER BY relname",
    ) == [("refresh_attempts", vacuum), ("run_items", vacuum)]

    # (account, type, day) is unique in the old partition and in a new one alike ...
    later = bound + timedelta(days=3)
    _upsert(s, [_snapshot("a1", later, "5", past)])
    for day in (days[2], later):
        with pytest.raises(IntegrityError), get_engine(s).begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO balance_snapshots (account_id, tenant_id, balance_type, day, "
                    "current_balance, currency, last_updated_at, refreshed_at) "
                    "VALUES ('a1', 't1', 'current', :d, 1, 'EUR', now(), now())"
                ),
                {"d": day},
            )
    # ... and the write path's upsert still finds it: newer replaces, older never does, in either.
    newer, older = datetime.now(UTC), past - timedelta(days=2)
    _upsert(s, [_snapshot("a1", days[2], "7.5", newer), _snapshot("a1", later, "8", newer)])
    _upsert(s, [_snapshot("a2", days[2], "999", older), _snapshot("a1", later, "999", older)])
    after = {(r[1], r[3]): r for r in _snapshots(s)}
    assert after[("a1", days[2])][4] == Decimal("7.5") and after[("a1", later)][4] == Decimal("8")
    assert after[("a2", days[2])][4] == Decimal("1.10")
    assert after[("a1", later)][0] > max(r[0] for r in before)  # the id sequence carries on
    where = _catalogue(
        s,
        "SELECT tableoid::regclass::text FROM balance_snapshots WHERE account_id = 'a1' AND day = :d",
        d=later,
    )
    assert where == [(partitions.partition_name(partitions.month(later)),)]
    # The foreign key holds for every partition: an account deleted takes its history with it.
    with get_engine(s).begin() as conn:
        conn.execute(text("DELETE FROM bank_accounts WHERE id = 'a3'"))
    assert not [r for r in _snapshots(s) if r[1] == "a3"]
    # Alembic sees the models' tables, not the partitions.
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from app.store.partitions import schema_names

    with get_engine(s).connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"include_name": schema_names}), Base.metadata
        )
    assert [d for d in diff if d[0] in ("add_table", "remove_table", "add_column", "remove_column")] == []


def test_partition_maintenance_makes_the_next_months_ahead_and_empties_the_default(
    fresh_pg: Settings,
) -> None:
    from app.store import partitions

    s = fresh_pg
    upgrade(s)
    _accounts(s)
    far = partitions.month(TODAY, 14)  # no partition yet: the DEFAULT one takes it
    _upsert(s, [_snapshot("a1", far + timedelta(days=2), "1", datetime.now(UTC))])
    default = "balance_snapshots_default"
    assert _catalogue(s, f"SELECT count(*) FROM {default}") == [(1,)]  # noqa: S608

    made = partitions.ensure(s, far)
    assert [c.name for c in made] == [partitions.partition_name(partitions.month(far, k)) for k in range(4)]
    assert [c.moved for c in made] == [1, 0, 0, 0]
    assert partitions.ensure(s, far) == []  # idempotent
    assert _catalogue(s, f"SELECT count(*) FROM {default}") == [(0,)]  # noqa: S608
    assert _catalogue(s, "SELECT tableoid::regclass::text FROM balance_snapshots") == [(made[0].name,)]
    # A new partition has the keys of the others: the write path's upsert finds its unique index.
    _upsert(s, [_snapshot("a1", far + timedelta(days=2), "2", datetime.now(UTC))])
    assert _catalogue(s, "SELECT current_balance FROM balance_snapshots") == [(Decimal("2"),)]
    # The months between the migration's and the far one are not made by looking far ahead: only the
    # current month onwards, each time the maintenance runs (daily).
    assert partitions.ensure(s, TODAY) == []


def test_0012_downgrade_copies_the_snapshots_back_into_one_table(fresh_pg: Settings) -> None:
    from app.store import partitions
    from app.store.migrate import downgrade

    s = fresh_pg
    upgrade(s)
    _accounts(s)
    updated = datetime.now(UTC)
    spread = [TODAY - timedelta(days=400), TODAY, partitions.month(TODAY, 2), partitions.month(TODAY, 30)]
    _upsert(s, [_snapshot("a1", d, "1.5", updated) for d in spread])
    before = _snapshots(s)

    downgrade(s, "0011")
    assert _catalogue(s, "SELECT relkind FROM pg_class WHERE relname = 'balance_snapshots'") == [("r",)]
    assert _catalogue(
        s, "SELECT count(*) FROM pg_class WHERE relname LIKE 'balance_snapshots\\_%' AND relkind = 'r'"
    ) == [(0,)]
    assert _snapshots(s) == before
    assert _catalogue(
        s,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'balance_snapshots'::regclass AND contype IN ('p', 'u') ORDER BY conname",
    ) == [
        ("pk_balance_snapshots", "PRIMARY KEY (id)"),
        ("uq_balance_snapshots_account_id_balance_type_day", "UNIQUE (account_id, balance_type, day)"),
    ]
    assert _catalogue(
        s, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_refresh_attempts_finished'"
    ) == [(0,)]
    assert _catalogue(s, "SELECT reloptions FROM pg_class WHERE relname = 'refresh_attempts'") == [(None,)]
    _upsert(s, [_snapshot("a2", TODAY, "3", updated)])  # the code of 0011 writes there as before

    # Upgraded again: the rows of the months after the bound (from the partitions) stay in the old
    # table's partition, whose bound moves past them.
    upgrade(s)
    assert len(_snapshots(s)) == len(before) + 1
    with get_engine(s).connect() as conn, Session(conn) as session:
        found = partitions.partitions(session)
    assert found[0].end == partitions.month(spread[-1], 1) and found[-1].default


def test_0012_on_sqlite_adds_the_index_and_nothing_else(tmp_path: Path) -> None:
    from app.store.migrate import downgrade

    s = load_settings(database_url=f"sqlite:///{tmp_path / 'm12.db'}")
    upgrade(s)
    indexes = {i["name"] for i in inspect(get_engine(s)).get_indexes("refresh_attempts")}
    assert "ix_refresh_attempts_finished" in indexes
    assert set(inspect(get_engine(s)).get_table_names()) == {t.name for t in Base.metadata.sorted_tables} | {
        "alembic_version"
    }
    downgrade(s, "0011")
    assert "ix_refresh_attempts_finished" not in {
        i["name"] for i in inspect(get_engine(s)).get_indexes("refresh_attempts")
    }


def test_the_planning_migration_runs_again_after_a_build_it_did_not_finish(fresh_pg: Settings) -> None:
    """0013 adds columns, then builds indexes CONCURRENTLY outside any transaction: a job killed during
    a build leaves the columns added, the version at 0012 and maybe an INVALID index. Upgrading again
    must finish the work (before: DuplicateColumn, and IF NOT EXISTS took the invalid index)."""
    from app.store.migrate import current_revision

    upgrade(fresh_pg, "0012")
    with get_engine(fresh_pg).connect() as conn:
        conn.exec_driver_sql("ALTER TABLE refresh_runs ADD COLUMN plan_tenant_id varchar(128)")
        conn.exec_driver_sql(  # an index as an interrupted build leaves it: there, and not valid
            "CREATE INDEX ix_run_tenants_run_status ON run_tenants (run_id, status)"
        )
        conn.exec_driver_sql(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_run_tenants_run_status'::regclass"
        )
        conn.commit()
    upgrade(fresh_pg)
    assert current_revision(fresh_pg) == "0013"
    with get_engine(fresh_pg).connect() as conn:
        valid = conn.exec_driver_sql(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'ix_run_tenants_run_status'::regclass"
        ).scalar()
        planned = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_bank_accounts_active_plan'"
        ).scalar()
    assert valid is True and planned == 1
