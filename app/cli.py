"""The ``balances`` admin shell (typer + rich). Fixed command names: DESIGN.md "Admin shell".

Every read command has ``--json``. The actor is ``--as NAME``, else the OS user. ``admin grant`` is the
bootstrap (whoever reaches the database may run it); every other command checks the actor's roles.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from app.config import ConfigError, Settings, get_settings
from app.contract import OpenBankingGetBalancesOutput
from app.errors import InvalidInput, PolicyDenied, Reason, RefreshError
from app.jsonio import dumps
from app.policy import ADMIN, Actor, default_actor_name, validate_actor_name

cli = typer.Typer(no_args_is_help=True, add_completion=False, help="Balance refresh admin shell (Powens).")
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
tenant_cli = typer.Typer(no_args_is_help=True, help="Tenants.")
powens_cli = typer.Typer(no_args_is_help=True, help="Powens users.")
accounts_cli = typer.Typer(no_args_is_help=True, help="Bank accounts (openbanking.accounts.sync).")
admin_cli = typer.Typer(no_args_is_help=True, help="Roles of actors (bootstrap: whoever reaches the DB).")
sandbox_cli = typer.Typer(no_args_is_help=True, help="The local Powens-compatible sandbox server.")
run_cli = typer.Typer(no_args_is_help=True, help="Nightly runs (the pipeline beat starts).")
cli.add_typer(db_cli, name="db")
cli.add_typer(tenant_cli, name="tenant")
cli.add_typer(powens_cli, name="powens")
cli.add_typer(accounts_cli, name="accounts")
cli.add_typer(admin_cli, name="admin")
cli.add_typer(sandbox_cli, name="sandbox")
cli.add_typer(run_cli, name="run")

out = Console()
err = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_TIMEOUT = 4

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant id.")]


class State:
    actor_name: str = ""


state = State()


@cli.callback()
def main_callback(
    as_: Annotated[str | None, typer.Option("--as", help="Act as this actor (default: the OS user).")] = None,
) -> None:
    name = as_ or default_actor_name()
    from app import logs

    settings = _settings()
    # Structured logs (and telemetry events such as an audited denial) go to stderr; stdout stays
    # the command's output.
    logs.configure(
        "WARNING" if settings.log_level.upper() == "INFO" else settings.log_level, settings.log_format
    )
    logging.getLogger("openbanking.telemetry").setLevel(logging.INFO)
    try:
        state.actor_name = validate_actor_name(name)
    except InvalidInput as exc:
        _fail(Reason.INVALID_INPUT, exc.message, EXIT_USAGE, as_json=False)


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


def _now() -> datetime:
    return datetime.now(UTC)


def _fail(reason: Reason, message: str, code: int, *, as_json: bool) -> NoReturn:
    if as_json:
        out.print_json(dumps({"error": {"reason": reason.value, "message": message}}))
    else:
        err.print(f"[red]{reason.value}:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _fail_from(exc: RefreshError, as_json: bool) -> NoReturn:
    code = (
        EXIT_DENIED
        if isinstance(exc, PolicyDenied)
        else EXIT_USAGE
        if exc.reason is Reason.INVALID_INPUT
        else EXIT_FAILED
    )
    _fail(exc.reason, exc.message, code, as_json=as_json)


def _actor(settings: Settings) -> Actor:
    from app.refresh import resolve_actor

    return resolve_actor(state.actor_name, settings)


def _require(settings: Settings, *, admin: bool, as_json: bool, what: str) -> Actor:
    actor = _actor(settings)
    if (admin and ADMIN not in actor.roles) or (not admin and not actor.roles):
        need = '"admin"' if admin else "a role"
        _fail(
            Reason.POLICY_DENIED,
            f"{what} requires {need} (actor {actor.name!r} has "
            f"{', '.join(sorted(actor.roles)) or 'no role'}); "
            f"an operator grants it with `balances admin grant {actor.name}`",
            EXIT_DENIED,
            as_json=as_json,
        )
    return actor


def _print(obj: Any) -> None:
    out.print_json(dumps(obj), highlight=False) if out.is_terminal else print(dumps(obj, indent=2))


# -- db ------------------------------------------------------------------------------------------------


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to DATABASE_URL."""
    from app.store.migrate import current_revision, upgrade

    settings = _settings()
    upgrade(settings)
    err.print(f"database at revision {current_revision(settings)}")


