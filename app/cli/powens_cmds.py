"""Commands about Powens users: ``powens link`` (the token verified with Powens, read from stdin only),
``powens unlink``, ``powens list``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from app.admin import operations as ops
from app.admin.powens_users import UserView
from app.cli.output import Col, Format, FormatOpt, chosen, listing, stamp
from app.cli.shell import (
    JsonOpt,
    TenantOpt,
    authorized,
    err,
    fail_from,
    or_fail,
    out,
    powens_cli,
    print_json,
    read_secret,
)
from app.config import ConfigError
from app.errors import RefreshError

if TYPE_CHECKING:
    from app.admin.powens_users import UserView

UserIdOpt = Annotated[int, typer.Option("--user-id", min=1, max=2**63 - 1, help="Powens id_user.")]


def _accounts(n: int) -> str:
    return f"{n} account{'' if n == 1 else 's'}"


@powens_cli.command("link")
def powens_link(tenant: TenantOpt, user_id: UserIdOpt, json_: JsonOpt = False) -> None:
    """Link a Powens user to a tenant: its permanent token, read from stdin (never from argv), is
    verified with Powens (it must be that user's) before it is stored, encrypted. A user unlinked
    before gets its accounts back in the refreshes."""
    from app.admin.powens_users import link_verified, require_tenant
    from app.refresh.deps import Deps

    settings, actor = authorized(ops.POWENS_LINK, as_json=json_)
    try:
        require_tenant(settings, tenant)  # before anything is read from stdin
    except RefreshError as exc:
        fail_from(exc, json_)
    token = read_secret("Powens permanent token: ")
    try:
        result = link_verified(Deps(settings), actor, tenant, user_id, token)
    except (RefreshError, ConfigError) as exc:
        fail_from(exc, json_)
    if json_:
        print_json(result.as_json())
        return
    said = f"Powens user {user_id} linked to tenant {tenant} (token verified)"
    if result.relinked:
        said += f": linked again, {_accounts(result.restored)} back in the refreshes"
    elif not result.created:
        said += ": the stored token was replaced"
    err.print(said, highlight=False)


@powens_cli.command("unlink")
def powens_unlink(tenant: TenantOpt, user_id: UserIdOpt, json_: JsonOpt = False) -> None:
    """Unlink a Powens user from a tenant: its stored token is deleted and its accounts leave the
    nightly runs, on-demand refreshes and pushes (status ``unlinked``); their balance history stays.
    `powens link` of the same user brings them back."""
    from app.admin.powens_users import unlink
    from app.refresh.deps import Deps

    settings, actor = authorized(ops.POWENS_UNLINK, as_json=json_)
    try:
        result = unlink(Deps(settings), actor, tenant, user_id)
    except (RefreshError, ConfigError) as exc:
        fail_from(exc, json_)
    if json_:
        print_json(result.as_json())
        return
    if result.token_deleted:
        err.print(
            f"Powens user {user_id} unlinked from tenant {tenant}: token deleted, "
            f"{_accounts(result.excluded)} excluded from refreshes; history kept",
            highlight=False,
        )
    else:
        err.print(
            f"Powens user {user_id} was already unlinked from tenant {tenant} "
            f"(since {stamp(result.unlinked_at)}): no token stored, "
            f"{_accounts(result.unlinked_accounts)} out of refreshes; nothing changed",
            highlight=False,
        )


@powens_cli.command("list")
def powens_list(tenant: TenantOpt, fmt: FormatOpt = None, json_: JsonOpt = False) -> None:
    """The tenant's Powens users, linked or not: their accounts and the last refresh of any."""
    from app.admin.powens_users import list_users

    form = chosen(fmt, json_)
    settings, actor = authorized(ops.POWENS_LIST, as_json=form is Format.JSON)
    users = or_fail(lambda: list_users(settings, actor, tenant), as_json=form is Format.JSON)
    cols: list[Col[UserView]] = [
        Col("powens user", lambda u: str(u.powens_user_id), ident=True),
        Col("linked", lambda u: "yes" if u.linked else f"no (since {stamp(u.unlinked_at, '?')[:10]})"),
        Col("accounts", lambda u: str(u.accounts), justify="right"),
        Col(
            "by status",
            lambda u: ", ".join(f"{k} {v}" for k, v in sorted(u.accounts_by_status.items())) or "-",
            drop=2,
        ),
        Col("last refresh", lambda u: stamp(u.last_refreshed_at), drop=1),
    ]
    listing(out, users, cols, form, [u.as_json() for u in users], title=f"Powens users of {tenant}")


def _by_status(user: UserView) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(user.accounts_by_status.items())) or "-"
