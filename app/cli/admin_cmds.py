"""Administering the service: ``db upgrade``, ``tenant``, ``admin``, ``sandbox serve``, ``demo``,
``keys rotate``, ``webhooks serve``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.admin import operations as ops
from app.cli.output import Col, Format, FormatOpt, chosen, listing, stamp
from app.cli.shell import (
    JsonOpt,
    acting,
    admin_cli,
    authorized,
    cli,
    db_cli,
    err,
    fail,
    fail_from,
    keys_cli,
    load,
    out,
    sandbox_cli,
    tenant_cli,
    webhooks_cli,
)
from app.config import ConfigError
from app.errors import InvalidInput, PolicyDenied, Reason
from app.policy import ADMIN, validate_actor_name


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to DATABASE_URL."""
    from app.store.migrate import current_revision, upgrade

    settings, _ = authorized(ops.DB_UPGRADE)
    upgrade(settings)
    err.print(f"database at revision {current_revision(settings)}")


@tenant_cli.command("add")
def tenant_add(
    tenant_id: Annotated[str, typer.Argument(help="Tenant id (1-128 characters).")],
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
) -> None:
    """Add a tenant (its accounts come with its Powens users: `powens link`, `accounts sync`)."""
    from app.admin.manage import add_tenant

    settings, _ = authorized(ops.TENANT_ADD)
    try:
        created = add_tenant(settings, tenant_id, name)
    except InvalidInput as exc:
        fail_from(exc, False)
    err.print(f"tenant {tenant_id} {'added' if created else 'already exists'}")


@tenant_cli.command("list")
def tenant_list(fmt: FormatOpt = None, json_: JsonOpt = False) -> None:
    """The active tenants."""
    from app.admin.manage import list_tenants

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.TENANT_LIST, as_json=form is Format.JSON)
    tenants = list_tenants(settings)
    doc = [{"id": t.id, "name": t.name, "active": t.active, "createdAt": t.created_at} for t in tenants]
    cols: list[Col[dict[str, Any]]] = [
        Col("id", lambda t: t["id"], ident=True),
        Col("name", lambda t: t["name"]),
        Col("active", lambda t: str(t["active"]).lower(), drop=2),
        Col("created", lambda t: stamp(t["createdAt"]), drop=1),
    ]
    listing(out, doc, cols, form, doc, empty="no tenant yet: balances tenant add TENANT_ID")


@admin_cli.command("grant")
def admin_grant(
    name: Annotated[str, typer.Argument(help="The actor (what it passes as --as NAME).")],
    role: Annotated[str, typer.Option(help="Role to grant.")] = ADMIN,
) -> None:
    """Grant a role. The first admin may be granted by anyone who can reach the database (the
    bootstrap); from then on only an admin may grant. Audited either way."""
    from app.admin.manage import grant

    settings = load()
    try:
        validate_actor_name(name)
        changed = grant(settings, acting(settings), name, role)
    except (InvalidInput, PolicyDenied) as exc:
        fail_from(exc, False)
    err.print(f"{name} {'now has' if changed else 'already has'} role {role}")


@admin_cli.command("revoke")
def admin_revoke(
    name: Annotated[str, typer.Argument(help="The actor.")],
    role: Annotated[str, typer.Option(help="Role to revoke.")] = ADMIN,
) -> None:
    """Revoke a role (never the last admin's). Audited."""
    from app.admin.manage import revoke

    settings, actor = authorized(ops.ADMIN_REVOKE)
    try:
        changed = revoke(settings, actor, name, role)
    except (InvalidInput, PolicyDenied) as exc:
        fail_from(exc, False)
    err.print(f"{name} {'no longer has' if changed else 'did not have'} role {role}")


@admin_cli.command("list")
def admin_list(fmt: FormatOpt = None, json_: JsonOpt = False) -> None:
    """Actors and their roles."""
    from app.admin.manage import list_actors

    form = chosen(fmt, json_)
    settings, _ = authorized(ops.ADMIN_LIST, as_json=form is Format.JSON)
    doc = [{"name": a.name, "roles": list(a.roles), "updatedAt": a.updated_at} for a in list_actors(settings)]
    cols: list[Col[dict[str, Any]]] = [
        Col("actor", lambda a: a["name"], ident=True),
        Col("roles", lambda a: ", ".join(a["roles"]) or "-"),
        Col("updated", lambda a: stamp(a["updatedAt"]), drop=1),
    ]
    listing(out, doc, cols, form, doc)


