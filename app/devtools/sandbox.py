"""A Powens-compatible local server: the subset of the API we call, in Powens' wire format.

Naive ``YYYY-MM-DD HH:MM:SS`` datetimes in Europe/Paris, accounts with every field Powens' OpenAPI
requires (``id_type``, ``bookmarked``, currency objects with ``name``), the ``{code, description,
message, request_id}`` error envelope, connection states, the value-less ``all`` flag, opaque
``_links.next.href`` continuation (when the ``accounts_page_size`` knob asks for pages), and
``PUT ...?psu_requested=false`` forced syncs, ``GET /users/me`` (whom a token belongs to). Data is
seeded and deterministic.

Knobs (latency, 5xx rate, 429 + Retry-After, connection states) are set at start or through
``/_sandbox/*`` admin routes, which also count calls, so tests and the benchmark can measure what
reached "Powens". Faults are scripted per account or per user, one answer each: an HTTP status, or
``reset`` (the connection is dropped), ``truncated`` (half the announced body), ``html`` (a proxy's
HTML error page), ``badjson``, ``slow`` (an answer after the given seconds), ``drip`` (a body one
byte at a time). ``wire`` overrides change fields of an account's payload (``"__missing__"`` drops one).

It is not a mock of our own code: the client talks to it over HTTP exactly as to Powens.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from app.devtools.sandbox_push import Pusher, connection_synced, transactions
from app.jsonio import dumps, loads

log = logging.getLogger(__name__)
PARIS = ZoneInfo("Europe/Paris")
CURRENCIES = {"EUR": ("€", 2), "USD": ("$", 2), "GBP": ("£", 2), "CHF": ("CHF", 2), "JPY": ("¥", 0)}
ACCOUNT_TYPES = ("checking", "savings", "card", "market", "loan")


def powens_time(dt: datetime) -> str:
    return dt.astimezone(PARIS).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class SConnection:
    id: int
    id_user: int
    id_connector: int
    state: str | None = None
    error_message: str | None = None
    last_update: datetime | None = None
    next_try: datetime | None = None
    active: bool = True
    expire: datetime | None = None  # the PSD2 consent's end

    def wire(self) -> dict[str, Any]:
        expire = powens_time(self.expire) if self.expire else None
        return {
            "id": self.id,
            "id_user": self.id_user,
            "id_connector": self.id_connector,
            "state": self.state,
            "error": self.state,
            "error_message": self.error_message,
            "last_update": powens_time(self.last_update) if self.last_update else None,
            "created": powens_time(self.last_update) if self.last_update else None,
            "next_try": powens_time(self.next_try) if self.next_try else None,
            "active": self.active,
            "expire": expire,
            "sources": [{"id": self.id, "access_expire": expire}],
        }


@dataclass
class SAccount:
    id: int
    id_connection: int
    id_user: int
    name: str
    number: str
    iban: str | None
    bic: str | None
    balance: Decimal
    coming: Decimal | None
    currency: str
    type: str
    usage: str | None
    last_update: datetime | None
    disabled: datetime | None = None
    deleted: datetime | None = None
    error: str | None = None

    def wire(self, state: str | None) -> dict[str, Any]:
        symbol, precision = CURRENCIES.get(self.currency, (self.currency, 2))
        return {
            "id": self.id,
            "id_connection": self.id_connection,
            "id_user": self.id_user,
            "id_source": self.id,
            "id_parent": None,
            "number": self.number,
            "original_name": self.name.upper(),
            "name": self.name,
            "iban": self.iban,
            "bic": self.bic,
            "balance": self.balance,
            "coming": self.coming,
            "currency": {
                "id": self.currency,
                "name": CURRENCY_NAMES.get(self.currency, self.currency),
                "symbol": symbol,
                "precision": precision,
            },
            "type": self.type,
            "id_type": ACCOUNT_TYPES.index(self.type) + 1 if self.type in ACCOUNT_TYPES else 0,
            "bookmarked": False,
            "usage": self.usage,
            "display": True,
            "last_update": powens_time(self.last_update) if self.last_update else None,
            "disabled": powens_time(self.disabled) if self.disabled else None,
            "deleted": powens_time(self.deleted) if self.deleted else None,
            "error": state,
            "coming_balance": None,
        }


@dataclass
class SUser:
    id: int
    token: str
    connections: dict[int, SConnection] = field(default_factory=dict)
    accounts: dict[int, SAccount] = field(default_factory=dict)
    signin: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def wire(self) -> dict[str, Any]:
        """Powens' user object (``GET /users/{id}``): who the token belongs to."""
        return {"id": self.id, "signin": powens_time(self.signin), "platform": "sharedAccess"}


