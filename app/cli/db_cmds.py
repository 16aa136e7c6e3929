"""``balances db prune``: the retention policy now (docs/retention.md), as the daily task applies it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.admin import operations as ops
from app.cli.output import Col, Format, FormatOpt, chosen, listing
from app.cli.shell import JsonOpt, authorized, db_cli, err, out
from app.config import Settings


def _kept(settings: Settings) -> dict[str, str]:
    """How long each table keeps its rows, as the listing says it."""
    items = f"{settings.keep_run_items_days} days after its run ended"
    reports = f"{settings.keep_reports_days} days after its run ended"
    return {
        "run_items": items,
        "run_tenants": items,
        "tenant_summaries": reports,
        "cashflow_forecasts": reports,
        "refresh_attempts": f"{settings.keep_attempts_days} days (an operator's: kept)",
    }


@db_cli.command("prune")
def db_prune(
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Count what would be deleted and which partitions made; change nothing."
        ),
    ] = False,
    fmt: FormatOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Apply the retention policy now: old rows of finished runs, the machine's old audit rows and old
    reports deleted in short batches (never a row of an open run), the snapshots' next monthly
    partitions made. One invocation, bounded as the scheduled task's (BALANCES_PRUNE_MAX_ROWS); run it
    again while it says rows are left."""
    from app.admin.retention import prune_now

    form = chosen(fmt, json_)
    settings, actor = authorized(ops.DB_PRUNE, as_json=form is Format.JSON)
    report = prune_now(settings, actor, dry_run=dry_run)
    kept = _kept(settings)
    rows = [{"table": t, "kept": kept[t], "rows": n} for t, n in report.deleted.items()]
    verb = "would delete" if dry_run else "deleted"
    cols: list[Col[dict[str, Any]]] = [
        Col("table", lambda r: r["table"], ident=True),
        Col(verb, lambda r: f"{r['rows']:,}", justify="right", raw=lambda r: str(r["rows"])),
        Col("kept", lambda r: r["kept"], drop=1),
    ]
    listing(out, rows, cols, form, report.as_json())
    if form is Format.JSON:
        return
    made = ", ".join(report.partitions) or "none needed"
    err.print(f"snapshot partitions {'to make' if dry_run else 'made'}: {made}", highlight=False)
    if report.partition_error:
        err.print(f"[yellow]note:[/] partitions not made ({report.partition_error}): tried again next time")
    if report.more:
        err.print(
            f"stopped on its {report.stopped} bound with rows left: run it again (the daily task goes on)",
            highlight=False,
        )
