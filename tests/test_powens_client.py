"""The Powens client against recorded Powens shapes, served by ``responses``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import requests
import responses

from app.errors import Reason
from app.powens.client import PowensClient
from app.powens.errors import PowensError

BASE = "https://acme-sandbox.biapi.pro/2.0/"
TOKEN = "tok_SECRET_do_not_leak_123"


def client(**options: object) -> PowensClient:
    return PowensClient(BASE, zone=ZoneInfo("Europe/Paris"), read_timeout=2, **options)  # type: ignore[arg-type]


def account(**over: object) -> dict[str, object]:
    acc: dict[str, object] = {
        "id": 17,
        "id_connection": 5,
        "id_user": 3,
        "name": "Compte courant",
        "original_name": "CC",
        "number": "12345678901",
        "iban": "FR7630004000031234567890143",
        "bic": "BNPAFRPP",
        "balance": 1234.56,
        "coming": -12.3,
        "currency": {"id": "EUR", "symbol": "€", "precision": 2},
        "type": "checking",
        "usage": "PRIV",
        "last_update": "2026-07-01 10:30:00",
        "disabled": None,
        "deleted": None,
        "error": None,
    }
    acc.update(over)
    return acc


def raw_json(obj: object) -> str:
    return json.dumps(obj)


@responses.activate
def test_get_account_parses_money_exactly_and_converts_paris_time_to_utc() -> None:
    body = raw_json(account()).replace("1234.56", "0.30000000000000004441").replace("-12.3", "0.1")
    responses.get(BASE + "users/3/accounts/17", body=body, headers={"X-Request-Id": "r-1"})
    answer = client().get_account(TOKEN, 3, 17)
    acc = answer.value
    assert acc.balance == Decimal("0.30000000000000004441")
    assert acc.coming == Decimal("0.1")
    assert acc.balance + acc.coming == Decimal("0.40000000000000004441")
    # 10:30 in Paris in July is UTC+2.
    assert acc.last_update == datetime(2026, 7, 1, 8, 30, tzinfo=UTC)
    assert answer.request_id == "r-1"
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


@responses.activate
def test_winter_time_is_utc_plus_one() -> None:
    responses.get(BASE + "users/3/accounts/17", json=account(last_update="2026-01-15 00:15:00"))
    assert client().get_account(TOKEN, 3, 17).value.last_update == datetime(2026, 1, 14, 23, 15, tzinfo=UTC)


@responses.activate
def test_list_accounts_sends_the_all_flag_and_follows_next_links_as_given() -> None:
    # Powens documents no limit/offset on this list: we send none, and follow `_links.next.href`
    # exactly as given (an opaque cursor), so a list that shifts between pages loses nothing.
    first = {
        "accounts": [account(id=1), account(id=2)],
        "balances": {},
        "_links": {"next": {"href": "/2.0/users/me/accounts?all&cursor=Zx9"}},
    }
    responses.get(
        BASE + "users/me/accounts?all", json=first, match=[responses.matchers.query_string_matcher("all")]
    )
    responses.get(
        BASE + "users/me/accounts",
        json={"accounts": [account(id=3)], "balances": {}},
        match=[responses.matchers.query_string_matcher("all&cursor=Zx9")],
    )
    answer = client().list_accounts(TOKEN)
    assert [a.id for a in answer.value] == [1, 2, 3]
    urls = [c.request.url for c in responses.calls]
    assert urls == [BASE + "users/me/accounts?all", BASE + "users/me/accounts?all&cursor=Zx9"]
    assert all("limit" not in u and "offset" not in u for u in urls)


@responses.activate
def test_a_next_link_to_another_host_is_never_followed_with_the_token() -> None:
    evil = {
        "accounts": [account(id=1)],
        "balances": {},
        "_links": {"next": {"href": "https://evil.example/steal"}},
    }
    responses.get(BASE + "users/me/accounts", json=evil)
    with pytest.raises(PowensError) as info:
        client().list_accounts(TOKEN)
    assert info.value.reason is Reason.INVALID_RESPONSE and "another host" in info.value.message
    assert len(responses.calls) == 1


@responses.activate
def test_list_connections_keeps_states() -> None:
    responses.get(
        BASE + "users/3/connections",
        json={
            "connections": [
                {
                    "id": 5,
                    "id_user": 3,
                    "id_connector": 40,
                    "state": "SCARequired",
                    "error_message": "SCA needed",
                    "last_update": None,
                    "active": True,
                }
            ]
        },
    )
    [conn] = client().list_connections(TOKEN, 3).value
    assert conn.state == "SCARequired" and conn.id_connector == 40


@responses.activate
def test_forced_sync_sends_psu_requested_false() -> None:
    responses.put(
        BASE + "users/3/connections/5", json={"id": 5, "state": None, "last_update": "2026-01-01 01:00:00"}
    )
    conn = client().sync_connection(TOKEN, 3, 5).value
    assert conn.state is None
    assert responses.calls[0].request.url.endswith("?psu_requested=false")


ERROR_CASES = [
    (503, {"code": "serviceUnavailable", "description": "maintenance"}, Reason.PROVIDER_UNAVAILABLE),
    (500, {"code": "internalError"}, Reason.PROVIDER_UNAVAILABLE),
    (502, None, Reason.PROVIDER_UNAVAILABLE),
    (429, {"code": "tooManyRequests"}, Reason.RATE_LIMITED),
    (409, {"code": "tooManySync"}, Reason.RATE_LIMITED),
    (400, {"code": "SCARequired", "description": "strong auth"}, Reason.NEEDS_USER_ACTION),
    (400, {"code": "wrongPass"}, Reason.NEEDS_USER_ACTION),  # case-insensitive code
    (400, {"code": "wrongpass"}, Reason.NEEDS_USER_ACTION),
    (401, {"code": "invalidAccessToken"}, Reason.UNAUTHORIZED),
    (403, {"code": "forbidden"}, Reason.UNAUTHORIZED),
    (404, {"code": "accountNotFound"}, Reason.NOT_FOUND),
    (400, {"code": "invalidValue", "description": "bad limit"}, Reason.INTERNAL),
]


@pytest.mark.parametrize(("status", "body", "reason"), ERROR_CASES)
@responses.activate
def test_error_envelope_maps_to_the_fixed_reasons(
    status: int, body: dict[str, object] | None, reason: Reason
) -> None:
    payload = dict(body or {}, request_id=987) if body is not None else None
    responses.get(BASE + "users/3/accounts/17", json=payload, status=status)
    with pytest.raises(PowensError) as info:
        client().get_account(TOKEN, 3, 17)
    err = info.value
    assert err.reason is reason
    assert err.status == status
    if body is not None:
        assert err.request_id == "987"  # Powens sends ints sometimes: kept as text
    assert TOKEN not in str(err) and TOKEN not in repr(err)


@responses.activate
def test_retry_after_is_read_from_a_429() -> None:
    responses.get(
        BASE + "users/3/accounts/17",
        status=429,
        json={"code": "tooManyRequests"},
        headers={"Retry-After": "7"},
    )
    with pytest.raises(PowensError) as info:
        client().get_account(TOKEN, 3, 17)
    assert info.value.reason is Reason.RATE_LIMITED and info.value.retry_after == 7.0


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (requests.ConnectTimeout("connect timeout to https://x?token=" + TOKEN), Reason.PROVIDER_UNAVAILABLE),
        (requests.ReadTimeout("read timed out " + TOKEN), Reason.PROVIDER_UNAVAILABLE),
        (requests.ConnectionError("refused " + TOKEN), Reason.PROVIDER_UNAVAILABLE),
    ],
)
@responses.activate
def test_transport_failures_are_provider_unavailable_without_leaking(exc: Exception, reason: Reason) -> None:
    responses.get(BASE + "users/3/accounts/17", body=exc)
    with pytest.raises(PowensError) as info:
        client().get_account(TOKEN, 3, 17)
    assert info.value.reason is reason
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    assert info.value.__cause__ is None  # the original (which may carry a URL) is not chained


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ("<html>maintenance</html>", "not JSON"),
        (raw_json(account(balance="12,5")), "balance is not a number"),
        (raw_json(account(balance="12.5")), "balance is not a number"),  # a string is the wrong type
        (raw_json(account(currency={"id": "XYZ"})), "unknown currency"),
        (raw_json(account(balance=1e20)), "beyond any bank balance"),
        (raw_json(account(coming=-1e19)), "beyond any bank balance"),
        (raw_json(account(name=None, original_name=None)), "name is missing"),
        (raw_json(account(id="abc")), "id is not an integer"),
        (raw_json(account(last_update="yesterday")), "last_update"),
        (raw_json([1, 2]), "not an object"),
    ],
)
@responses.activate
def test_malformed_payloads_are_invalid_response(body: str, what: str) -> None:
    responses.get(BASE + "users/3/accounts/17", body=body)
    with pytest.raises(PowensError) as info:
        client().get_account(TOKEN, 3, 17)
    assert info.value.reason is Reason.INVALID_RESPONSE
    assert what in info.value.message


@responses.activate
def test_http_metrics_use_the_route_template_not_ids() -> None:
    from prometheus_client import REGISTRY

    before = (
        REGISTRY.get_sample_value(
            "powens_http_requests_total",
            {"endpoint": "/users/{id_user}/accounts/{id_account}", "status": "200"},
        )
        or 0
    )
    responses.get(BASE + "users/3/accounts/17", json=account())
    client().get_account(TOKEN, 3, 17)
    after = REGISTRY.get_sample_value(
        "powens_http_requests_total", {"endpoint": "/users/{id_user}/accounts/{id_account}", "status": "200"}
    )
    assert after == before + 1


@responses.activate
def test_null_balance_and_currency_are_valid_no_balance_yet() -> None:
    # Powens' OpenAPI marks balance, coming, currency and last_update nullable.
    responses.get(
        BASE + "users/3/accounts/17",
        body=raw_json(account(balance=None, coming=None, currency=None, last_update=None)),
    )
    acc = client().get_account(TOKEN, 3, 17).value
    assert (acc.balance, acc.coming, acc.currency, acc.last_update) == (None, None, None, None)


@responses.activate
def test_an_answer_over_the_size_limit_is_invalid_response() -> None:
    responses.get(BASE + "users/3/accounts/17", body=raw_json(account(name="x" * 5000)))
    with pytest.raises(PowensError) as info:
        client(max_body_bytes=2048).get_account(TOKEN, 3, 17)
    assert info.value.reason is Reason.INVALID_RESPONSE and "larger than 2048 bytes" in info.value.message


def test_a_body_that_drips_slowly_is_cut_by_the_total_timeout() -> None:
    """Every byte arrives within the read timeout, yet the answer as a whole takes too long."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")
        while not stop.is_set():
            try:
                conn.sendall(b" ")
            except OSError:
                break
            time.sleep(0.05)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    drip = PowensClient(
        f"http://127.0.0.1:{port}/2.0/", zone=ZoneInfo("Europe/Paris"), read_timeout=2, total_timeout=0.5
    )
    started = time.monotonic()
    try:
        with pytest.raises(PowensError) as info:
            drip.get_account(TOKEN, 3, 17)
    finally:
        stop.set()
        listener.close()
    assert info.value.reason is Reason.PROVIDER_UNAVAILABLE and "took longer than 0.5s" in info.value.message
    assert time.monotonic() - started < 2  # cut at the total, not after 400 slow bytes


def test_the_sandbox_speaks_powens_openapi_account_shape(sandbox_server) -> None:  # type: ignore[no-untyped-def]
    """Required by Powens' OpenAPI (bank-accounts.yml): the sandbox must send what Powens sends."""
    user = sandbox_server.state.create_user(accounts_per_connection=1)
    body = requests.get(
        sandbox_server.base_url + "users/me/accounts?all",
        headers={"Authorization": f"Bearer {user.token}"},
        timeout=5,
    ).json()
    required = {
        "id",
        "id_connection",
        "id_user",
        "id_source",
        "name",
        "original_name",
        "type",
        "id_type",
        "usage",
    }
    required |= {"display", "bookmarked"}
    for acc in body["accounts"]:
        assert required <= set(acc)
        assert {"id", "name", "symbol", "precision"} <= set(acc["currency"])
    assert {"accounts", "balances"} <= set(body)
