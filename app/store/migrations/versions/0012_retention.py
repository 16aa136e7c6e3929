"""retention: snapshots partitioned by month (PostgreSQL); refresh_attempts found by age

``balance_snapshots`` grows by one row per account, balance type and day, forever (docs/retention.md).
On PostgreSQL it becomes a table partitioned by RANGE on ``day``, without copying a row and without
holding a strong lock for longer than a catalogue change:

1. Online, outside any transaction (reads and writes go on): a unique index on ``(id, day)`` built
   ``CONCURRENTLY`` on the existing table (a partitioned table's primary key must include its
   partition key), and a ``CHECK (day < B)`` added ``NOT VALID`` then validated — the validation scans
   the table under a SHARE UPDATE EXCLUSIVE lock, which lets writers through. B is the first day of the
   month after tomorrow: no write of the current month can reach it (a later day already stored, which
   only a downgrade of this migration leaves, moves B past it, found by one more scan).
2. One short transaction, measured at 80 ms with 1 M and with 5 M rows (``lock_timeout`` 10 s: rather
   fail and be run again than queue the hot path behind a long reader; ``bank_accounts`` is locked
   first, as every writer does, since the new table's foreign key takes it in SHARE ROW EXCLUSIVE
   mode): the table is renamed ``balance_snapshots_before_yYYYYmMM`` (its primary key swapped to the
   ``(id, day)`` index, its constraints renamed out of the way); a partitioned ``balance_snapshots``
   with the same columns, keys, index and foreign key is created; the old table is ATTACHed as the
   partition of everything before B — its CHECK proves the bound, and its indexes and foreign key
   match the parent's, so nothing is scanned or built; monthly partitions from B to three months ahead
   and a DEFAULT partition are created (empty). The id sequence carries on.

The write path's ``ON CONFLICT (account_id, balance_type, day)`` finds the partitioned unique index
(it includes the partition key), so the code of 0011 runs unchanged on the new table. The month in
progress stays in the old table's partition (moving it would copy it under lock); the scheduled
partition maintenance (``app.store.partitions``) creates the next months ahead from then on.

``refresh_attempts (finished_at, id)``: retention deletes the oldest audit rows by keyset on it. The
table holds a row per account a night (10 M a night at the README's scale), so the index is built
``CONCURRENTLY``: a plain CREATE INDEX would block every refresh's audit row for the whole build.
``run_items`` and ``refresh_attempts`` are vacuumed once 2 % of them is dead (not 20 %): retention
deletes about a 35th of each a day, and only a vacuum makes that space reusable.

SQLite (the embedded default) is not partitioned: there only the index is created.

Downgrade copies every snapshot back into one plain table, snapshots locked while it copies: minutes
per hundred million rows (docs/retention.md says when it is worth it; rolling back the code alone
needs no downgrade: the code of 0011 runs on the partitioned table).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-12
"""

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from alembic import op
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "balance_snapshots"
ATTEMPTS_INDEX = "ix_refresh_attempts_finished"
AHEAD = 3  # months of partitions created beyond the current one
# The tables retention deletes a night's rows from, every day: about 1/35 of each at the default
# windows. Autovacuum's default (20 % of a table dead) would wait a week before making that space
# reusable, the tables growing meanwhile; 2 % (and at least 10,000 rows) vacuums them about daily.
PRUNED = ("run_items", "refresh_attempts")
VACUUM = "autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 10000"
# Written out (not imported from the app) so that this migration keeps meaning what it meant.
PK, UQ, IX = (
    "pk_balance_snapshots",
    "uq_balance_snapshots_account_id_balance_type_day",
    "ix_balance_snapshots_tenant_day",
)
FK = "fk_balance_snapshots_account_id_bank_accounts"
CHECK = "ck_balance_snapshots_before_bound"
ID_DAY = "balance_snapshots_id_day_key"


