"""Commands about nightly runs and their reports: ``run nightly|status|sweep``, ``summary``, ``forecast``."""

from __future__ import annotations

from typing import Annotated

import typer

from app.admin import operations as ops
from app.cli.render import print_forecast, print_status, print_summary, watch_run
from app.cli.shell import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    JsonOpt,
    TenantOpt,
    authorized,
    cli,
    err,
    fail,
    finite,
    known_tenant,
    out,
    print_json,
    publish_or_fail,
    ready_to_publish,
    run_cli,
)
from app.errors import Reason
from app.store.states import RunStatus


@run_cli.command("nightly")
def run_nightly(
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the run id and return.")] = False,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            max=7 * 86_400.0,
            callback=finite,
            help="Seconds to wait for the run to finish (it goes on after that; exit 4).",
        ),
    ] = 6 * 3600,
    json_: JsonOpt = False,
) -> None:
    """Start the nightly pipeline now (refresh every active account, then summaries and forecasts)."""
    from app.nightly import pipeline
    from app.store.runs import abandon_unpublished
    from app.store.states import Trigger
    from app.worker.queues import Queue
    from app.worker.tasks import enqueue_plan

    settings, actor = authorized(ops.RUN_NIGHTLY, as_json=json_)
    # Planning, summaries and the sweeper are on `reports`, refreshes on `refresh`: one worker
    # consuming both (celery -A app worker, every queue) or a pair; checked before the run exists.
    for queue in (Queue.REPORTS, Queue.REFRESH):
        ready_to_publish(settings, queue, as_json=json_)
    run_id, _ = pipeline.start_run(settings, trigger=Trigger.ON_DEMAND, actor=actor.name)
    try:
        publish_or_fail(lambda: enqueue_plan(run_id), as_json=json_)
    except typer.Exit:
        abandon_unpublished(settings, run_id, "its planning message could not be published")
        raise
    if no_wait:
        print_json({"runId": run_id}) if json_ else print(run_id)
        return
    status = watch_run(settings, run_id, timeout=timeout, console=err)
    if status is None:
        fail(Reason.NOT_FOUND, f"run {run_id} disappeared", EXIT_FAILED, as_json=json_)
    print_json(status) if json_ else print_status(out, err, status)
    if RunStatus(status["status"]).open:
        err.print(
            f"run {run_id} is still {status['status']} after {timeout:g} s; it goes on: "
            f"balances run status {run_id}",
            highlight=False,
        )
        raise typer.Exit(EXIT_TIMEOUT)
    if status["status"] != RunStatus.COMPLETED:
        raise typer.Exit(EXIT_FAILED)


@run_cli.command("status")
def run_status_cmd(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Per-run counts, duration, failures by reason, stale accounts."""
    from app.store.runs import run_status

    settings, _ = authorized(ops.RUN_STATUS, as_json=json_)
    status = run_status(settings, run_id)
    if status is None:
        fail(Reason.NOT_FOUND, f"no run {run_id or ''}".strip(), EXIT_FAILED, as_json=json_)
    print_json(status) if json_ else print_status(out, err, status)


@run_cli.command("sweep")
def run_sweep(json_: JsonOpt = False) -> None:
    """Run the sweeper once now (beat runs it every BALANCES_SWEEP_INTERVAL_SECONDS)."""
    from pydantic.alias_generators import to_camel

    from app.worker.tasks import sweep_runs

    settings, _ = authorized(ops.RUN_SWEEP, as_json=json_)
    if settings.signing_key is None:  # the sweep publishes (re-drives, summaries): signed or not at all
        fail(
            Reason.INVALID_INPUT,
            "BALANCES_SIGNING_KEY is not set (nothing was swept)",
            EXIT_USAGE,
            as_json=json_,
        )
    swept = publish_or_fail(sweep_runs.run, as_json=json_)
    report = {to_camel(k): v for k, v in swept.items()}
    if json_:
        print_json(report)
        return
    marked = report["runsMarkedStale"]
    out.print(
        f"swept: {report['redispatched']} refreshes published again, {report['stale']} marked stale, "
        f"{report['summariesReenqueued']} summaries, {report['plansReenqueued']} plans and "
        f"{report.get('runReportsSent', 0)} run reports sent again; "
        + (f"runs given up: {', '.join(marked)}" if marked else "no run given up"),
        highlight=False,
    )


@cli.command("summary")
def summary_cmd(
    tenant: TenantOpt,
    run: Annotated[str | None, typer.Option("--run", help="Run id (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """The tenant's stored summary of a run (default: its latest)."""
    from app.reports.summary import latest_summary
    from app.store.db import session_scope

    settings, _ = authorized(ops.SUMMARY, as_json=json_)
    known_tenant(settings, tenant, as_json=json_)
    with session_scope(settings) as session:
        summary = latest_summary(session, tenant, run)
    if summary is None:
        fail(Reason.NOT_FOUND, f"no summary for tenant {tenant!r}", EXIT_FAILED, as_json=json_)
    print_json(summary) if json_ else print_summary(out, summary)


@cli.command("forecast")
def forecast_cmd(
    tenant: TenantOpt,
    run: Annotated[str | None, typer.Option("--run", help="Run id (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """The tenant's stored cashflow forecast per currency (default: the latest run's)."""
    from app.reports.jobs import latest_forecasts

    settings, _ = authorized(ops.FORECAST, as_json=json_)
    known_tenant(settings, tenant, as_json=json_)
    forecasts = latest_forecasts(settings, tenant, run)
    if not forecasts:
        fail(Reason.NOT_FOUND, f"no forecast for tenant {tenant!r}", EXIT_FAILED, as_json=json_)
    if json_:
        print_json(forecasts)
        return
    for fc in forecasts:
        print_forecast(out, fc)