@sandbox_cli.command("serve")
def sandbox_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    seed: Annotated[int, typer.Option(help="Seed of the data (the same seed makes the same users).")] = 42,
    users: Annotated[int, typer.Option(help="Powens users to create at start.")] = 0,
    latency_ms: Annotated[float, typer.Option(help="Delay added to every Powens call (ms).")] = 0.0,
    fault_rate: Annotated[float, typer.Option(help="Probability of a 503 on a data call.")] = 0.0,
    rate_limit_rate: Annotated[float, typer.Option(help="Probability of a 429 on a data call.")] = 0.0,
    retry_after: Annotated[float, typer.Option(help="Retry-After seconds sent with a 429.")] = 1.0,
    accounts_per_connection: Annotated[int, typer.Option(help="Accounts of each new connection.")] = 2,
    connections_per_user: Annotated[int, typer.Option(help="Connections of each new user.")] = 1,
    webhook_url: Annotated[
        str | None,
        typer.Option(
            help="Push CONNECTION_SYNCED to <URL>/<EVENT> after each sync, signed with "
            "POWENS_WEBHOOK_SECRET (a secret is never an argument)."
        ),
    ] = None,
    sync_every: Annotated[
        float, typer.Option(help="Seconds between background syncs of one connection (0: none).")
    ] = 0.0,
) -> None:
    """Serve the Powens-compatible sandbox until interrupted (admin routes under /_sandbox/)."""
    import threading

    from app.devtools.sandbox import Knobs, SandboxHTTPServer, SandboxState

    settings, _ = authorized(ops.SANDBOX_SERVE)
    secrets = settings.webhook_secrets
    webhook_secret = secrets[0].decode() if secrets else None
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
    if webhook_url and not webhook_secret:
        fail(
            Reason.INVALID_INPUT,
            "--webhook-url needs POWENS_WEBHOOK_SECRET in the environment",
            2,
            as_json=False,
        )
    sstate.configure_webhooks(webhook_url, webhook_secret)
    server = SandboxHTTPServer((host, port), sstate)
    err.print(f"Powens sandbox on http://{host}:{server.server_address[1]}/2.0/ (seed {seed}, {users} users)")
    if webhook_url:
        err.print(f"pushing webhooks to {webhook_url}/<EVENT> after each sync")
    if sync_every > 0:
        threading.Thread(target=sstate.keep_syncing, args=(sync_every,), daemon=True).start()
    # The sandbox's own control token (its admin routes), not a secret of the service.
    err.print(f"admin routes under /_sandbox/ need the header X-Sandbox-Admin-Token: {sstate.admin_token}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@sandbox_cli.command("new-user")
def sandbox_new_user() -> None:
    """Create a user on the sandbox at POWENS_BASE_URL (Powens' POST /auth/init) and print its id, then
    its permanent token, one per line: what `powens link` needs (the token through stdin). Only a
    sandbox on this machine: against Powens itself this would create a real user."""
    import ipaddress
    from urllib.parse import urlsplit

    import requests

    settings, _ = authorized(ops.SANDBOX_SERVE)
    try:
        base = settings.powens_base_url
    except ConfigError as exc:
        fail_from(exc, False)
    host = urlsplit(base).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        fail(
            Reason.INVALID_INPUT,
            f"POWENS_BASE_URL ({host}) is not a sandbox on this machine",
            2,
            as_json=False,
        )
    try:
        answer = requests.post(f"{base}auth/init", timeout=10)
        answer.raise_for_status()
        user = answer.json()
    except (requests.RequestException, ValueError) as exc:
        fail(
            Reason.PROVIDER_UNAVAILABLE,
            f"no sandbox answered at {base} ({type(exc).__name__})",
            1,
            as_json=False,
        )
    print(user["id_user"])
    print(user["auth_token"])


@cli.command("demo")
def demo_cmd(
    tenants: Annotated[int, typer.Option(help="Demo tenants to seed.")] = 3,
) -> None:
    """Seed demo tenants against a local sandbox and refresh every account (no services needed)."""
    from app.devtools.demo import run_demo

    if "database_url" in load().model_fields_set:  # not its own embedded database: an admin's call
        authorized(ops.DEMO)
    raise typer.Exit(run_demo(tenants=tenants, console=out))


@keys_cli.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored Powens token under the newest key (the first of BALANCES_ENCRYPTION_KEY).

    Rotation without downtime: 1) put the new key first, the old one second, everywhere, and restart;
    2) run this; 3) remove the old key everywhere."""
    from app.admin.manage import rotate_keys

    settings, actor = authorized(ops.KEYS_ROTATE)
    err.print(f"{rotate_keys(settings, actor)} Powens tokens re-encrypted under the newest key")


# The receiver's /metrics port when BALANCES_METRICS_PORT is not set: not the worker's 9464, so a
# receiver and a worker on one host do not fight for it.
RECEIVER_METRICS_PORT = 9466


@webhooks_cli.command("serve")
def webhooks_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help=f"/metrics port (default: BALANCES_METRICS_PORT, else {RECEIVER_METRICS_PORT}; 0: none).",
        ),
    ] = None,
) -> None:
    """Receive Powens webhooks: POST /webhooks/powens/{EVENT}, GET /healthz (uvicorn, until stopped)."""
    from app.push.receiver import serve

    settings, _ = authorized(ops.WEBHOOKS_SERVE)
    missing = [
        name
        for name, value in (
            ("POWENS_WEBHOOK_SECRET", settings.webhook_secrets),
            # Its own key (it signs pushes only); the service's key would do, but then the one
            # internet-facing process holds the key every task is signed with.
            ("BALANCES_PUSH_SIGNING_KEY", settings.push_signing_key or settings.signing_key),
        )
        if not value
    ]
    if missing:
        fail(Reason.INVALID_INPUT, f"the webhook receiver needs {' and '.join(missing)}", 2, as_json=False)
    if metrics_port is None:
        metrics_port = (
            settings.metrics_port if "metrics_port" in settings.model_fields_set else RECEIVER_METRICS_PORT
        )
    if metrics_port == port:
        fail(Reason.INVALID_INPUT, f"--port and --metrics-port are both {port}", 2, as_json=False)
    # The metrics server listens on every interface (prometheus_client's default).
    for what, number, on in (("--port", port, host), ("--metrics-port", metrics_port, "0.0.0.0")):
        if number and not port_free(on, number):
            fail(Reason.INVALID_INPUT, f"{what} {number} is in use: choose another", 2, as_json=False)
    serve(settings.model_copy(update={"metrics_port": metrics_port}), host, port)


def port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
