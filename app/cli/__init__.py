"""The ``balances`` admin shell (typer + rich). Command names are fixed (README "The admin shell").

Every read command has ``--json``. The actor is ``--as NAME``, else the OS user. Every command names
its operation (``app.operations``) and is authorized through ``app.policy.authorize`` first.
"""

from __future__ import annotations

import sys

from app.cli import admin_cmds, refresh_cmds, run_cmds  # noqa: F401 - they register their commands
from app.cli.shell import EXIT_FAILED, EXIT_USAGE, cli, err
from app.config import ConfigError


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
