"""The admin shell's operations and their auth levels, beside the contract's own.

Each ``balances`` command names one operation here (or in ``app.contract``) and is authorized with
``app.policy.authorize`` before it does anything; no command has a check of its own.
"""

from __future__ import annotations

from app.contract import ACCOUNTS_SYNC_OPERATION, GET_OPERATION, OperationMeta
from app.policy import ADMIN, ANONYMOUS, USER


def _shell(key: str, description: str, auth: str, kind: str = "command") -> OperationMeta:
    return OperationMeta(
        key=f"balances.{key}",
        version="1.0.0",
        kind=kind,
        description=description,
        policy_auth=auth,
        tags=("admin-shell",),
    )


# Whoever can reach the database may migrate it (the shell is trusted with DATABASE_URL).
DB_UPGRADE = _shell("db.upgrade", "Apply the schema migrations.", ANONYMOUS)
DB_PRUNE = _shell(
    "db.prune",
    "Apply the retention policy now: prune old run items, audit rows and reports; make snapshot partitions.",
    ADMIN,
)
# Needs an admin — except once: while no admin exists, anyone may grant the first (app.admin.manage.grant).
ADMIN_GRANT = _shell("actors.grant", "Grant a role to an actor.", ADMIN)
ADMIN_REVOKE = _shell("actors.revoke", "Revoke a role from an actor.", ADMIN)
ADMIN_LIST = _shell("actors.list", "List actors and their roles.", USER, "query")
TENANT_ADD = _shell("tenants.add", "Add a tenant.", ADMIN)
TENANT_LIST = _shell("tenants.list", "List tenants.", USER, "query")
POWENS_LINK = _shell(
    "powens.link", "Verify a Powens user's permanent token with Powens, then store it encrypted.", ADMIN
)
POWENS_UNLINK = _shell(
    "powens.unlink",
    "Delete a Powens user's stored token and take its accounts out of every refresh (history kept).",
    ADMIN,
)
POWENS_LIST = _shell("powens.list", "List a tenant's Powens users, linked or not.", USER, "query")
ACCOUNTS_LIST = _shell("accounts.list", "List a tenant's bank accounts.", ADMIN, "query")
RUN_NIGHTLY = _shell("runs.start", "Start the nightly pipeline now.", ADMIN)
RUN_STATUS = _shell("runs.status", "Show a nightly run's progress.", USER, "query")
RUN_SWEEP = _shell("runs.sweep", "Run the sweeper once now.", ADMIN)
RUN_LIST = _shell("runs.list", "List the latest runs with their counts.", USER, "query")
ATTENTION = _shell("attention.list", "What needs a person across every tenant.", USER, "query")
ACCOUNTS_HISTORY = _shell("accounts.history", "An account's daily balance snapshots.", USER, "query")
CONNECTIONS_LIST = _shell("connections.list", "List a tenant's bank connections.", ADMIN, "query")
SUMMARY = _shell("summaries.get", "Show a tenant's stored summary.", USER, "query")
FORECAST = _shell("forecasts.get", "Show a tenant's stored cashflow forecasts.", USER, "query")
# The sandbox touches no data of ours. The demo needs nobody on its own embedded database, an admin on
# any other (it writes demo tenants there).
SANDBOX_SERVE = _shell("sandbox.serve", "Serve the local Powens sandbox.", ANONYMOUS)
DEMO = _shell("demo", "Run the demo on its own tenants.", ADMIN)
# A service process like `celery worker`: it runs with the service's secrets and acts for nobody
# (what it accepts is authenticated by Powens' signature).
WEBHOOKS_SERVE = _shell("webhooks.serve", "Serve the receiver of Powens webhooks.", ANONYMOUS)
KEYS_ROTATE = _shell("keys.rotate", "Re-encrypt every stored Powens token under the newest key.", ADMIN)
RECONNECT_LINK = _shell(
    "connections.reconnect_link", "Issue a Powens reconnect link for a connection that needs its user.", ADMIN
)

SHOW = GET_OPERATION
ACCOUNTS_SYNC = ACCOUNTS_SYNC_OPERATION
