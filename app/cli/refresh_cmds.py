"""Commands about balances and accounts: ``refresh``, ``show``, ``accounts sync|list``."""

from __future__ import annotations

from typing import Annotated

import typer

from app.admin import operations as ops
from app.cli.render import accounts_table, balances_table
from app.cli.shell import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    JsonOpt,
    TenantOpt,
    accounts_cli,
    authorized,
    cli,
    connections_cli,
    err,
    fail,
    fail_from,
    finite,
    load,
    out,
    print_json,
    publish_or_fail,
    state,
)
from app.config import ConfigError
from app.errors import Reason, RefreshError


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
    timeout: Annotated[
        float | None,
        typer.Option(min=0.1, max=86_400.0, callback=finite, help="Seconds to wait for the outcome."),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Refresh one account's balances (openbanking.balances.refresh) on a worker."""
    from app.refresh.deps import Deps
    from app.refresh.handler import check_policy
    from app.refresh.outcomes import Failed, wait_for
    from app.store.states import Trigger
    from app.worker.tasks import dispatch_refresh

    settings = load()
    raw: dict[str, object] = {"tenantId": tenant, "accountId": account}
    if connection:
        raw["connectionId"] = connection
    if balance_type:
        raw["balanceTypes"] = balance_type
    if force:
        raw["forceRefresh"] = True
    try:
        # Validated and authorized here, once (a refusal is audited); the task carries the model's JSON.
        inp, _actor = check_policy(raw, state.actor_name, Trigger.ON_DEMAND, deps=Deps(settings))
    except RefreshError as exc:
        fail_from(exc, json_)
    task_id = publish_or_fail(
        lambda: dispatch_refresh(inp, state.actor_name, Trigger.ON_DEMAND), as_json=json_
    )
    if no_wait:
        print_json({"taskId": task_id}) if json_ else print(task_id)
        return
    limit = timeout or settings.max_attempts * (settings.task_time_limit + settings.retry_cap_seconds)
    spinner = err.status(f"refreshing {account} (task {task_id})…", spinner="dots")
    with spinner if err.is_terminal else _Quiet():
        outcome = wait_for(settings, task_id, inp.balance_types, timeout=limit)
    if outcome is None:
        fail(
            Reason.INTERNAL,
            f"no outcome for task {task_id} after {limit:.0f}s: "
            "is a worker consuming the 'interactive' queue?",
            EXIT_TIMEOUT,
            as_json=json_,
        )
    if isinstance(outcome, Failed):
        fail_from(outcome.error, json_)
    output = outcome.output
    if json_:
        print_json(output)
        return
    title = f"Refreshed at {output.refreshed_at.isoformat(timespec='seconds')}"
    balances_table(out, output.balances, title=title)
    for e in output.errors or []:
        err.print(f"[yellow]note:[/] {e}", highlight=False)


class _Quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


@cli.command("show")
def show(
    tenant: TenantOpt,
    account: Annotated[str | None, typer.Option("--account", "-a")] = None,
    balance_type: Annotated[list[str] | None, typer.Option("--balance-type")] = None,
    json_: JsonOpt = False,
) -> None:
    """Canonical balance records from the store (openbanking.balances.get; no Powens call)."""
    from app.refresh.records import get_balances

    settings, _ = authorized(ops.SHOW, as_json=json_)
    result = get_balances(settings, tenant, account, balance_type)
    if json_:
        print_json(result)
        return
    balances_table(out, result.balances, title=f"Balances of {tenant}", settings=settings)


@accounts_cli.command("sync")
def accounts_sync(tenant: TenantOpt, json_: JsonOpt = False) -> None:
    """Discover the tenant's accounts at Powens and register them."""
    from app.admin.accounts import sync_accounts
    from app.refresh.deps import Deps

    settings, actor = authorized(ops.ACCOUNTS_SYNC, as_json=json_)
    try:
        result = sync_accounts(tenant, actor, Deps(settings))
    except (RefreshError, ConfigError) as exc:
        fail_from(exc, json_)
    if json_:
        print_json(result.as_contract())
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
    from app.refresh.records import account_records

    settings, _ = authorized(ops.ACCOUNTS_LIST, as_json=json_)
    records = account_records(settings, tenant)
    if json_:
        print_json(records)
        return
    accounts_table(out, records, settings=settings)


@connections_cli.command("reconnect-link")
def reconnect_link_cmd(
    tenant: TenantOpt,
    connection: Annotated[str, typer.Option("--connection", help="Canonical connection id.")],
    json_: JsonOpt = False,
) -> None:
    """A Powens reconnect link for a connection that needs its user, with a fresh temporary code.
    Made now, shown once, never stored: send it to the end user."""
    from app.admin.connections import reconnect_link
    from app.refresh.deps import Deps

    settings, actor = authorized(ops.RECONNECT_LINK, as_json=json_)
    try:
        url = reconnect_link(Deps(settings), actor, tenant, connection)
    except (RefreshError, ConfigError) as exc:
        fail_from(exc, json_)
    print_json({"reconnectUrl": url}) if json_ else print(url)
