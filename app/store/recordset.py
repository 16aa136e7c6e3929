"""A batch's rows as one JSON document, read by the database as a relation: the one dialect seam of
the set-based writes (``app.store.writes``).

Every set-based statement takes its rows as a single parameter: a JSON array of objects, one per
row. The statement itself — an ``INSERT ... SELECT ... ON CONFLICT``, an ``UPDATE ... FROM``, a
``DELETE ... WHERE EXISTS`` — is one SQLAlchemy Core construct, written once and compiled for each
dialect; only the relation the rows become differs:

- PostgreSQL: ``json_to_recordset(CAST(:rows AS JSON)) AS v(a VARCHAR, b NUMERIC, ...)``, typed by
  the columns' own types. Fixed text whatever the number of rows (prepared once per connection), and
  the document is written by the C JSON encoder with money as exact JSON numbers (``app.jsonio``).
  Measured against the alternatives (docs/performance.md): a multi-row VALUES list is new SQL for
  every batch size, and one array parameter per column spent 12 % of a worker's CPU encoding arrays.
- SQLite (the embedded default): ``(SELECT json_extract(value, '$.a') AS a, ... FROM json_each(:rows))
  AS v``. SQLite has no decimal or timestamp type, so values are written into the document exactly as
  the columns' own types store them (money as exact text, times as SQLAlchemy's UTC text), and compare
  there as the stored values do.

Values are checked on the way in as the ORM would check them: money must be ``Decimal``, times aware.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Dialect, Text, bindparam, cast, column, func, select, type_coerce
from sqlalchemy.sql.expression import FromClause
from sqlalchemy.types import TypeDecorator, TypeEngine

from app.jsonio import dumps

PARAM = "rows"


class Recordset:
    """The shape of a batch's rows: (column name, SQLAlchemy type) pairs, in order."""

    def __init__(self, *columns: tuple[str, TypeEngine[Any]]) -> None:
        self.columns = columns
        checks = ((name, _check_for(type_)) for name, type_ in columns)
        self._checks = [(name, check) for name, check in checks if check is not None]

    def relation(self, dialect: Dialect, name: str = "v") -> FromClause:
        """The rows as a relation named ``name`` with a column per field."""
        if dialect.name == "postgresql":
            rows = func.json_to_recordset(cast(bindparam(PARAM, type_=Text), JSON))
            typed = rows.table_valued(*(column(n, t) for n, t in self.columns))
            return typed.render_derived(name=name, with_types=True)
        if dialect.name == "sqlite":
            each = func.json_each(bindparam(PARAM, type_=Text)).table_valued("value").alias(f"{name}_rows")
            fields = [
                type_coerce(func.json_extract(each.c.value, f"$.{n}"), t).label(n) for n, t in self.columns
            ]
            return select(*fields).select_from(each).subquery(name)
        raise RuntimeError(f"unsupported database dialect {dialect.name}")

    def document(self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> str:
        """The rows as the one JSON parameter of a statement over ``relation``."""
        for row in rows:
            for name, check in self._checks:
                value = row.get(name)
                if value is not None:
                    check(name, value)
        if dialect.name == "postgresql":
            return dumps(rows)
        encoders = [(n, _sqlite_encoder(t, dialect)) for n, t in self.columns]
        return dumps([{n: (enc(row.get(n)) if enc else row.get(n)) for n, enc in encoders} for row in rows])

    def params(self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        return {PARAM: self.document(dialect, rows)}


def _check_for(type_: TypeEngine[Any]) -> Callable[[str, Any], None] | None:
    from app.store.models import Money, UTCDateTime

    if isinstance(type_, Money):
        return _money
    if isinstance(type_, UTCDateTime):
        return _aware
    return None


def _money(name: str, value: Any) -> None:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name}: money must be Decimal, got {type(value).__name__}")


def _aware(name: str, value: Any) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(f"{name}: a naive or non-datetime value given to a UTC column")


def _sqlite_encoder(type_: TypeEngine[Any], dialect: Dialect) -> Callable[[Any], Any] | None:
    if isinstance(type_, JSON) or (isinstance(type_, TypeDecorator) and isinstance(type_.impl, JSON)):
        return lambda v: None if v is None else dumps(v)  # kept as the JSON column's text
    processor = type_.dialect_impl(dialect).bind_processor(dialect)  # as the ORM binds it here
    if processor is None:
        return None
    return lambda v: None if v is None else processor(v)
