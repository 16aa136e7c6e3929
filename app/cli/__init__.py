"""The ``balances`` admin shell (typer + rich). Command names are fixed (README "The admin shell").

Every read command has ``--json``. The actor is ``--as NAME``, else the OS user. Every command names
its operation (``app.admin.operations``) and is authorized through ``app.policy.authorize`` first.
"""

from __future__ import annotations

import sys

from app.cli import admin_cmds, powens_cmds, refresh_cmds, run_cmds  # noqa: F401 - they register their commands
from app.cli.shell import EXIT_FAILED, EXIT_USAGE, cli, err
from app.config import ConfigError


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
        # The DB error's text may quote the URL; say what is wrong without echoing it.
        err.print(
            "[red]database error:[/] the database at DATABASE_URL is unreachable or its schema is not "
            f"current ({type(exc.orig).__name__}); run `balances db upgrade`",
            highlight=False,
        )
        sys.exit(EXIT_FAILED)
    else:
        if isinstance(code, int) and code:
            sys.exit(code)