# -- tenants --------------------------------------------------------------------------------------------


@tenant_cli.command("add")
def tenant_add(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id (1-128 characters).")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
) -> None:
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    _require(settings, admin=True, as_json=False, what="tenant add")
    if not 1 <= len(tenant_id.strip()) <= 128:
        _fail(Reason.INVALID_INPUT, "tenant id must be 1 to 128 characters", EXIT_USAGE, as_json=False)
    with session_scope(settings) as session:
        _, created = repo.add_tenant(session, tenant_id.strip(), name or tenant_id, _now())
    err.print(f"tenant {tenant_id} {'added' if created else 'already exists'}")


@tenant_cli.command("list")
def tenant_list(json_: JsonOpt = False) -> None:
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    _require(settings, admin=False, as_json=json_, what="tenant list")
    with session_scope(settings) as session:
        tenants = repo.list_tenants(session, active_only=False)
    if json_:
        _print([{"id": t.id, "name": t.name, "active": t.active, "createdAt": t.created_at} for t in tenants])
        return
    table = Table("id", "name", "active", "created")
    for t in tenants:
        table.add_row(t.id, t.name, str(t.active), t.created_at.isoformat(timespec="seconds"))
    out.print(table)


# -- Powens users ---------------------------------------------------------------------------------------


@powens_cli.command("link")
def powens_link(
    tenant: TenantOpt,
    user_id: Annotated[int, typer.Option("--user-id", help="Powens id_user.")],
) -> None:
    """Store a Powens user's permanent token, read from stdin (never from argv), encrypted at rest."""
    from app.accounts import link_powens_user

    settings = _settings()
    _require(settings, admin=True, as_json=False, what="powens link")
    if sys.stdin.isatty():
        import getpass

        token = getpass.getpass("Powens permanent token: ")
    else:
        token = sys.stdin.readline()
    try:
        created = link_powens_user(settings, tenant, user_id, token, _now())
    except (ValueError, ConfigError) as exc:
        _fail(Reason.INVALID_INPUT, str(exc), EXIT_USAGE, as_json=False)
    except RefreshError as exc:
        _fail_from(exc, False)
    err.print(f"Powens user {user_id} {'linked to' if created else 'token replaced for'} tenant {tenant}")


# -- accounts -------------------------------------------------------------------------------------------


@accounts_cli.command("sync")
def accounts_sync(tenant: TenantOpt, json_: JsonOpt = False) -> None:
    """Discover the tenant's accounts at Powens and register them."""
    from app.accounts import sync_accounts
    from app.refresh import Deps

    settings = _settings()
    actor = _actor(settings)
    try:
        result = sync_accounts(tenant, actor, Deps.default(settings))
    except (RefreshError, ConfigError) as exc:
        if isinstance(exc, ConfigError):
            _fail(Reason.INVALID_INPUT, str(exc), EXIT_USAGE, as_json=json_)
        _fail_from(exc, json_)
    if json_:
        _print(result.as_contract())
    else:
        err.print(
            f"synced {result.synced} accounts ({result.created} new), {result.failed} Powens users failed"
        )
        for e in result.errors:
            err.print(f"  [yellow]{e}[/]", highlight=False)
    if result.failed:
        raise typer.Exit(EXIT_FAILED)


