"""The ``balances`` admin shell (typer + rich). Command names are fixed (README "The admin shell").

Every read command has ``--json``. The actor is ``--as NAME``, else the OS user. Every command names
its operation (``app.admin.operations``) and is authorized through ``app.policy.authorize`` first.
"""

from __future__ import annotations

import sys

from app.cli import (  # noqa: F401 - they register their commands
    admin_cmds,
    db_cmds,
    powens_cmds,
    refresh_cmds,
    run_cmds,
    view_cmds,
)
from app.cli.shell import EXIT_FAILED, EXIT_USAGE, cli, err
from app.config import ConfigError


def database_problem(exc: Exception) -> str:
    """What is wrong with the database, in one line naming where it is (host, port, database) but
    never the URL's password: the driver's own text may quote the whole URL."""
    from sqlalchemy.engine import make_url

    from app.config import get_settings

    url = make_url(get_settings().database_url)
    where = (
        f"the SQLite file {url.database}"
        if url.get_backend_name() == "sqlite"
        else f"database {url.database!r} on {url.host or 'localhost'}:{url.port or 5432}"
    )
    orig = getattr(exc, "orig", exc)
    text = str(orig).lower()
    kind = type(orig).__name__
    if "does not exist" in text and "database" in text and "relation" not in text:
        return f"{where} does not exist: create it (createdb), then run `balances db upgrade`"
    if kind in ("UndefinedTable", "UndefinedColumn") or "no such table" in text or "no such column" in text:
        return f"the schema of {where} is not current: run `balances db upgrade`"
    if "password authentication failed" in text or ("role" in text and "does not exist" in text):
        return f"{where} refused the credentials in DATABASE_URL ({kind})"
    return f"{where} is unreachable or refused the query ({kind}); is it up? then `balances db upgrade`"


def main() -> None:
    import typer
    from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
    from typer.exceptions import TyperException

    try:
        # Not standalone: a usage error is one line of ours below, not a framed panel.
        code = cli(standalone_mode=False)
    except TyperException as exc:  # typer's (vendored) click usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":  # `balances` alone: the help, as asked
            err.print(exc.format_message(), highlight=False, markup=False)
            sys.exit(0)
        message = " ".join(exc.format_message().split())
        err.print(f"[red]usage error:[/] {message}", highlight=False)
        sys.exit(int(getattr(exc, "exit_code", EXIT_USAGE)))
    except typer.Abort:
        err.print("aborted")
        sys.exit(EXIT_FAILED)
    except (DataError, IntegrityError) as exc:
        # A value the database refuses (out of range, too long): one line, never the statement.
        err.print(
            f"[red]invalid input:[/] the database refused a value ({type(exc.orig).__name__})",
            highlight=False,
        )
        sys.exit(EXIT_USAGE)
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        sys.exit(EXIT_USAGE)
    except (OperationalError, ProgrammingError) as exc:
        err.print(f"[red]database error:[/] {database_problem(exc)}", highlight=False)
        sys.exit(EXIT_FAILED)
    else:
        if isinstance(code, int) and code:
            sys.exit(code)
