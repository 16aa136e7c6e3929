"""Powens HTTP client: one pooled ``requests.Session`` per process, typed answers, classified errors.

The client knows nothing of the database. Tokens travel in the Authorization header only; they never
enter a URL, a log line, a metric label or an exception message.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit
from zoneinfo import ZoneInfo

import requests
import urllib3
from requests.adapters import HTTPAdapter

from app.config import Settings
from app.errors import Reason
from app.jsonio import loads
from app.ops import metrics
from app.powens.errors import PowensError, error_from_response
from app.powens.models import Answer, PowensAccount, PowensConnection, invalid, parse_user_id

log = logging.getLogger(__name__)

EP_USER = "/users/{id_user}"
EP_ACCOUNTS = "/users/{id_user}/accounts"
EP_ACCOUNT = "/users/{id_user}/accounts/{id_account}"
EP_CONNECTIONS = "/users/{id_user}/connections"
EP_CONNECTION = "/users/{id_user}/connections/{id_connection}"
EP_AUTH_INIT = "/auth/init"
EP_AUTH_RENEW = "/auth/renew"
EP_AUTH_CODE = "/auth/token/code"
MAX_PAGES = 1000


class PowensClient:
    """One Powens API client. ``before_request`` (given at construction, like httpx's event hooks) is
    called with the route template before every request: the cluster-wide rate limiter plugs in there.
    Clients are cheap; the pooled HTTP session behind them is shared per process (``shared_session``)."""

    def __init__(
        self,
        base_url: str,
        *,
        zone: ZoneInfo,
        connect_timeout: float = 3.05,
        read_timeout: float = 20.0,
        total_timeout: float = 30.0,
        max_body_bytes: int = 20 * 2**20,
        session: requests.Session | None = None,
        before_request: Callable[[str], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.zone = zone
        self.timeout = (connect_timeout, read_timeout)
        # The read timeout bounds one socket read; a body that drips slowly is cut by the total.
        self.total_timeout = total_timeout
        self.max_body_bytes = max_body_bytes
        self.session = session or new_session()
        self.before_request = before_request

    # -- low level ---------------------------------------------------------------------------------

    def _url(self, template: str, path_params: dict[str, Any]) -> str:
        return self.base_url + template.format(**path_params).lstrip("/")

    def request(
        self,
        method: str,
        template: str,
        *,
        token: str | None,
        path_params: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        flags: tuple[str, ...] = (),
        data: dict[str, Any] | None = None,
        url: str | None = None,
    ) -> tuple[Any, str | None]:
        """One HTTP call. Returns (parsed JSON with exact decimals, Powens request id).

        ``url`` replaces the templated URL (a ``_links.next.href`` to follow as given)."""
        if url is None:
            url = self._url(template, path_params or {})
            if flags:
                url += "?" + "&".join(flags)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.before_request is not None:
            self.before_request(template)
        started = time.perf_counter()
        status_label = "error"
        try:
            timeout = urllib3.Timeout(connect=self.timeout[0], read=self.timeout[1], total=self.total_timeout)
            # requests passes a urllib3 Timeout through (its stubs do not say so): ``total`` bounds the
            # connect and the headers; the body loop below bounds the rest.
            resp = self.session.request(
                method,
                url,
                params=params,
                data=data,
                headers=headers,
                timeout=timeout,  # type: ignore[arg-type]
                stream=True,
            )
            try:
                content = self._read_body(resp, template, started + self.total_timeout)
            finally:
                resp.close()
            status_label = str(resp.status_code)
        except PowensError as err:
            status_label = "timeout" if "took longer" in err.message else "error"
            raise
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
            status_label = "timeout"
            raise PowensError(
                Reason.PROVIDER_UNAVAILABLE,
                f"Powens {template} timed out (connect {self.timeout[0]}s, read {self.timeout[1]}s)",
            ) from None
        except (
            requests.ConnectionError,
            urllib3.exceptions.ProtocolError,
            requests.exceptions.ChunkedEncodingError,
        ):
            raise PowensError(
                Reason.PROVIDER_UNAVAILABLE,
                f"Powens {template}: connection failed or the answer was cut short",
            ) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise PowensError(
                Reason.PROVIDER_UNAVAILABLE, f"Powens {template}: {type(exc).__name__}"
            ) from None
        finally:
            elapsed = time.perf_counter() - started
            metrics.POWENS_HTTP_REQUESTS.labels(endpoint=template, status=status_label).inc()
            metrics.POWENS_HTTP_DURATION.labels(endpoint=template).observe(elapsed)

        request_id = resp.headers.get("X-Request-Id") or resp.headers.get("Request-Id")
        body: Any = None
        if content:
            try:
                body = loads(content)
            except ValueError:
                if resp.status_code < 400:
                    raise invalid("body is not JSON", template) from None
        if resp.status_code >= 400:
            failure = error_from_response(
                resp.status_code, body, endpoint=template, retry_after=resp.headers.get("Retry-After")
            )
            if failure.request_id is None:
                failure.request_id = request_id
            raise failure
        if isinstance(body, dict) and body.get("request_id") is not None and request_id is None:
            request_id = str(body["request_id"])
        return body, request_id

    def _read_body(self, resp: requests.Response, template: str, deadline: float) -> bytes:
        """The body, read as it arrives, within the total deadline and the size limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            if time.perf_counter() > deadline:
                raise PowensError(
                    Reason.PROVIDER_UNAVAILABLE,
                    f"Powens {template}: the answer took longer than {self.total_timeout:g}s",
                )
            chunk = resp.raw.read1(65536, decode_content=True)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self.max_body_bytes:
                raise invalid(f"the answer is larger than {self.max_body_bytes} bytes", template)
            chunks.append(chunk)

    def _pages(
        self, template: str, key: str, *, token: str, path_params: dict[str, Any], flags: tuple[str, ...] = ()
    ) -> Iterator[tuple[list[Any], str | None]]:
        """A list and its continuation pages: ``_links.next.href`` is followed exactly as given (on
        Powens' own host only: the bearer token goes nowhere else), until a page has none."""
        next_url: str | None = None
        seen: set[str] = set()
        while True:
            body, rid = self.request(
                "GET", template, token=token, path_params=path_params, flags=flags, url=next_url
            )
            if not isinstance(body, dict) or not isinstance(body.get(key), list):
                raise invalid(f"'{key}' list is missing", template)
            yield body[key], rid
            href = ((body.get("_links") or {}).get("next") or {}).get("href")
            if not href:
                return
            next_url = urljoin(self.base_url, str(href))
            if urlsplit(next_url).netloc != urlsplit(self.base_url).netloc:
                raise invalid("the next page is on another host", template)
            if next_url in seen or len(seen) >= MAX_PAGES:
                raise invalid("the pages do not end", template)
            seen.add(next_url)

    # -- Powens operations -------------------------------------------------------------------------

    def token_owner(self, token: str, user: int | str = "me") -> Answer[int]:
        """The id of the Powens user the token belongs to (``GET /users/me``): an answer at all proves
        Powens accepts the token (a refused one is 401/403: ``unauthorized``)."""
        body, rid = self.request("GET", EP_USER, token=token, path_params={"id_user": user})
        return Answer(parse_user_id(body, EP_USER), rid)

    def list_accounts_raw(
        self, token: str, user: int | str = "me", *, include_disabled: bool = True
    ) -> tuple[list[Any], str | None]:
        """Every account of the user as Powens sent it (exact decimals), across pages."""
        raw: list[Any] = []
        rid = None
        for items, page_rid in self._pages(
            EP_ACCOUNTS,
            "accounts",
            token=token,
            path_params={"id_user": user},
            flags=("all",) if include_disabled else (),
        ):
            rid = rid or page_rid
            raw.extend(items)
        return raw, rid

    def list_accounts(
        self, token: str, user: int | str = "me", *, include_disabled: bool = True
    ) -> Answer[list[PowensAccount]]:
        raw, rid = self.list_accounts_raw(token, user, include_disabled=include_disabled)
        return Answer([PowensAccount.parse(item, self.zone, EP_ACCOUNTS) for item in raw], rid)

    def get_account(self, token: str, user: int | str, account_id: int) -> Answer[PowensAccount]:
        body, rid = self.request(
            "GET", EP_ACCOUNT, token=token, path_params={"id_user": user, "id_account": account_id}
        )
        return Answer(PowensAccount.parse(body, self.zone, EP_ACCOUNT), rid)

    def list_connections(self, token: str, user: int | str = "me") -> Answer[list[PowensConnection]]:
        conns: list[PowensConnection] = []
        rid = None
        for items, page_rid in self._pages(
            EP_CONNECTIONS, "connections", token=token, path_params={"id_user": user}, flags=("all",)
        ):
            rid = rid or page_rid
            conns.extend(PowensConnection.parse(item, self.zone, EP_CONNECTIONS) for item in items)
        return Answer(conns, rid)

    def sync_connection(self, token: str, user: int | str, connection_id: int) -> Answer[PowensConnection]:
        """Force a bank sync without the user present (``psu_requested=false`` is required then)."""
        body, rid = self.request(
            "PUT",
            EP_CONNECTION,
            token=token,
            path_params={"id_user": user, "id_connection": connection_id},
            params={"psu_requested": "false"},
        )
        return Answer(PowensConnection.parse(body, self.zone, EP_CONNECTION), rid)

    def init_user(self, client_id: str, client_secret: str) -> tuple[int, str]:
        """Create a Powens user; returns (id_user, permanent token)."""
        body, _ = self.request(
            "POST",
            EP_AUTH_INIT,
            token=None,
            data={"client_id": client_id, "client_secret": client_secret},
        )
        if not isinstance(body, dict) or not body.get("auth_token") or body.get("id_user") is None:
            raise invalid("auth_token or id_user missing", EP_AUTH_INIT)
        return int(body["id_user"]), str(body["auth_token"])

    def temporary_code(self, token: str) -> str:
        """A short-lived code for the user's webview (reconnect links). Never logged, never stored."""
        body, _ = self.request("GET", EP_AUTH_CODE, token=token)
        if not isinstance(body, dict) or not isinstance(body.get("code"), str) or not body["code"]:
            raise invalid("code missing", EP_AUTH_CODE)
        return str(body["code"])

    def renew_token(self, client_id: str, client_secret: str, id_user: int, *, revoke_previous: bool) -> str:
        body, _ = self.request(
            "POST",
            EP_AUTH_RENEW,
            token=None,
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": client_secret,
                "id_user": id_user,
                "revoke_previous": "true" if revoke_previous else "false",
            },
        )
        if not isinstance(body, dict) or not body.get("access_token"):
            raise invalid("access_token missing", EP_AUTH_RENEW)
        return str(body["access_token"])