@dataclass
class Knobs:
    latency_ms: float = 0.0
    fault_rate: float = 0.0  # probability of a 5xx on any data call
    rate_limit_rate: float = 0.0  # probability of a 429 on any data call
    retry_after: float = 1.0
    accounts_per_connection: int = 2
    connections_per_user: int = 1
    accounts_page_size: int = 0  # 0: the whole list at once (Powens documents no paging for it)


# One scripted answer: (HTTP status, Retry-After) or (a named fault, its argument).
Step = tuple[int | str, float | str | None]  # a Retry-After may be given as the raw header text
MISSING = "__missing__"
ADMIN_HEADER = "X-Sandbox-Admin-Token"
CURRENCY_NAMES = {
    "EUR": "Euro",
    "USD": "US Dollar",
    "GBP": "British Pound",
    "CHF": "Swiss Franc",
    "JPY": "Yen",
}


class SandboxState:
    """All data and counters, guarded by one lock (the server is threaded)."""

    def __init__(self, seed: int = 42, knobs: Knobs | None = None) -> None:
        self.seed = seed
        self.knobs = knobs or Knobs()
        self.lock = threading.RLock()
        self.users: dict[int, SUser] = {}
        self.by_token: dict[str, SUser] = {}
        self.rng = random.Random(seed)
        self._next_user = 1
        self._next_connection = 100
        self._next_account = 1000
        self.calls: Counter[str] = Counter()
        self.calls_by_user: Counter[int] = Counter()
        self.call_times: deque[float] = deque(maxlen=200_000)
        self.scripted: dict[int, deque[Step]] = {}
        self.malformed: set[int] = set()
        self.scripted_users: dict[int, deque[Step]] = {}
        self.scripted_syncs: dict[int, deque[Step]] = {}  # per connection, for forced syncs
        self.wire_overrides: dict[int, dict[str, Any]] = {}
        self.hidden: set[int] = set()  # accounts a list leaves out (a list that shifted or was cut)
        self.request_seq = 0
        self.client_id = "sandbox-client"
        self.client_secret = "sandbox-secret"  # noqa: S105 - the sandbox's own fake credential
        self.admin_token = secrets.token_hex(16)
        self.token_generation: dict[int, int] = {}
        self.pusher: Pusher | None = None  # webhooks after each sync (configure_webhooks)

    def configure_webhooks(self, url: str | None, secret: str | None) -> None:
        self.pusher = Pusher(url, secret) if url and secret else None

    def clear_faults(self) -> None:
        """Forget every scripted fault and payload override (knobs stay)."""
        with self.lock:
            for faults in (self.scripted, self.scripted_users, self.scripted_syncs, self.wire_overrides):
                faults.clear()
            self.malformed.clear()
            self.hidden.clear()

    # -- data ----------------------------------------------------------------------------------

    def token_for(self, user_id: int) -> str:
        generation = self.token_generation.get(user_id, 0)
        mac = hmac.new(str(self.seed).encode(), f"user:{user_id}:{generation}".encode(), hashlib.sha256)
        return f"sbx_{mac.hexdigest()[:40]}"

    def revoke_token(self, user_id: int) -> bool:
        with self.lock:
            user = self.users.get(user_id)
            if user is None:
                return False
            self.by_token.pop(user.token, None)
            self.token_generation[user_id] = self.token_generation.get(user_id, 0) + 1
            user.token = self.token_for(user_id)
            self.by_token[user.token] = user
            return True

    def create_user(
        self, *, connections: int | None = None, accounts_per_connection: int | None = None
    ) -> SUser:
        with self.lock:
            uid = self._next_user
            self._next_user += 1
            rng = random.Random(f"{self.seed}:{uid}")
            user = SUser(uid, self.token_for(uid))
            now = datetime.now(UTC).replace(microsecond=0)
            n_conn = connections if connections is not None else self.knobs.connections_per_user
            n_acc = (
                accounts_per_connection
                if accounts_per_connection is not None
                else self.knobs.accounts_per_connection
            )
            for _ in range(n_conn):
                cid = self._next_connection
                self._next_connection += 1
                updated = now - timedelta(minutes=rng.randint(5, 600))
                user.connections[cid] = SConnection(
                    id=cid,
                    id_user=uid,
                    id_connector=rng.choice((40, 59, 338, 1204)),
                    last_update=updated,
                    expire=now + timedelta(days=rng.randint(30, 180)),
                )
                for k in range(n_acc):
                    aid = self._next_account
                    self._next_account += 1
                    currency = "EUR" if rng.random() < 0.8 else rng.choice(("USD", "GBP", "CHF"))
                    cents = rng.randint(-50_000, 5_000_000)
                    coming = None if rng.random() < 0.3 else Decimal(-rng.randint(0, 300_000)) / 100
                    acc_type = ACCOUNT_TYPES[k % 3]
                    user.accounts[aid] = SAccount(
                        id=aid,
                        id_connection=cid,
                        id_user=uid,
                        name=f"{acc_type.title()} account {aid}",
                        number=f"{rng.randint(10**10, 10**11 - 1)}",
                        iban=f"FR76{rng.randint(10**22, 10**23 - 1)}",
                        bic="SBXFRPPXXX",
                        balance=Decimal(cents) / 100,
                        coming=coming,
                        currency=currency,
                        type=acc_type,
                        usage="PRIV" if rng.random() < 0.7 else "ORGA",
                        last_update=updated,
                    )
            self.users[uid] = user
            self.by_token[user.token] = user
            return user

    def find_account(self, account_id: int) -> tuple[SUser, SAccount] | None:
        with self.lock:
            for user in self.users.values():
                if account_id in user.accounts:
                    return user, user.accounts[account_id]
        return None

    def find_connection(self, connection_id: int) -> tuple[SUser, SConnection] | None:
        with self.lock:
            for user in self.users.values():
                if connection_id in user.connections:
                    return user, user.connections[connection_id]
        return None

    def sync_connection(self, user: SUser, conn: SConnection, *, push: bool = True) -> int | None:
        """What a bank sync does here: new balances (a deterministic drift) and a fresh last_update;
        then, as Powens does, a CONNECTION_SYNCED push when webhooks are configured. Returns the
        receiver's HTTP status (None: no webhooks)."""
        with self.lock:
            now = datetime.now(UTC).replace(microsecond=0)
            conn.last_update = now
            for acc in user.accounts.values():
                if acc.id_connection == conn.id and acc.disabled is None and acc.deleted is None:
                    rng = random.Random(f"{self.seed}:{acc.id}:{int(now.timestamp())}")
                    acc.balance += Decimal(rng.randint(-20_000, 20_000)) / 100
                    acc.last_update = now
            body = self.connection_synced_body(user, conn)
        if not push or self.pusher is None:
            return None
        return self.pusher.send("CONNECTION_SYNCED", body)

    def keep_syncing(self, every: float, stop: threading.Event | None = None) -> None:
        """Powens syncing connections by itself: one connection every ``every`` seconds, in turn."""
        stop = stop or threading.Event()
        turn = 0
        while not stop.wait(every):
            with self.lock:
                pairs = [(u, c) for u in self.users.values() for c in u.connections.values()]
            if pairs:
                user, conn = pairs[turn % len(pairs)]
                turn += 1
                if conn.state is None:
                    self.sync_connection(user, conn)

    def connection_synced_body(self, user: SUser, conn: SConnection) -> dict[str, Any]:
        with self.lock:
            wires = [
                {**a.wire(conn.state), "transactions": transactions(a.id, a.last_update)}
                for a in user.accounts.values()
                if a.id_connection == conn.id
            ]
            return connection_synced(user.id, conn.wire(), wires)

    # -- accounting ----------------------------------------------------------------------------

    def count(self, key: str, user_id: int | None) -> None:
        with self.lock:
            self.calls[key] += 1
            if user_id is not None:
                self.calls_by_user[user_id] += 1
            self.call_times.append(time.time())

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "total": sum(self.calls.values()),
                "calls": dict(self.calls),
                "by_user": {str(k): v for k, v in self.calls_by_user.items()},
                "times": list(self.call_times),
            }

    def reset_stats(self) -> None:
        with self.lock:
            self.calls.clear()
            self.calls_by_user.clear()
            self.call_times.clear()


ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/2\.0/auth/init$"), "auth_init"),
    ("POST", re.compile(r"^/2\.0/auth/renew$"), "auth_renew"),
    ("GET", re.compile(r"^/2\.0/auth/token/code$"), "auth_code"),
    ("GET", re.compile(r"^/2\.0/users/(?P<user>me|\d+)$"), "user"),
    ("GET", re.compile(r"^/2\.0/users/(?P<user>me|\d+)/accounts$"), "accounts"),
    ("GET", re.compile(r"^/2\.0/users/(?P<user>me|\d+)/accounts/(?P<account>\d+)$"), "account"),
    ("GET", re.compile(r"^/2\.0/users/(?P<user>me|\d+)/connections$"), "connections"),
    ("GET", re.compile(r"^/2\.0/users/(?P<user>me|\d+)/connections/(?P<conn>\d+)$"), "connection"),
    ("PUT", re.compile(r"^/2\.0/users/(?P<user>me|\d+)/connections/(?P<conn>\d+)$"), "sync"),
    (
        "GET",
        re.compile(r"^/2\.0/users/(?P<user>me|\d+)/connections/(?P<conn>\d+)/accounts$"),
        "conn_accounts",
    ),
    ("GET", re.compile(r"^/_sandbox/stats$"), "admin_stats"),
    ("POST", re.compile(r"^/_sandbox/stats/reset$"), "admin_reset"),
    ("POST", re.compile(r"^/_sandbox/users$"), "admin_user"),
    ("POST", re.compile(r"^/_sandbox/config$"), "admin_config"),
    ("POST", re.compile(r"^/_sandbox/users/(?P<user>\d+)/faults$"), "admin_user_faults"),
    ("POST", re.compile(r"^/_sandbox/users/(?P<user>\d+)/revoke$"), "admin_revoke"),
    ("POST", re.compile(r"^/_sandbox/connections/(?P<conn>\d+)$"), "admin_connection"),
    ("POST", re.compile(r"^/_sandbox/accounts/(?P<account>\d+)$"), "admin_account"),
    ("POST", re.compile(r"^/_sandbox/connections/(?P<conn>\d+)/sync$"), "admin_sync"),
]


