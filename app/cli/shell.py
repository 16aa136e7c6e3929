"""What every ``balances`` command shares: the typer apps, the acting actor, output, failures, and the
one authorization step (``authorized``) that runs ``app.policy.authorize`` for the command's operation.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.syntax import Syntax

from app.config import ConfigError, Settings, get_settings
from app.contract import OperationMeta
from app.errors import InvalidInput, PolicyDenied, Reason, RefreshError
from app.jsonio import dumps
from app.policy import ANONYMOUS, Actor, authorize, default_actor_name, validate_actor_name

cli = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Balance refresh admin shell (Powens).",
    pretty_exceptions_show_locals=False,  # a crash must never print a token read from stdin
)
db_cli = typer.Typer(no_args_is_help=True, help="Database schema.")
tenant_cli = typer.Typer(no_args_is_help=True, help="Tenants.")
powens_cli = typer.Typer(no_args_is_help=True, help="Powens users.")
accounts_cli = typer.Typer(no_args_is_help=True, help="Bank accounts (openbanking.accounts.sync).")
admin_cli = typer.Typer(no_args_is_help=True, help="Roles of actors (bootstrap: whoever reaches the DB).")
sandbox_cli = typer.Typer(no_args_is_help=True, help="The local Powens-compatible sandbox server.")
run_cli = typer.Typer(no_args_is_help=True, help="Nightly runs (the pipeline beat starts).")
connections_cli = typer.Typer(no_args_is_help=True, help="Bank connections (reconnect links).")
keys_cli = typer.Typer(no_args_is_help=True, help="Encryption keys of stored Powens tokens.")
webhooks_cli = typer.Typer(no_args_is_help=True, help="The receiver of Powens' pushes (webhooks).")
cli.add_typer(db_cli, name="db")
cli.add_typer(tenant_cli, name="tenant")
cli.add_typer(powens_cli, name="powens")
cli.add_typer(accounts_cli, name="accounts")
cli.add_typer(admin_cli, name="admin")
cli.add_typer(sandbox_cli, name="sandbox")
cli.add_typer(run_cli, name="run")
cli.add_typer(connections_cli, name="connections")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(webhooks_cli, name="webhooks")

T = TypeVar("T")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line: never wrapped at 80 columns

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_TIMEOUT = 4

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def finite(value: float | None) -> float | None:
    """A typer callback: ``nan`` and ``inf`` pass click's ranges, not ours."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number of seconds")
    return value


TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant id.")]


class State:
    actor_name: str = ""


state = State()


@cli.callback()
def main_callback(
    as_: Annotated[str | None, typer.Option("--as", help="Act as this actor (default: the OS user).")] = None,
) -> None:
    name = as_ or default_actor_name()
    from app.ops import logs

    settings = load()
    # Structured logs (and telemetry events such as an audited denial) go to stderr; stdout stays
    # the command's output.
    logs.configure(
        "WARNING" if settings.log_level.upper() == "INFO" else settings.log_level, settings.log_format
    )
    logging.getLogger("openbanking.telemetry").setLevel(logging.INFO)
    try:
        state.actor_name = validate_actor_name(name)
    except InvalidInput as exc:
        fail(Reason.INVALID_INPUT, exc.message, EXIT_USAGE, as_json=False)


def load() -> Settings:
    try:
        return get_settings()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(EXIT_USAGE) from None


def fail(
    reason: Reason, message: str, code: int, *, as_json: bool, detail: dict[str, Any] | None = None
) -> NoReturn:
    if as_json:
        print_json({"error": {"reason": reason.value, "message": message, **(detail or {})}})
    else:
        err.print(f"[red]{reason.value}:[/] {message}", highlight=False)
    raise typer.Exit(code)


def fail_from(exc: RefreshError | ConfigError, as_json: bool) -> NoReturn:
    if isinstance(exc, ConfigError):
        fail(Reason.INVALID_INPUT, str(exc), EXIT_USAGE, as_json=as_json)
    code = (
        EXIT_DENIED
        if isinstance(exc, PolicyDenied)
        else EXIT_USAGE
        if exc.reason is Reason.INVALID_INPUT
        else EXIT_FAILED
    )
    fail(
        exc.reason,
        exc.message,
        code,
        as_json=as_json,
        detail={k: v for k, v in exc.as_json()["error"].items() if k not in ("reason", "message")},
    )


def publish_or_fail(publish: Callable[[], T], *, as_json: bool) -> T:
    """Publish to the broker; an unreachable broker is one clear line, whatever kombu raised."""
    from app.signing import SigningKeyMissing

    try:
        return publish()
    except SigningKeyMissing as exc:
        fail(Reason.INVALID_INPUT, str(exc), EXIT_USAGE, as_json=as_json)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        fail(
            Reason.INTERNAL,
            f"could not publish to the broker ({type(exc).__name__}): is it up at CELERY_BROKER_URL?",
            EXIT_FAILED,
            as_json=as_json,
        )


def acting(settings: Settings) -> Actor:
    from app.refresh.deps import Deps

    return Deps(settings).actor(state.actor_name)


def authorized(operation: OperationMeta, *, as_json: bool = False) -> tuple[Settings, Actor]:
    """The command's settings and actor, once the actor meets the operation's auth level."""
    settings = load()
    if operation.policy_auth == ANONYMOUS:  # no lookup: it must work before the schema exists
        return settings, Actor(state.actor_name)
    actor = acting(settings)
    try:
        authorize(operation, actor)
    except PolicyDenied as exc:
        from app.admin.manage import record_denial

        record_denial(settings, actor, operation.qualified_name, exc.message)
        fail(
            exc.reason,
            f"{exc.message}; an operator grants it with `balances admin grant {actor.name}`",
            EXIT_DENIED,
            as_json=as_json,
        )
    return settings, actor


def print_json(obj: Any, console: Console | None = None) -> None:
    """Our own JSON text, money digit for digit; on a terminal, colored as it is (rich's print_json
    would parse it again, through float, and show 12345678901234567.89 as 1.2345678901234568e+16)."""
    console = console or out
    text = dumps(obj, indent=2)
    if console.is_terminal:
        console.print(Syntax(text, "json", background_color="default", word_wrap=True))
    else:
        console.file.write(text + "\n")


def read_secret(prompt: str) -> str:
    """A secret from stdin, never from argv."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt)
    return sys.stdin.readline()
