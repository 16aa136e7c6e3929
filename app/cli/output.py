"""How the shell prints a listing: one set of columns, three formats, fit for a terminal or a pipe.

- ``table`` (the default): on a terminal, the columns that fit its width, least useful dropped first,
  ids never cut (a cut id cannot be copied); off a terminal (a pipe, a file), every column, nothing cut,
  no colour, one row per line.
- ``json``: the command's document (``--json`` is the same), money and timestamps as ``app.jsonio``
  writes them.
- ``tsv``: a header line, then one line per row, tab-separated, raw values (full ids, RFC 3339
  timestamps, exact amounts): what ``cut``, ``awk`` and spreadsheets read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

import typer
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from app.jsonio import dumps, rfc3339

R = TypeVar("R")
WIDEST = 100_000


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    TSV = "tsv"


FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        case_sensitive=False,
        help="table (default: fits a terminal, nothing cut in a pipe), json, or tsv.",
    ),
]


def chosen(fmt: Format | None, as_json: bool) -> Format:
    """``--json`` is ``--format json`` (every read command has had it); else ``--format``, else table."""
    return Format.JSON if as_json else (fmt or Format.TABLE)


@dataclass(frozen=True)
class Col(Generic[R]):
    """A column: its header, a row's text in it (plain: no markup), and how readily it is dropped on a
    narrow terminal (0: never; the highest goes first). ``ident`` columns are never cut or wrapped
    unless nothing else is left to drop, then folded whole onto several lines."""

    header: str
    text: Callable[[R], str]
    drop: int = 0
    ident: bool = False
    justify: Literal["left", "right"] = "left"
    style: Callable[[R], str | None] | None = None
    raw: Callable[[R], str] | None = None  # the TSV value when it differs (an amount without grouping)
    # A command to copy: when the terminal is too narrow for its column, each row's command is printed
    # under the table instead, one line each, never broken by us.
    line: bool = False


def stamp(moment: datetime | None, missing: str = "never") -> str:
    """A timestamp in a table or a TSV row: RFC 3339, whole seconds, ``Z``."""
    return rfc3339(moment, seconds=True) if moment is not None else missing


def tsv_field(text: str) -> str:
    """A value on one TSV line: tabs and line breaks would shift or split the row."""
    return " ".join(text.replace("\t", " ").splitlines())


def listing(
    console: Console,
    rows: Sequence[R],
    cols: Sequence[Col[R]],
    fmt: Format,
    doc: Any,
    *,
    title: str | None = None,
    empty: str | None = None,
) -> None:
    """Print ``rows`` as a table or TSV, or ``doc`` as JSON."""
    if fmt is Format.JSON:
        write_json(doc, console)
        return
    if fmt is Format.TSV:
        lines = ["\t".join(c.header for c in cols)]
        lines += ["\t".join(tsv_field((c.raw or c.text)(r)) for c in cols) for r in rows]
        console.file.write("\n".join(lines) + "\n")
        return
    if not rows and empty:
        console.print(empty, highlight=False)
        return
    table, dropped = fitted(console, rows, cols, title=title)
    console.print(table)
    if dropped:
        names = ", ".join(c.header for c in dropped)
        console.print(
            f"(too narrow for: {names}; --format tsv shows every column)", style="dim", highlight=False
        )
    key = ([c for c in cols if c.ident] or list(cols))[-1]  # what a command line is about
    for c in dropped:
        for r in rows:
            if c.line and (value := c.text(r)) not in ("", "-"):
                console.print(f"{key.text(r)}:", highlight=False)
                console.print(f"  {value}", highlight=False, soft_wrap=True)


def fit(console: Console, rows: Sequence[R], cols: Sequence[Col[R]], *, title: str | None = None) -> Table:
    return fitted(console, rows, cols, title=title)[0]


def fitted(
    console: Console, rows: Sequence[R], cols: Sequence[Col[R]], *, title: str | None = None
) -> tuple[Table, list[Col[R]]]:
    """The table with the columns that fit the console's width, and the columns left out: the ones
    most readily dropped go first, until its natural width fits (off a terminal the width has no
    limit: nothing is dropped)."""
    shown = list(cols)
    while True:
        table = _table(rows, shown, title)
        # Measured without the console's width (Measurement.get clamps to it): its natural width.
        width = Measurement.get(console, console.options.update_width(WIDEST), table).maximum
        droppable = [c for c in shown if c.drop]
        if width <= console.width or not droppable:
            return table, [c for c in cols if c not in shown]
        shown.remove(max(droppable, key=lambda c: c.drop))


def _table(rows: Sequence[R], cols: Sequence[Col[R]], title: str | None) -> Table:
    table = Table(title=title, title_justify="left")
    for c in cols:
        table.add_column(
            c.header,
            justify=c.justify,
            no_wrap=c.ident,
            overflow="fold",  # a value too long for its column wraps whole; never an ellipsis
            min_width=len(c.header) if c.ident else None,
        )
    for r in rows:
        cells = []
        for c in cols:
            text = escape(c.text(r))  # values are text, not markup
            style = c.style(r) if c.style else None
            cells.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(*cells)
    return table


def write_json(obj: Any, console: Console) -> None:
    """Our own JSON text, money digit for digit; on a terminal, colored as it is (rich's print_json
    would parse it again, through float, and show 12345678901234567.89 as 1.2345678901234568e+16)."""
    text = dumps(obj, indent=2)
    if console.is_terminal:
        # Coloured, never broken by us: a long value (a command to copy) stays one line (soft wrap).
        console.print(JSONHighlighter()(Text(text)), soft_wrap=True)
    else:
        console.file.write(text + "\n")