def _month(d: date, add: int = 0) -> date:
    n = d.year * 12 + d.month - 1 + add
    return date(n // 12, n % 12 + 1, 1)


def _partition(start: date) -> str:
    return f"{TABLE}_y{start.year:04d}m{start.month:02d}"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(ATTEMPTS_INDEX, "refresh_attempts", ["finished_at", "id"], unique=False)
        return
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)  # ahead of every zone's business day
    with op.get_context().autocommit_block():
        op.create_index(
            ATTEMPTS_INDEX,
            "refresh_attempts",
            ["finished_at", "id"],
            unique=False,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        bound = _online_preparation(tomorrow)
        for table in PRUNED:
            op.execute(f"ALTER TABLE {table} SET ({VACUUM})")
    _swap(f"{TABLE}_before_y{bound.year:04d}m{bound.month:02d}", bound, tomorrow)


def _online_preparation(tomorrow: date) -> date:
    """What scans the table, done while reads and writes go on (idempotent: a failed run is run again).
    Returns the bound B: the first day of the month after tomorrow, or after the latest day stored
    when there is a later one (rows a downgrade of 0012 brought back: found by one more scan)."""
    bind = op.get_bind()
    valid = bind.execute(
        text(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = :n"
        ),
        {"n": ID_DAY},
    ).scalar()
    if valid is False:  # a CONCURRENTLY build that was interrupted leaves an invalid index
        op.execute(f"DROP INDEX CONCURRENTLY {ID_DAY}")
    op.execute(f"CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {ID_DAY} ON {TABLE} (id, day)")
    bound = _month(tomorrow, 1)
    if _bounded(bound):
        return bound
    latest = bind.execute(text(f"SELECT max(day) FROM {TABLE}")).scalar_one()  # noqa: S608 - our name
    bound = _month(max(latest, tomorrow), 1)
    if _bounded(bound):
        return bound
    raise RuntimeError(f"balance_snapshots received days on or after {bound} while upgrading: upgrade again")


def _bounded(bound: date) -> bool:
    """Whether every row is before ``bound``, proven by a CHECK validated under a lock writers pass.
    Adding and dropping the constraint take the table's ACCESS EXCLUSIVE lock for an instant: bounded
    by a lock timeout, so behind a long reader (a dump, a report) the upgrade fails at once and is run
    again, instead of queueing every snapshot writer behind it."""
    op.execute("SET lock_timeout = '10s'")
    op.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT IF EXISTS {CHECK}")
    op.execute(f"ALTER TABLE {TABLE} ADD CONSTRAINT {CHECK} CHECK (day < DATE '{bound}') NOT VALID")
    op.execute("RESET lock_timeout")  # the connection goes back to its pool
    try:
        op.execute(f"ALTER TABLE {TABLE} VALIDATE CONSTRAINT {CHECK}")
    except IntegrityError:
        op.execute("SET lock_timeout = '10s'")
        op.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT IF EXISTS {CHECK}")
        op.execute("RESET lock_timeout")
        return False
    return True


def _swap(legacy: str, bound: date, today: date) -> None:
    """The catalogue changes, in one short transaction: nothing is scanned or copied."""
    _lock()
    op.execute(f"ALTER TABLE {TABLE} RENAME TO {legacy}")
    op.execute(f"ALTER TABLE {legacy} DROP CONSTRAINT {PK}")
    op.execute(f"ALTER TABLE {legacy} ADD CONSTRAINT {legacy}_pkey PRIMARY KEY USING INDEX {ID_DAY}")
    op.execute(f"ALTER TABLE {legacy} RENAME CONSTRAINT {UQ} TO {legacy}_key")
    op.execute(f"ALTER INDEX {IX} RENAME TO {legacy}_tenant_day")
    op.execute(f"CREATE TABLE {TABLE} (LIKE {legacy} INCLUDING DEFAULTS) PARTITION BY RANGE (day)")
    _keys(TABLE, partitioned=True)
    op.execute(f"ALTER SEQUENCE {TABLE}_id_seq OWNED BY {TABLE}.id")
    op.execute(f"ALTER TABLE {TABLE} ATTACH PARTITION {legacy} FOR VALUES FROM (MINVALUE) TO ('{bound}')")
    op.execute(f"ALTER TABLE {legacy} DROP CONSTRAINT {CHECK}")  # the partition bound says it now
    start = bound
    while start <= _month(today, AHEAD):
        end = _month(start, 1)
        op.execute(
            f"CREATE TABLE {_partition(start)} PARTITION OF {TABLE} FOR VALUES FROM ('{start}') TO ('{end}')"
        )
        start = end
    op.execute(f"CREATE TABLE {TABLE}_default PARTITION OF {TABLE} DEFAULT")


def _lock() -> None:
    """The write path's order (accounts, then snapshots), so a writer and this migration never wait on
    each other in a cycle; given up after 10 s rather than queueing the hot path behind a long reader.
    The foreign key added to the new table needs bank_accounts in SHARE ROW EXCLUSIVE mode anyway."""
    op.execute("SET LOCAL lock_timeout = '10s'")
    op.execute("LOCK TABLE bank_accounts IN SHARE ROW EXCLUSIVE MODE")
    op.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")


def _keys(table: str, *, partitioned: bool) -> None:
    """The keys of the snapshots' table as 0001 declared them (the primary key with ``day`` when the
    table is partitioned, whose keys must include the partition key)."""
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {PK} PRIMARY KEY ({'id, day' if partitioned else 'id'})")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {UQ} UNIQUE (account_id, balance_type, day)")
    op.execute(f"CREATE INDEX {IX} ON {table} (tenant_id, day)")
    op.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT {FK} FOREIGN KEY (account_id) "
        "REFERENCES bank_accounts (id) ON DELETE CASCADE"
    )


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        op.drop_index(ATTEMPTS_INDEX, table_name="refresh_attempts")
        return
    partitioned = bind.execute(
        text(
            "SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = :n"
        ),
        {"n": TABLE},
    ).scalar()
    if partitioned:
        plain = f"{TABLE}_plain"
        _lock()  # held until the copy is committed: snapshots are neither read nor written meanwhile
        op.execute(f"CREATE TABLE {plain} (LIKE {TABLE} INCLUDING DEFAULTS)")
        op.execute(f"INSERT INTO {plain} SELECT * FROM {TABLE}")  # noqa: S608 - our own names
        op.execute(f"ALTER SEQUENCE {TABLE}_id_seq OWNED BY {plain}.id")  # or DROP would take it
        op.execute(f"DROP TABLE {TABLE}")  # and every partition
        op.execute(f"ALTER TABLE {plain} RENAME TO {TABLE}")
        _keys(TABLE, partitioned=False)
    for table in PRUNED:
        op.execute(f"ALTER TABLE {table} RESET (autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)")
    op.drop_index(ATTEMPTS_INDEX, table_name="refresh_attempts")
