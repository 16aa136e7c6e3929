"""Alembic environment: the URL and connection come from app.store.migrate, never from a file."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.store.models import Base
from app.store.partitions import schema_names

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # One transaction per migration: a migration with an autocommit block (an index built
        # CONCURRENTLY) commits the ones before it anyway; this makes that the rule, not a surprise.
        transaction_per_migration=True,
        include_name=schema_names,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from app.store.db import make_engine

    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
