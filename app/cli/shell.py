"""What every ``balances`` command shares: the typer apps, the acting actor, output, failures, and the
one authorization step (``authorized``) that runs ``app.policy.authorize`` for the command's operation.
"""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Annotated, Any, NoReturn, TextIO, TypeVar

import typer
from rich.console import Console

from app.cli.output import write_json
from app.config import ConfigError, Settings, get_settings
from app.contract import OperationMeta
from app.errors import InvalidInput, PolicyDenied, Reason, RefreshError
from app.policy import ANONYMOUS, Actor, authorize, default_actor_name, validate_actor_name

cli = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Balance refresh admin shell (Powens).",
    pretty_exceptions_show_locals=False,  # a crash must never print a token read from stdin
    # Plain help: a flag is `--force`, not `--force <bool>`, and nothing is boxed or cut in a pipe.
    rich_markup_mode=None,
)


def _group(help_text: str) -> typer.Typer:
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=help_text)


db_cli = _group("Database schema.")
tenant_cli = _group("Tenants.")
powens_cli = _group("Powens users.")
accounts_cli = _group("Bank accounts (openbanking.accounts.sync).")
admin_cli = _group("Roles of actors (bootstrap: whoever reaches the DB).")
sandbox_cli = _group("The local Powens-compatible sandbox server.")
run_cli = _group("Nightly runs (the pipeline beat starts).")
connections_cli = _group("Bank connections (reconnect links).")
keys_cli = _group("Encryption keys of stored Powens tokens.")
webhooks_cli = _group("The receiver of Powens' pushes (webhooks).")
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

# Off a terminal (a pipe, a file, a log) no width applies: a table keeps every column whole, a line is
# never broken where rich would have wrapped it, and there is no colour.
WIDE = 4096


def console(*, stderr: bool = False) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return Console(stderr=stderr, soft_wrap=stderr)  # one error, one line, whatever the width
    return Console(stderr=stderr, width=WIDE, no_color=True, highlight=False, soft_wrap=True)


out = console()
err = console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DENIED = 3
EXIT_TIMEOUT = 4
# How long the shell asks the broker which workers consume a queue before it publishes.
PING_SECONDS = 2.0

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def finite(value: float | None) -> float | None:
    """A typer callback: ``nan`` and ``inf`` pass click's ranges, not ours."""
    import math

    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number of seconds")
    return value


TenantOpt = Annotated[str, typer.Option("--tenant", "-t", help="Tenant id.")]
BalanceTypeOpt = Annotated[
    list[str] | None,
    typer.Option("--balance-type", help="Only this balance type: current or uncleared (repeatable)."),
]


class State:
    actor_name: str = ""


state = State()


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("balances-refresh")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown"
        print(f"balances {number} (openbanking.balances.refresh v1.0.0)")
        raise typer.Exit()