class PowensError(Exception):
    def __init__(
        self, status: int, code: str, description: str, retry_after: float | str | None = None
    ) -> None:
        super().__init__(description)
        self.status, self.code, self.description, self.retry_after = status, code, description, retry_after


class RawFault(Exception):
    """An answer no error envelope describes: a dropped connection, a cut body, a proxy's HTML page."""

    def __init__(self, kind: str, arg: float | None) -> None:
        super().__init__(kind)
        self.kind, self.arg = kind, arg


STATUS_CODES = {
    400: "invalidValue",
    401: "invalidAccessToken",
    403: "forbidden",
    404: "accountNotFound",
    409: "conflict",
    500: "internalError",
    502: "badGateway",
    503: "serviceUnavailable",
    504: "gatewayTimeout",
}


class Handler(BaseHTTPRequestHandler):
    server: SandboxHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sandbox: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    @staticmethod
    def _route(method: str, path: str) -> tuple[str | None, re.Match[str] | None]:
        for m, pattern, name in ROUTES:
            match = pattern.match(path)
            if match and m == method:
                return name, match
        return None, None

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        with state.lock:
            state.request_seq += 1
            request_id = f"sbx-{state.request_seq}"
        name, match = self._route(method, parts.path)
        if name is None or match is None:
            self._send(404, {"code": "notFound", "description": "no such route", "request_id": request_id})
            return
        try:
            if name.startswith("admin_"):
                # The sandbox's own controls: only for whoever holds its admin token (printed by
                # `balances sandbox serve`, known to the Sandbox object in tests and the demo).
                given = self.headers.get(ADMIN_HEADER) or ""
                if not hmac.compare_digest(given.encode(), state.admin_token.encode()):
                    self._send(401, {"code": "unauthorized", "description": "sandbox admin token required"})
                    return
                body = loads(raw_body) if raw_body else {}
                result = getattr(self, name)(match.groupdict(), body)
                self._send(200, result)
                return
            if state.knobs.latency_ms:
                time.sleep(state.knobs.latency_ms / 1000)
            result = getattr(self, "powens_" + name)(match.groupdict(), query, raw_body, request_id)
            self._send(200, result, {"X-Request-Id": request_id})
        except RawFault as fault:
            self._raw_fault(fault, request_id)
        except PowensError as err:
            headers = {"X-Request-Id": request_id}
            if err.retry_after is not None:
                headers["Retry-After"] = (
                    err.retry_after  # a header as given, however absurd (a fault to survive)
                    if isinstance(err.retry_after, str)
                    else str(int(err.retry_after))
                    if err.retry_after >= 1
                    else "0"
                )
            self._send(
                err.status,
                {
                    "code": err.code,
                    "description": err.description,
                    "message": err.description,
                    "request_id": request_id,
                },
                headers,
            )

    def _raw_fault(self, fault: RawFault, request_id: str) -> None:
        body = b'{"accounts": [{"id": 1, "balance": 12.5, "currency": {"id": "EUR", "na'
        if fault.kind == "reset":
            # SO_LINGER 0: the close sends a TCP reset, as a crashed proxy would.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault.kind == "html":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
            self._send_raw(int(fault.arg or 502), page, "text/html", request_id)
            return
        if fault.kind == "badjson":
            self._send_raw(200, body, "application/json", request_id)
            return
        if fault.kind in ("truncated", "drip"):
            full = body * 8
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(full)))
            self.send_header("X-Request-Id", request_id)
            self.end_headers()
            if fault.kind == "truncated":
                self.wfile.write(full[: len(full) // 2])
            else:
                for byte in full:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(fault.arg or 0.1)
            self.close_connection = True
            return
        raise ValueError(f"unknown sandbox fault {fault.kind!r}")

    def _send_raw(self, status: int, raw: bytes, content_type: str, request_id: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("X-Request-Id", request_id)
        self.end_headers()
        self.wfile.write(raw)

    # -- helpers ---------------------------------------------------------------------------------

    def _auth(self, user_ref: str) -> SUser:
        state = self.server.state
        header = self.headers.get("Authorization") or ""
        token = header[7:] if header.startswith("Bearer ") else ""
        user = state.by_token.get(token)
        if user is None:
            raise PowensError(401, "invalidAccessToken", "The access token is invalid or revoked")
        if user_ref != "me" and int(user_ref) != user.id:
            raise PowensError(403, "forbidden", "This token cannot access that user")
        return user

    def _faults(
        self, key: str, user: SUser, account_id: int | None = None, connection_id: int | None = None
    ) -> None:
        state = self.server.state
        state.count(key, user.id)
        with state.lock:
            if account_id is not None:
                script = state.scripted.get(account_id)
            elif connection_id is not None:
                script = state.scripted_syncs.get(connection_id)
            else:
                script = state.scripted_users.get(user.id) if key.endswith("/accounts") else None
            step = script.popleft() if script else None
        if step is not None:
            what, arg = step
            if what == "slow":
                time.sleep(float(arg or 1.0))  # then answer normally
            elif what == "maintenance":
                raise PowensError(503, "maintenance", "Powens is under maintenance")
            elif isinstance(what, str):
                raise RawFault(what, float(arg) if arg is not None else None)
            elif what == 429:
                raise PowensError(429, "tooManyRequests", "Rate limit reached", arg)
            else:
                raise PowensError(what, STATUS_CODES.get(what, "internalError"), "Scripted failure")
        with state.lock:
            r = state.rng.random()
        if r < state.knobs.rate_limit_rate:
            raise PowensError(429, "tooManyRequests", "Rate limit reached", state.knobs.retry_after)
        if r < state.knobs.rate_limit_rate + state.knobs.fault_rate:
            raise PowensError(503, "serviceUnavailable", "Powens is temporarily unavailable")

    def _account_wire(self, user: SUser, acc: SAccount) -> dict[str, Any]:
        conn = user.connections.get(acc.id_connection)
        wire = acc.wire(conn.state if conn else None)
        if acc.id in self.server.state.malformed:
            wire["balance"] = "not-a-number"
            wire["currency"] = {"id": "XXQ"}
        for key, value in self.server.state.wire_overrides.get(acc.id, {}).items():
            if value == MISSING:
                wire.pop(key, None)
            else:
                wire[key] = value
        return wire

    def _cursor_page(
        self, items: list[Any], query: dict[str, list[str]], user_ref: str
    ) -> tuple[list[Any], dict[str, Any]]:
        """The whole list, or (``accounts_page_size``) a page and an opaque ``_links.next.href``."""
        size = self.server.state.knobs.accounts_page_size
        if not size:
            return items, {}
        start = int(query.get("cursor", ["0"])[0] or 0)
        links: dict[str, Any] = {}
        if start + size < len(items):
            flag = "all&" if "all" in query else ""
            links["next"] = {"href": f"/2.0/users/{user_ref}/accounts?{flag}cursor={start + size}"}
        return items[start : start + size], links

    def _page(self, items: list[Any], query: dict[str, list[str]]) -> tuple[list[Any], dict[str, Any]]:
        try:
            limit = min(int(query.get("limit", ["1000"])[0]), 1000)
            offset = int(query.get("offset", ["0"])[0])
        except ValueError:
            raise PowensError(400, "invalidValue", "limit and offset must be integers") from None
        page = items[offset : offset + limit]
        links: dict[str, Any] = {}
        if offset + limit < len(items):
            links["next"] = {"href": f"{self.path.split('?')[0]}?limit={limit}&offset={offset + limit}"}
        return page, links

    # -- Powens routes ---------------------------------------------------------------------------

    def powens_auth_init(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        user = self.server.state.create_user()
        self.server.state.count("POST /auth/init", None)
        return {"auth_token": user.token, "type": "permanent", "id_user": user.id}

    def powens_auth_renew(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        form = parse_qs(body.decode())
        state = self.server.state
        state.count("POST /auth/renew", None)
        if form.get("client_secret", [""])[0] != state.client_secret:
            raise PowensError(401, "invalidClient", "Invalid client credentials")
        uid = int(form.get("id_user", ["0"])[0])
        user = state.users.get(uid)
        if user is None:
            raise PowensError(404, "userNotFound", "No such user")
        if form.get("revoke_previous", [""])[0] == "true":
            state.revoke_token(uid)  # a new token; every earlier one now answers 401
        return {"access_token": user.token, "token_type": "Bearer"}

    def powens_auth_code(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        user = self._auth("me")
        self.server.state.count("GET /auth/token/code", user.id)
        return {"code": f"sbxcode_{secrets.token_hex(12)}", "type": "temporary", "access": "single"}

    def powens_user(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])  # another user's id: 403, as Powens answers
        self._faults("GET /users/{id_user}", user)
        return user.wire()

    def powens_accounts(self, p: dict[str, str], q: dict[str, list[str]], body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        self._faults("GET /users/{id_user}/accounts", user)
        with self.server.state.lock:
            # `all` lists disabled and deleted accounts too (Powens: "use the all parameter to get the
            # full list"); without it, only active ones.
            accounts = [
                a
                for a in user.accounts.values()
                if a.id not in self.server.state.hidden
                and ("all" in q or (a.deleted is None and a.disabled is None))
            ]
            wires = [self._account_wire(user, a) for a in accounts]
        page, links = self._cursor_page(wires, q, p["user"])
        totals: dict[str, Decimal] = {}
        for a in accounts:
            totals[a.currency] = totals.get(a.currency, Decimal(0)) + a.balance
        return {
            "accounts": page,
            "balances": totals,
            "coming_balances": {},
            "total": len(wires),
            "_links": links,
        }

    def powens_account(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        aid = int(p["account"])
        self._faults("GET /users/{id_user}/accounts/{id_account}", user, aid)
        with self.server.state.lock:
            acc = user.accounts.get(aid)
            if acc is None:
                raise PowensError(404, "accountNotFound", f"Account {aid} not found")
            return self._account_wire(user, acc)

    def powens_connections(self, p: dict[str, str], q: dict[str, list[str]], body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        self._faults("GET /users/{id_user}/connections", user)
        with self.server.state.lock:
            wires = [c.wire() for c in user.connections.values()]
        page, links = self._page(wires, q)
        return {"connections": page, "total": len(wires), "_links": links}

    def powens_connection(self, p: dict[str, str], q: Any, body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        self._faults("GET /users/{id_user}/connections/{id_connection}", user)
        conn = user.connections.get(int(p["conn"]))
        if conn is None:
            raise PowensError(404, "connectionNotFound", "Connection not found")
        return conn.wire()

    def powens_sync(self, p: dict[str, str], q: dict[str, list[str]], body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        self._faults("PUT /users/{id_user}/connections/{id_connection}", user, connection_id=int(p["conn"]))
        if q.get("psu_requested", [""])[0] != "false":
            raise PowensError(400, "missingParameter", "psu_requested=false is required without the user")
        state = self.server.state
        with state.lock:
            conn = user.connections.get(int(p["conn"]))
            if conn is None:
                raise PowensError(404, "connectionNotFound", "Connection not found")
            if conn.state is None or conn.state.lower() in (
                "validating",
                "ratelimiting",
                "websiteunavailable",
            ):
                state.sync_connection(user, conn, push=False)
                if state.pusher is not None:  # Powens pushes after its answer, not within it
                    pushed = state.connection_synced_body(user, conn)
                    pusher = state.pusher
                    threading.Thread(
                        target=pusher.send, args=("CONNECTION_SYNCED", pushed), daemon=True
                    ).start()
            return conn.wire()

    def powens_conn_accounts(self, p: dict[str, str], q: dict[str, list[str]], body: bytes, rid: str) -> Any:
        user = self._auth(p["user"])
        self._faults("GET /users/{id_user}/connections/{id_connection}/accounts", user)
        cid = int(p["conn"])
        with self.server.state.lock:
            wires = [self._account_wire(user, a) for a in user.accounts.values() if a.id_connection == cid]
        page, links = self._page(wires, q)
        return {"accounts": page, "_links": links}

    # -- admin routes (not Powens) ---------------------------------------------------------------

    def admin_stats(self, p: dict[str, str], body: Any) -> Any:
        return self.server.state.stats()

    def admin_reset(self, p: dict[str, str], body: Any) -> Any:
        self.server.state.reset_stats()
        return {"ok": True}

    def admin_user(self, p: dict[str, str], body: Any) -> Any:
        user = self.server.state.create_user(
            connections=body.get("connections"), accounts_per_connection=body.get("accounts_per_connection")
        )
        return {
            "id_user": user.id,
            "auth_token": user.token,
            "connections": sorted(user.connections),
            "accounts": sorted(user.accounts),
        }

    def admin_config(self, p: dict[str, str], body: Any) -> Any:
        knobs = self.server.state.knobs
        for key, value in body.items():
            if not hasattr(knobs, key):
                raise PowensError(400, "invalidValue", f"unknown knob {key}")
            setattr(knobs, key, type(getattr(knobs, key))(value))
        return vars(knobs)

    def admin_revoke(self, p: dict[str, str], body: Any) -> Any:
        """Revoke a user's token (as Powens would): the old one answers 401, /auth/renew gives the new."""
        return {"revoked": self.server.state.revoke_token(int(p["user"]))}

    def admin_user_faults(self, p: dict[str, str], body: Any) -> Any:
        steps = _steps(body.get("fail", []))
        with self.server.state.lock:
            self.server.state.scripted_users[int(p["user"])] = steps
        return {"scripted": len(steps)}

    def admin_connection(self, p: dict[str, str], body: Any) -> Any:
        found = self.server.state.find_connection(int(p["conn"]))
        if found is None:
            raise PowensError(404, "connectionNotFound", "Connection not found")
        _, conn = found
        with self.server.state.lock:
            if "state" in body:
                conn.state = body["state"] or None
                conn.error_message = body.get("error_message")
            if "expire" in body:
                conn.expire = datetime.fromisoformat(body["expire"]) if body["expire"] else None
        return conn.wire()

    def admin_sync(self, p: dict[str, str], body: Any) -> Any:
        """Powens syncing a connection by itself (no forced sync), then pushing it when configured."""
        state = self.server.state
        found = state.find_connection(int(p["conn"]))
        if found is None:
            raise PowensError(404, "connectionNotFound", "Connection not found")
        user, conn = found
        return {"webhook_status": state.sync_connection(user, conn)}

    def admin_account(self, p: dict[str, str], body: Any) -> Any:
        state = self.server.state
        aid = int(p["account"])
        found = state.find_account(aid)
        if found is None:
            raise PowensError(404, "accountNotFound", "Account not found")
        user, acc = found
        with state.lock:
            if "fail" in body:  # e.g. {"fail": [503, 503]}, [[429, 2]], ["reset"], [["slow", 3]]
                state.scripted[aid] = _steps(body["fail"])
            if "wire" in body:  # e.g. {"wire": {"balance": null}} or {"wire": {"name": "__missing__"}}
                state.wire_overrides[aid] = dict(body["wire"])
            if "balance" in body:
                acc.balance = Decimal(str(body["balance"]))
            if "coming" in body:
                acc.coming = None if body["coming"] is None else Decimal(str(body["coming"]))
            if "last_update" in body:
                acc.last_update = datetime.fromisoformat(body["last_update"])
            if body.get("disabled"):
                acc.disabled = datetime.now(UTC)
            if body.get("deleted"):
                acc.deleted = datetime.now(UTC)
            if "malformed" in body:
                (state.malformed.add if body["malformed"] else state.malformed.discard)(aid)
            return self._account_wire(user, acc)


def _steps(items: list[Any]) -> deque[Step]:
    steps: deque[Step] = deque()
    for item in items:
        what, arg = (item[0], item[1]) if isinstance(item, list) else (item, None)
        steps.append((what if isinstance(what, str) else int(what), None if arg is None else float(arg)))
    return steps


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a killed worker, a timeout) is not the sandbox's error.
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], state: SandboxState) -> None:
        super().__init__(address, Handler)
        self.state = state


class Sandbox:
    """A sandbox server on a background thread (tests, demo, benchmark)."""

    def __init__(self, state: SandboxState | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state or SandboxState()
        self.server = SandboxHTTPServer((host, port), self.state)
        self.thread = threading.Thread(target=self.server.serve_forever, name="powens-sandbox", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self._hostport}/2.0/"

    @property
    def admin_url(self) -> str:
        return f"http://{self._hostport}/_sandbox/"

    @property
    def _hostport(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host!s}:{port}" if isinstance(host, str) else f"{host.decode()}:{port}"

    def __enter__(self) -> Sandbox:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def admin_call(admin_url: str, token: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Drive a running sandbox's admin routes (from the CLI, tests, the benchmark)."""
    import requests

    url = admin_url.rstrip("/") + "/" + path.lstrip("/")
    headers = {ADMIN_HEADER: token}
    resp = (
        requests.post(url, data=json.dumps(body or {}), headers=headers, timeout=10)
        if body is not None
        else requests.get(url, headers=headers, timeout=10)
    )
    resp.raise_for_status()
    return loads(resp.content)