@accounts_cli.command("list")
def accounts_list(tenant: TenantOpt, json_: JsonOpt = False) -> None:
    from app.accounts import account_records

    settings = _settings()
    _require(settings, admin=True, as_json=json_, what="accounts list")
    records = account_records(settings, tenant)
    if json_:
        _print([r.model_dump() for r in records])
        return
    table = Table(
        "id", "Powens id", "name", "type", "currency", "status", "connection state", "last refreshed"
    )
    for r in records:
        meta = r.metadata or {}
        last = meta.get("lastRefreshedAt")
        table.add_row(
            r.id,
            r.externalId,
            r.displayName,
            r.accountType,
            r.currency,
            str(meta.get("status")),
            str(meta.get("connectionState") or "ok"),
            last.isoformat(timespec="seconds") if last else "never",
        )
    out.print(table)


# -- refresh --------------------------------------------------------------------------------------------


@cli.command("refresh")
def refresh_cmd(
    tenant: TenantOpt,
    account: Annotated[str, typer.Option("--account", "-a", help="Canonical account id.")],
    connection: Annotated[str | None, typer.Option("--connection", help="Canonical connection id.")] = None,
    balance_type: Annotated[
        list[str] | None, typer.Option("--balance-type", help="Only this balance type (repeatable).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Force a bank sync first (4 per 24 h).")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the task id and return.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the outcome.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Refresh one account's balances (openbanking.balances.refresh) on a worker."""
    from app.refresh import Deps, Trigger, check_policy, outcome_for_task
    from app.tasks import dispatch_refresh

    settings = _settings()
    raw: dict[str, Any] = {"tenantId": tenant, "accountId": account}
    if connection:
        raw["connectionId"] = connection
    if balance_type:
        raw["balanceTypes"] = balance_type
    if force:
        raw["forceRefresh"] = True
    try:
        check_policy(raw, state.actor_name, Trigger.ON_DEMAND, deps=Deps.default(settings))
    except RefreshError as exc:
        _fail_from(exc, json_)
    try:
        task_id = dispatch_refresh(raw, state.actor_name, Trigger.ON_DEMAND)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        _fail(
            Reason.INTERNAL,
            f"could not publish to the broker ({type(exc).__name__}): is Redis up at CELERY_BROKER_URL?",
            EXIT_FAILED,
            as_json=json_,
        )
    if no_wait:
        if json_:
            _print({"taskId": task_id})
        else:
            print(task_id)
        return
    limit = timeout or settings.max_attempts * (settings.task_time_limit + settings.retry_cap_seconds)
    deadline = time.monotonic() + limit
    with (
        err.status(f"refreshing {account} (task {task_id})…", spinner="dots") if err.is_terminal else _null()
    ):
        while True:
            try:
                output = outcome_for_task(settings, task_id, raw)
            except RefreshError as exc:
                _fail_from(exc, json_)
            if output is not None:
                break
            if time.monotonic() > deadline:
                _fail(
                    Reason.INTERNAL,
                    f"no outcome for task {task_id} after {limit:.0f}s: is a worker "
                    "consuming the 'interactive' queue?",
                    EXIT_TIMEOUT,
                    as_json=json_,
                )
            time.sleep(0.2)
    if json_:
        _print(output)
        return
    _balances_table(output.balances, title=f"Refreshed at {output.refreshedAt.isoformat(timespec='seconds')}")
    for e in output.errors or []:
        err.print(f"[yellow]note:[/] {e}", highlight=False)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _balances_table(records: Any, title: str | None = None) -> None:
    table = Table("account", "type", "current", "available", "currency", "last updated (UTC)", title=title)
    for r in records:
        table.add_row(
            r.accountId,
            r.balanceType,
            f"{r.currentBalance:,.2f}",
            "" if r.availableBalance is None else f"{r.availableBalance:,.2f}",
            r.currency,
            r.lastUpdatedAt.strftime("%Y-%m-%d %H:%M:%S"),
        )
    out.print(table)


# -- show (openbanking.balances.get) --------------------------------------------------------------------


@cli.command("show")
def show(
    tenant: TenantOpt,
    account: Annotated[str | None, typer.Option("--account", "-a")] = None,
    balance_type: Annotated[list[str] | None, typer.Option("--balance-type")] = None,
    json_: JsonOpt = False,
) -> None:
    """Canonical balance records from the store (no Powens call)."""
    from app.refresh import to_record
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    _require(settings, admin=False, as_json=json_, what="show")
    with session_scope(settings) as session:
        rows = repo.latest_balances(session, tenant, account, balance_type)
        records = [to_record(r) for r in rows]
        as_of = max((r.refreshed_at for r in rows), default=None)
    result = OpenBankingGetBalancesOutput(balances=records, asOf=as_of)
    if json_:
        _print(result)
        return
    _balances_table(records, title=f"Balances of {tenant}")


# -- nightly runs -----------------------------------------------------------------------------------------


@run_cli.command("nightly")
def run_nightly(
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the run id and return.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the run to finish.")] = 6 * 3600,
    json_: JsonOpt = False,
) -> None:
    """Start the nightly pipeline now (refresh every active account, then summaries and forecasts)."""
    from app import pipeline
    from app.tasks import enqueue_plan

    settings = _settings()
    actor = _require(settings, admin=True, as_json=json_, what="run nightly")
    run_id, _ = pipeline.start_run(settings, trigger="manual", actor=actor.name)
    try:
        enqueue_plan(run_id)
    except Exception as exc:
        _fail(
            Reason.INTERNAL,
            f"could not publish to the broker ({type(exc).__name__})",
            EXIT_FAILED,
            as_json=json_,
        )
    if no_wait:
        _print({"runId": run_id}) if json_ else print(run_id)
        return
    status = watch_run(settings, run_id, timeout=timeout, console=err)
    if json_:
        _print(status)
    else:
        _print_status(status)
    if status is None or status["status"] != "completed":
        raise typer.Exit(
            EXIT_TIMEOUT if status and status["status"] in ("planning", "running") else EXIT_FAILED
        )


def watch_run(settings: Settings, run_id: str, *, timeout: float, console: Console) -> dict[str, Any] | None:
    """A progress bar (accounts done / failed / remaining) until the run leaves planning/running."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from app import pipeline

    deadline = time.monotonic() + timeout
    status = pipeline.run_status(settings, run_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        bar = progress.add_task(run_id, total=None, detail="planning")
        while status is not None:
            acc = status["accounts"]
            done = acc["succeeded"] + acc["failed"] + acc["stale"]
            progress.update(
                bar,
                total=acc["total"] or None,
                completed=done,
                detail=f"ok {acc['succeeded']}  failed {acc['failed']}  stale {acc['stale']}  "
                f"remaining {acc['pending']}  [{status['status']}]",
            )
            if status["status"] not in ("pending", "planning", "running") or time.monotonic() > deadline:
                break
            time.sleep(0.25)
            status = pipeline.run_status(settings, run_id)
    return status


def _print_status(status: dict[str, Any] | None) -> None:
    if status is None:
        err.print("no such run")
        return
    acc = status["accounts"]
    table = Table(
        "run", "status", "accounts", "ok", "failed", "stale", "pending", "duration", "failures by reason"
    )
    table.add_row(
        status["runId"],
        status["status"],
        str(acc["total"]),
        str(acc["succeeded"]),
        str(acc["failed"]),
        str(acc["stale"]),
        str(acc["pending"]),
        f"{status['durationSeconds']:.1f}s",
        ", ".join(f"{k} {v}" for k, v in status["failuresByReason"].items()) or "-",
    )
    out.print(table)
    for s in status["staleAccounts"][:20]:
        out.print(f"  stale: {s['tenantId']} {s['accountId']}", highlight=False)


@run_cli.command("status")
def run_status_cmd(
    run_id: Annotated[str | None, typer.Argument(help="Run id (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Per-run counts, duration, failures by reason, stale accounts."""
    from app import pipeline

    settings = _settings()
    _require(settings, admin=False, as_json=json_, what="run status")
    status = pipeline.run_status(settings, run_id)
    if status is None:
        _fail(Reason.NOT_FOUND, f"no run {run_id or ''}".strip(), EXIT_FAILED, as_json=json_)
    _print(status) if json_ else _print_status(status)


@run_cli.command("sweep")
def run_sweep(json_: JsonOpt = False) -> None:
    """Run the sweeper once now (beat runs it every BALANCES_SWEEP_INTERVAL_SECONDS)."""
    from app.tasks import sweep_runs

    settings = _settings()
    _require(settings, admin=True, as_json=json_, what="run sweep")
    report = sweep_runs.run()
    _print(report) if json_ else err.print(report)


# -- reports --------------------------------------------------------------------------------------------


@cli.command("summary")
def summary_cmd(
    tenant: TenantOpt, run: Annotated[str | None, typer.Option("--run")] = None, json_: JsonOpt = False
) -> None:
    """The tenant's stored summary of a run (default: its latest)."""
    from app.reports.summary import latest_summary
    from app.store.db import session_scope

    settings = _settings()
    _require(settings, admin=False, as_json=json_, what="summary")
    with session_scope(settings) as session:
        summary = latest_summary(session, tenant, run)
    if summary is None:
        _fail(Reason.NOT_FOUND, f"no summary for tenant {tenant!r}", EXIT_FAILED, as_json=json_)
    if json_:
        _print(summary)
        return
    print_summary(out, summary)


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    acc = summary["accounts"]
    console.print(
        f"[bold]{summary['tenantId']}[/] — run {summary['runId']}, business day {summary['businessDay']}: "
        f"{acc['refreshed']} refreshed, {acc['failed']} failed, {acc['stale']} stale",
        highlight=False,
    )
    table = Table("currency", "accounts", "current", "available", "coming", "day over day")
    for t in summary["totals"]:
        dod = t.get("dayOverDay")
        table.add_row(
            t["currency"],
            str(t["accounts"]),
            f"{t['current']:,.2f}",
            f"{t['available']:,.2f}",
            f"{t['coming']:,.2f}",
            "n/a (no snapshot yesterday)" if not dod else f"{dod['change']:+,.2f}",
        )
    console.print(table)
    for f in summary["failedAccounts"]:
        console.print(f"  failed: {f['name']} ({f['accountId']}): {f['reason']}", highlight=False)
    for c in summary["connectionsNeedingUser"]:
        console.print(
            f"  needs the user: connection {c['powensConnectionId']} ({c['state']}): {c['reconnectUrl']}",
            highlight=False,
        )


@cli.command("forecast")
def forecast_cmd(
    tenant: TenantOpt, run: Annotated[str | None, typer.Option("--run")] = None, json_: JsonOpt = False
) -> None:
    """The tenant's stored cashflow forecast per currency (default: the latest run's)."""
    from app.reports.jobs import latest_forecasts

    settings = _settings()
    _require(settings, admin=False, as_json=json_, what="forecast")
    forecasts = latest_forecasts(settings, tenant, run)
    if not forecasts:
        _fail(Reason.NOT_FOUND, f"no forecast for tenant {tenant!r}", EXIT_FAILED, as_json=json_)
    if json_:
        _print(forecasts)
        return
    for fc in forecasts:
        print_forecast(out, fc)


def print_forecast(console: Console, fc: dict[str, Any], every: int = 5) -> None:
    console.print(
        f"[bold]{fc['tenantId']}[/] {fc['currency']}: {fc['method']} over {fc['historyDays']} days, "
        f"drift {fc['driftPerDay']:+,.2f}/day, coming {fc['coming']:,.2f}"
        + (f" — {fc['note']}" if fc.get("note") else ""),
        highlight=False,
    )
    points = fc["points"]
    table = Table("day", "projected", "lower", "upper", "")
    lo = min(p["lower"] for p in points)
    hi = max(p["upper"] for p in points)
    span = (hi - lo) or 1
    for i, p in enumerate(points):
        if i % every and i != len(points) - 1:
            continue
        width = int(30 * (p["value"] - lo) / span)
        table.add_row(
            p["day"], f"{p['value']:,.2f}", f"{p['lower']:,.2f}", f"{p['upper']:,.2f}", "▇" * max(width, 1)
        )
    console.print(table)


# -- admin ----------------------------------------------------------------------------------------------


@admin_cli.command("grant")
def admin_grant(
    name: Annotated[str, typer.Argument()],
    role: Annotated[str, typer.Option(help="Role to grant.")] = ADMIN,
) -> None:
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    try:
        validate_actor_name(name)
    except InvalidInput as exc:
        _fail(exc.reason, exc.message, EXIT_USAGE, as_json=False)
    with session_scope(settings) as session:
        changed = repo.grant_role(session, name, role, _now())
    err.print(f"{name} {'now has' if changed else 'already has'} role {role}")


@admin_cli.command("revoke")
def admin_revoke(
    name: Annotated[str, typer.Argument()], role: Annotated[str, typer.Option()] = ADMIN
) -> None:
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    _require(settings, admin=True, as_json=False, what="admin revoke")
    with session_scope(settings) as session:
        changed = repo.revoke_role(session, name, role, _now())
    err.print(f"{name} {'no longer has' if changed else 'did not have'} role {role}")


@admin_cli.command("list")
def admin_list(json_: JsonOpt = False) -> None:
    from app.store import repo
    from app.store.db import session_scope

    settings = _settings()
    with session_scope(settings) as session:
        actors = repo.list_actors(session)
    if json_:
        _print([{"name": a.name, "roles": list(a.roles), "updatedAt": a.updated_at} for a in actors])
        return
    table = Table("actor", "roles", "updated")
    for a in actors:
        table.add_row(a.name, ", ".join(a.roles) or "-", a.updated_at.isoformat(timespec="seconds"))
    out.print(table)


# -- sandbox and demo -----------------------------------------------------------------------------------


@sandbox_cli.command("serve")
def sandbox_serve(
    host: str = "127.0.0.1",
    port: int = 8765,
    seed: int = 42,
    users: Annotated[int, typer.Option(help="Powens users to create at start.")] = 0,
    latency_ms: float = 0.0,
    fault_rate: Annotated[float, typer.Option(help="Probability of a 503 on a data call.")] = 0.0,
    rate_limit_rate: Annotated[float, typer.Option(help="Probability of a 429 on a data call.")] = 0.0,
    retry_after: Annotated[float, typer.Option(help="Retry-After seconds sent with a 429.")] = 1.0,
    accounts_per_connection: int = 2,
    connections_per_user: int = 1,
) -> None:
    """Serve the Powens-compatible sandbox until interrupted (admin routes under /_sandbox/)."""
    from app.powens.sandbox import Knobs, SandboxHTTPServer, SandboxState

    knobs = Knobs(
        latency_ms=latency_ms,
        fault_rate=fault_rate,
        rate_limit_rate=rate_limit_rate,
        retry_after=retry_after,
        accounts_per_connection=accounts_per_connection,
        connections_per_user=connections_per_user,
    )
    sstate = SandboxState(seed=seed, knobs=knobs)
    for _ in range(users):
        sstate.create_user()
    server = SandboxHTTPServer((host, port), sstate)
    err.print(f"Powens sandbox on http://{host}:{server.server_address[1]}/2.0/ (seed {seed}, {users} users)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.command("demo")
def demo_cmd(
    tenants: Annotated[int, typer.Option(help="Demo tenants to seed.")] = 3,
) -> None:
    """Seed demo tenants against a local sandbox and refresh every account (no services needed)."""
    from app.demo import run_demo

    code = run_demo(tenants=tenants, console=out)
    raise typer.Exit(code)


def main() -> None:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        cli()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        sys.exit(EXIT_USAGE)
    except (OperationalError, ProgrammingError) as exc:
        # The DB error's text may quote the URL; say what is wrong without echoing it.
        err.print(
            "[red]database error:[/] the database at DATABASE_URL is unreachable or its schema is not "
            f"current ({type(exc.orig).__name__}); run `balances db upgrade`",
            highlight=False,
        )
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
