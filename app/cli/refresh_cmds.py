"""Commands about balances and accounts: ``refresh``, ``show``, ``accounts sync|list``."""

from __future__ import annotations

from typing import Annotated

import typer

from app.admin import operations as ops
from app.cli.output import Format, FormatOpt, chosen, fit, listing, stamp
from app.cli.render import account_cols, balance_cols
from app.cli.shell import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    BalanceTypeOpt,
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
    known_tenant,
    load,
    or_fail,
    out,
    print_json,
    publish_or_fail,
    ready_to_publish,
    require_database,
    spinner,
    state,
)
from app.config import ConfigError
from app.errors import Reason, RefreshError

# How long `refresh` waits for its outcome unless told: an on-demand refresh takes under a second
# (p95 0.55 s at the full benchmark size); a minute covers Powens' slow answers and a retry or two.
REFRESH_WAIT_SECONDS = 60.0


@cli.command("refresh")
def refresh_cmd(
    tenant: TenantOpt,
    account: Annotated[str, typer.Option("--account", "-a", help="Canonical account id.")],
    connection: Annotated[str | None, typer.Option("--connection", help="Canonical connection id.")] = None,
    balance_type: BalanceTypeOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Force a bank sync first (at most 4 per connection per 24 h).")
    ] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the task id and return.")] = False,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            max=86_400.0,
            callback=finite,
            help="Seconds to wait for the outcome (the refresh goes on after that).",
        ),
    ] = REFRESH_WAIT_SECONDS,
    json_: JsonOpt = False,
) -> None:
    """Refresh one account's balances (openbanking.balances.refresh) on a worker, and wait for it."""
    from app.refresh.deps import Deps
    from app.refresh.handler import check_policy
    from app.refresh.outcomes import Failed, wait_for
    from app.store.states import Trigger
    from app.worker.queues import Queue
    from app.worker.tasks import dispatch_refresh

    settings = load()
    require_database(settings, as_json=json_)  # it checks the policy itself, not through `authorized`
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
    ready_to_publish(settings, Queue.INTERACTIVE, as_json=json_)
    task_id = publish_or_fail(
        lambda: dispatch_refresh(inp, state.actor_name, Trigger.ON_DEMAND), as_json=json_
    )
    if no_wait:
        print_json({"taskId": task_id}) if json_ else print(task_id)
        return
    with spinner(f"waiting for a worker to refresh {account} (task {task_id}, up to {timeout:.0f} s)…"):
        outcome = wait_for(settings, task_id, inp.balance_types, timeout=timeout)
    if outcome is None:
        fail(
            Reason.INTERNAL,
            f"no outcome for task {task_id} within {timeout:.0f} s: it is still queued or running (a slow "
            f"Powens, retries); its outcome will be in `balances show --tenant {tenant} --account "
            f"{account}`, or wait longer with --timeout",
            EXIT_TIMEOUT,
            as_json=json_,
        )
    if isinstance(outcome, Failed):
        fail_from(outcome.error, json_)
    output = outcome.output
    if json_:
        print_json(output)
        return
    title = f"Refreshed at {stamp(output.refreshed_at)}"
    out.print(fit(out, output.balances, balance_cols(), title=title))
    for e in output.errors or []:
        err.print(f"[yellow]note:[/] {e}", highlight=False)


@cli.command("show")
def show(
    tenant: TenantOpt,
    account: Annotated[str | None, typer.Option("--account", "-a", help="Only this account.")] = None,
    balance_type: BalanceTypeOpt = None,
    fmt: FormatOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Canonical balance records from the store (openbanking.balances.get; no Powens call)."""
    from app.refresh.records import get_balances

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.SHOW, as_json=form is Format.JSON)
    result = or_fail(
        lambda: get_balances(settings, tenant, account, balance_type), as_json=form is Format.JSON
    )
    listing(
        out,
        result.balances,
        balance_cols(settings),
        form,
        result,
        title=f"Balances of {tenant}",
        empty=f"tenant {tenant} has no balance recorded yet",
    )


@accounts_cli.command("sync")
def accounts_sync(tenant: TenantOpt, json_: JsonOpt = False) -> None:
    """Discover the tenant's accounts at Powens and register them."""
    from app.admin.accounts import sync_accounts
    from app.refresh.deps import Deps

    settings, actor = authorized(ops.ACCOUNTS_SYNC, as_json=json_)
    known_tenant(settings, tenant, as_json=json_)
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
def accounts_list(tenant: TenantOpt, fmt: FormatOpt = None, json_: JsonOpt = False) -> None:
    """The tenant's bank accounts (BankAccountRecord), with their bank data's age and connection state."""
    from app.refresh.records import account_records

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.ACCOUNTS_LIST, as_json=form is Format.JSON)
    records = or_fail(lambda: account_records(settings, tenant), as_json=form is Format.JSON)
    listing(
        out,
        records,
        account_cols(settings),
        form,
        records,
        title=f"Accounts of {tenant}",
        empty=f"tenant {tenant} has no account yet: balances accounts sync --tenant {tenant}",
    )


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
