from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.contract import (
    REFRESH_OPERATION,
    AccountBalanceRecord,
    OpenBankingRefreshBalancesOutput,
    TelemetryEvents,
    parse_input,
)
from app.errors import InvalidInput, Reason
from app.jsonio import dumps


def test_operation_metadata_mirrors_the_contract_document() -> None:
    assert REFRESH_OPERATION.key == "openbanking.balances.refresh"
    assert REFRESH_OPERATION.version == "1.0.0"
    assert REFRESH_OPERATION.policy_auth == "admin"
    assert REFRESH_OPERATION.stability == "experimental"
    assert REFRESH_OPERATION.owners == ("@platform.finance",)
    assert REFRESH_OPERATION.tags == ("open-banking", "powens", "balances")
    assert REFRESH_OPERATION.qualified_name == "openbanking.balances.refresh.v1.0.0"
    assert TelemetryEvents.BALANCES_REFRESHED == "openbanking.balances.refreshed"
    assert TelemetryEvents.BALANCES_REFRESH_FAILED == "openbanking.balances.refresh_failed"


def test_valid_input_with_every_field() -> None:
    inp = parse_input(
        {
            "tenantId": "t1",
            "accountId": "acc_1",
            "connectionId": "con_1",
            "balanceTypes": ["current", "current", "uncleared"],
            "forceRefresh": True,
        }
    )
    assert inp.balance_types == ["current", "uncleared"]  # duplicates removed, order kept
    assert inp.force_refresh is True


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"accountId": "a"}, "tenantId"),
        ({"tenantId": "", "accountId": "a"}, "tenantId"),
        ({"tenantId": "   ", "accountId": "a"}, "tenantId"),
        ({"tenantId": "t", "accountId": "x" * 129}, "accountId"),
        ({"tenantId": "t", "accountId": "a", "balanceTypes": [""]}, "balanceTypes.0"),
        ({"tenantId": "t", "accountId": "a", "balanceTypes": []}, "balanceTypes"),
        ({"tenantId": "t", "accountId": "a", "forceRefresh": "maybe"}, "forceRefresh"),
        ({"tenantId": "t", "accountId": "a", "surprise": 1}, "surprise"),
        ({"tenantId": 5, "accountId": "a"}, "tenantId"),
    ],
)
def test_invalid_input_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_input(raw)
    assert info.value.reason is Reason.INVALID_INPUT
    assert f"{field}:" in info.value.message


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.none(), st.text(max_size=200), st.integers())))
def test_arbitrary_input_is_accepted_or_rejected_with_invalid_input(raw: dict[str, object]) -> None:
    try:
        inp = parse_input(raw)
    except InvalidInput as exc:
        assert exc.message.startswith("invalid input: ")
    else:
        assert 1 <= len(inp.tenant_id) <= 128 and 1 <= len(inp.account_id) <= 128


@pytest.mark.parametrize("currency", ["eur", "EURO", "E1R", ""])
def test_record_rejects_a_malformed_currency(currency: str) -> None:
    now = datetime.now(UTC)
    with pytest.raises(ValueError, match="currency"):
        AccountBalanceRecord(
            id="b",
            accountId="a",
            tenantId="t",
            connectionId="c",
            balanceType="current",
            currentBalance=Decimal(1),
            currency=currency,
            lastUpdatedAt=now,
            createdAt=now,
        )


def test_output_json_has_the_exact_contract_shape_and_exact_numbers() -> None:
    at = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)
    total = Decimal("0.1") + Decimal("0.2")
    out = OpenBankingRefreshBalancesOutput(
        balances=[
            AccountBalanceRecord(
                id="bal_1",
                accountId="acc_1",
                tenantId="t1",
                connectionId="con_1",
                balanceType="current",
                currentBalance=Decimal("1234.56"),
                availableBalance=total,
                currency="EUR",
                lastUpdatedAt=at,
                createdAt=at,
                metadata={"provider": "powens"},
            )
        ],
        refreshedAt=at,
        errors=None,
    )
    text = dumps(out)
    assert '"currentBalance": 1234.56' in text
    assert '"availableBalance": 0.3' in text  # not 0.30000000000000004
    doc = json.loads(text)
    assert set(doc) == {"balances", "refreshedAt", "errors"}
    assert set(doc["balances"][0]) == {
        "id",
        "accountId",
        "tenantId",
        "connectionId",
        "balanceType",
        "currentBalance",
        "availableBalance",
        "currency",
        "lastUpdatedAt",
        "createdAt",
        "metadata",
    }
    assert doc["refreshedAt"] == "2026-11-23T06:00:00Z"


def test_large_amounts_survive_json_digit_for_digit() -> None:
    big = Decimal("123456789012345678.99")
    assert dumps({"x": big}) == '{"x": 123456789012345678.99}'


def test_a_string_that_looks_like_the_encoders_placeholder_stays_a_string() -> None:
    # Decimals are written through placeholders replaced in the text: a string from outside (a Powens
    # name) spelled like one must neither become a number nor push the real amount out.
    from decimal import Decimal

    from app import jsonio

    doc = {"name": "\x00dec0\x00", "balance": Decimal("12.30")}
    text = jsonio.dumps(doc)
    assert jsonio.loads(text) == doc