@cli.callback()
def main_callback(
    as_: Annotated[
        str | None,
        typer.Option(
            "--as", metavar="NAME", help="Act as this actor (default: BALANCES_ACTOR, else the OS user)."
        ),
    ] = None,
    _version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    from app.ops import logs

    settings = load()
    name = as_ or settings.actor or default_actor_name()
    # Log records and telemetry events (an audited denial) go to the log stream, never stdout (the
    # command's output) and never between the lines an operator reads on a terminal.
    logs.configure(
        "WARNING" if settings.log_level.upper() == "INFO" else settings.log_level,
        settings.log_format,
        stream=log_stream(settings),
    )
    logging.getLogger("openbanking.telemetry").setLevel(logging.INFO)
    try:
        state.actor_name = validate_actor_name(name)
    except InvalidInput as exc:
        fail(Reason.INVALID_INPUT, exc.message, EXIT_USAGE, as_json=False)


def log_stream(settings: Settings) -> TextIO:
    """BALANCES_SHELL_LOG when set; stderr off a terminal (whoever runs the shell in a job keeps its
    log); on a terminal, a file in the user's state directory (stderr if it cannot be opened)."""
    if not settings.shell_log and not sys.stderr.isatty():
        return sys.stderr
    path = settings.shell_log_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("a", encoding="utf-8")
    except OSError:
        if settings.shell_log:  # asked for by name: say so
            err.print(f"[yellow]note:[/] cannot write BALANCES_SHELL_LOG ({path}): logging to stderr")
        return sys.stderr
    atexit.register(stream.close)
    return stream


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


def ready_to_publish(settings: Settings, queue: str, *, as_json: bool) -> None:
    """Before anything is published (or a run created): this shell can sign its messages, and a
    worker consumes ``queue`` now. Each says what is missing, in a few seconds at most."""
    from app.worker.presence import BrokerUnreachable, consumers

    if settings.signing_key is None:
        fail(
            Reason.INVALID_INPUT,
            "BALANCES_SIGNING_KEY is not set: the shell signs what it publishes with the workers' key "
            "(nothing was published)",
            EXIT_USAGE,
            as_json=as_json,
        )
    try:
        with spinner(f"asking the broker which workers consume '{queue}'…"):
            present = consumers(queue, timeout=PING_SECONDS)
    except BrokerUnreachable as exc:
        fail(
            Reason.INTERNAL,  # our own infrastructure (Powens is provider_unavailable's)
            f"{exc}: is it up at CELERY_BROKER_URL? (nothing was published)",
            EXIT_FAILED,
            as_json=as_json,
        )
    if not present.consuming:
        others = f" ({len(present.workers)} answered, none consuming it)" if present.workers else ""
        fail(
            Reason.INTERNAL,  # our own infrastructure (Powens is provider_unavailable's)
            f"no worker consumes the '{queue}' queue{others}: start one (celery -A app worker) and try "
            "again (nothing was published)",
            EXIT_FAILED,
            as_json=as_json,
        )


def spinner(text: str) -> AbstractContextManager[object]:
    """A spinner saying what the shell waits for, on a terminal; nothing in a pipe or a log."""
    return err.status(text, spinner="dots") if err.is_terminal else nullcontext()


def or_fail(call: Callable[[], T], *, as_json: bool) -> T:
    """``call``'s answer, or its failure (a RefreshError) as the shell's one line and exit code."""
    try:
        return call()
    except RefreshError as exc:
        fail_from(exc, as_json)


def known_tenant(settings: Settings, tenant_id: str, *, as_json: bool) -> None:
    """The tenant a command names exists (``not_found``) and is an id (``invalid_input``), as every
    listing checks it: before anything is read for it, or from Powens."""
    from app.store import repo
    from app.store.db import session_scope

    def check() -> None:
        with session_scope(settings) as session:
            repo.require_tenant(session, tenant_id)

    or_fail(check, as_json=as_json)


def publish_or_fail(publish: Callable[[], T], *, as_json: bool) -> T:
    """Publish to the broker; an unreachable broker is one clear line, whatever kombu raised."""
    from app.signing import SigningKeyMissing

    try:
        return publish()
    except SigningKeyMissing as exc:
        fail(Reason.INVALID_INPUT, f"{exc} (nothing was published)", EXIT_USAGE, as_json=as_json)
    except Exception as exc:  # kombu raises several types for an unreachable broker
        fail(
            Reason.INTERNAL,
            f"could not publish to the broker ({type(exc).__name__}): is it up at CELERY_BROKER_URL?",
            EXIT_FAILED,
            as_json=as_json,
        )


def acting(settings: Settings, *, as_json: bool = False) -> Actor:
    from app.refresh.deps import Deps

    require_database(settings, as_json=as_json)
    return Deps(settings).actor(state.actor_name)


def require_database(settings: Settings, *, as_json: bool = False) -> None:
    """An embedded database file that is not there is not created by a command that only meant to use
    it (run from another directory, the default ``balances.db`` is another file): say where it looked.
    Only ``balances db upgrade`` and ``balances demo`` create one."""
    path = settings.sqlite_path
    if path is None or path.exists():
        return
    where = (
        "DATABASE_URL"
        if "database_url" in settings.model_fields_set
        else "DATABASE_URL is unset: the embedded file of the current directory"
    )
    fail(
        Reason.NOT_FOUND,
        f"no database at {path} ({where}): run `make demo` or `balances db upgrade` there, "
        "or set DATABASE_URL",
        EXIT_FAILED,
        as_json=as_json,
    )


def authorized(operation: OperationMeta, *, as_json: bool = False) -> tuple[Settings, Actor]:
    """The command's settings and actor, once the actor meets the operation's auth level."""
    settings = load()
    if operation.policy_auth == ANONYMOUS:  # no lookup: it must work before the schema exists
        return settings, Actor(state.actor_name)
    actor = acting(settings, as_json=as_json)
    try:
        authorize(operation, actor)
    except PolicyDenied as exc:
        from app.admin.manage import record_denial

        record_denial(settings, actor, operation.qualified_name, exc.message)
        fail(exc.reason, f"{exc.message}; {grant_hint(settings, actor.name)}", EXIT_DENIED, as_json=as_json)
    return settings, actor


def grant_hint(settings: Settings, name: str) -> str:
    """The command that would let ``name`` in, as it must be typed: an admin grants (by name), except
    while nobody is admin (the bootstrap)."""
    from app.store import repo
    from app.store.db import session_scope

    with session_scope(settings) as session:
        admins = repo.admins(session)
    if not admins:
        return f"the first admin is made with `balances admin grant {name}`"
    return f"an admin grants it: `balances --as {admins[0]} admin grant {name}`"


def print_json(obj: Any, console: Console | None = None) -> None:
    write_json(obj, console or out)


def read_secret(prompt: str) -> str:
    """A secret from stdin, never from argv."""
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(prompt)
    return sys.stdin.readline()