def new_session(pool_size: int = 10) -> requests.Session:
    session = requests.Session()
    # Retries are the task's business (with backoff and accounting), never urllib3's.
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = "balances-refresh/0.1"
    session.headers["Accept"] = "application/json"
    return session


_lock = threading.Lock()
_session: requests.Session | None = None
_session_pid: int | None = None


def shared_session(pool_size: int = 10) -> requests.Session:
    """The process's pooled session, with room for ``pool_size`` concurrent calls (a refresh batch's
    readers): past it urllib3 would open and drop a connection per call. A forked child builds its
    own: a pooled socket must not cross fork."""
    global _session, _session_pid
    with _lock:
        if _session is None or _session_pid != os.getpid():
            _session, _session_pid = new_session(pool_size), os.getpid()
        return _session


def build_client(settings: Settings, before_request: Callable[[str], None] | None = None) -> PowensClient:
    return PowensClient(
        settings.powens_base_url,
        zone=settings.powens_zone,
        connect_timeout=settings.powens_connect_timeout,
        read_timeout=settings.powens_read_timeout,
        total_timeout=settings.powens_total_timeout,
        max_body_bytes=settings.powens_max_body_bytes,
        session=shared_session(max(10, settings.refresh_batch_readers)),
        before_request=before_request,
    )


def reset_client() -> None:
    """After fork: forget the parent's session."""
    global _session, _session_pid
    with _lock:
        _session, _session_pid = None, None
