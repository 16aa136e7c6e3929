"""``balance_snapshots``' monthly partitions on PostgreSQL: which exist, and the next months made ahead.

Snapshots are kept forever — they are the forecasts' history — one row per account, balance type and
business day: 20 M rows a day at the README's 10 M accounts. The table is partitioned by RANGE on
``day``, a partition a month (migration 0012; the table as it was became the partition of everything
before its bound), so a night's writes touch the current month's indexes only, the planner prunes
every read bounded by day (summaries, forecasts, history), and an old month can be moved, compressed
or detached on its own without touching the rest (docs/retention.md).

A DEFAULT partition catches a day no partition covers (the maintenance did not run for months): a
write never fails for want of a partition. ``ensure`` — run daily by the retention task, idempotent,
serialised by an advisory lock — creates the months from the current one to ``AHEAD`` months ahead;
a month whose rows already went to the DEFAULT partition gets them moved into its new partition in
the same transaction. Creating a partition never stops writers: the month is created as a table of
its own, then ATTACHed, which takes SHARE UPDATE EXCLUSIVE on the parent (inserts and updates go on)
and locks and scans only the DEFAULT partition, empty when the maintenance runs on time; account
writes wait for the few milliseconds it takes (the foreign key's triggers on ``bank_accounts``).

SQLite (the embedded default) is not partitioned: there every function here finds nothing to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import date

from sqlalchemy import text
from sqlalchemy.orm import Session

from app.config import Settings
from app.store.db import rowcount, session_scope

log = logging.getLogger(__name__)

TABLE = "balance_snapshots"
AHEAD = 3  # months of partitions kept ready beyond the current one
# A partition's name says its month (the partition of data from before 0012 says its bound).
PARTITION_NAME = re.compile(rf"^{TABLE}_(?:before_)?y(\d{{4}})m(\d{{2}})$|^{TABLE}_default$")
_BOUND = re.compile(r"FROM \((.+?)\) TO \((.+?)\)")
# Two maintenances at once (a beat tick and an operator's `db prune`) would race to create a month.
_LOCK_KEY = 0x62616C5F70617274  # "bal_part"


@dataclass(frozen=True)
class Partition:
    name: str
    start: date | None  # None: MINVALUE (or the DEFAULT partition)
    end: date | None  # None: MAXVALUE (or the DEFAULT partition)
    default: bool = False

    def overlaps(self, start: date, end: date) -> bool:
        if self.default:
            return False
        return (self.start is None or self.start < end) and (self.end is None or start < self.end)


def schema_names(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name``: the partitions are the snapshots' table, not tables of the models."""
    return not (type_ == "table" and name is not None and PARTITION_NAME.match(name) is not None)


def month(d: date, add: int = 0) -> date:
    """The first day of ``d``'s month, ``add`` months on."""
    n = d.year * 12 + d.month - 1 + add
    return date(n // 12, n % 12 + 1, 1)


def partition_name(start: date) -> str:
    return f"{TABLE}_y{start.year:04d}m{start.month:02d}"


def is_partitioned(session: Session) -> bool:
    if session.get_bind().dialect.name != "postgresql":
        return False
    return bool(
        session.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid "
                "WHERE c.relname = :t AND pg_table_is_visible(c.oid))"
            ),
            {"t": TABLE},
        )
    )


def partitions(session: Session) -> list[Partition]:
    """The snapshots' partitions, as the catalogue bounds them, oldest first."""
    if not is_partitioned(session):
        return []
    rows = session.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname = :t AND pg_table_is_visible(p.oid)"
        ),
        {"t": TABLE},
    ).all()
    found = [_parse(name, bound) for name, bound in rows]
    return sorted(found, key=lambda p: (p.default, p.start or date.min))


def _parse(name: str, bound: str) -> Partition:
    if bound.strip().upper() == "DEFAULT":
        return Partition(name, None, None, default=True)
    m = _BOUND.search(bound)
    if m is None:
        raise ValueError(f"partition {name} has a bound this code does not read: {bound}")
    lo, hi = (
        None if v.upper() in ("MINVALUE", "MAXVALUE") else date.fromisoformat(v.strip("'"))
        for v in m.groups()
    )
    return Partition(name, lo, hi)


def missing_months(existing: list[Partition], today: date, ahead: int = AHEAD) -> list[tuple[date, date]]:
    """The months from ``today``'s to ``ahead`` months on that no partition covers, as [start, end)."""
    wanted = [(month(today, k), month(today, k + 1)) for k in range(ahead + 1)]
    return [(s, e) for s, e in wanted if not any(p.overlaps(s, e) for p in existing)]


@dataclass(frozen=True)
class Created:
    name: str
    moved: int  # rows taken out of the DEFAULT partition into it


def ensure(settings: Settings, today: date, *, ahead: int = AHEAD, dry_run: bool = False) -> list[Created]:
    """Create the partitions of the months from ``today``'s to ``ahead`` months on that none covers
    (one transaction; none on SQLite or an unpartitioned table). ``dry_run``: only say which."""
    with session_scope(settings) as session:
        if not is_partitioned(session):
            return []
        if dry_run:
            return [
                Created(partition_name(s), 0) for s, _ in missing_months(partitions(session), today, ahead)
            ]
        # Short waits only: rather try again tomorrow (the DEFAULT partition holds the rows meanwhile)
        # than queue the night's writers behind this one.
        session.execute(text("SET LOCAL lock_timeout = '5s'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        existing = partitions(session)
        wanted = missing_months(existing, today, ahead)
        if wanted:
            # A partition attached gets the foreign key's triggers on bank_accounts, which takes that
            # table in SHARE ROW EXCLUSIVE mode: taken first, in the write path's order (accounts, then
            # snapshots), so a writer and this never wait on each other in a cycle.
            session.execute(text("LOCK TABLE bank_accounts IN SHARE ROW EXCLUSIVE MODE"))
        default = next((p.name for p in existing if p.default), None)
        made = [_create(session, s, e, default) for s, e in wanted]
    for c in made:
        if c.moved:
            log.warning(
                "snapshot partition %s created: %d rows moved out of the DEFAULT partition", c.name, c.moved
            )
        else:
            log.info("snapshot partition %s created", c.name)
    return made


def _create(session: Session, start: date, end: date, default: str | None) -> Created:
    name = partition_name(start)
    session.execute(text(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS)"))
    moved = 0
    if default is not None:
        in_range = f"day >= DATE '{start}' AND day < DATE '{end}'"
        if session.scalar(text(f"SELECT EXISTS (SELECT 1 FROM {default} WHERE {in_range})")):  # noqa: S608
            moved = rowcount(
                session.execute(
                    text(
                        f"WITH moved AS (DELETE FROM {default} WHERE {in_range} RETURNING *) "  # noqa: S608
                        f"INSERT INTO {name} SELECT * FROM moved"
                    )
                )
            )
    session.execute(
        text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES FROM ('{start}') TO ('{end}')")
    )
    return Created(name, moved)
