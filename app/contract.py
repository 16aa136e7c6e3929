"""The ContractSpec mirror of ``openbanking.balances.refresh`` v1.0.0 (../shared/CONTRACT.md).

Field names are the contract's camelCase names, exactly. Money is ``Decimal``; the JSON writer in
``app.jsonio`` prints it as a JSON number without binary noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from app.errors import InvalidInput


@dataclass(frozen=True)
class OperationMeta:
    key: str
    version: str
    kind: str
    description: str
    goal: str
    context: str
    owners: tuple[str, ...]
    tags: tuple[str, ...]
    stability: str
    policy_auth: str

    @property
    def qualified_name(self) -> str:
        return f"{self.key}.v{self.version}"


REFRESH_OPERATION = OperationMeta(
    key="openbanking.balances.refresh",
    version="1.0.0",
    kind="command",
    description="Refresh balances for a bank account via the configured open banking provider.",
    goal="Ensure canonical balance records reflect the latest values from Powens.",
    context="Triggered by scheduled workflows before generating summaries or forecasting cashflow.",
    owners=("@platform.finance",),
    tags=("open-banking", "powens", "balances"),
    stability="experimental",
    policy_auth="admin",
)

# Siblings used by the admin shell.
GET_OPERATION_KEY = "openbanking.balances.get"
ACCOUNTS_SYNC_OPERATION_KEY = "openbanking.accounts.sync"


class TelemetryEvents:
    BALANCES_REFRESHED = "openbanking.balances.refreshed"
    BALANCES_REFRESH_FAILED = "openbanking.balances.refresh_failed"
    ACCOUNTS_SYNCED = "openbanking.accounts.synced"
    ACCOUNTS_SYNC_FAILED = "openbanking.accounts.sync_failed"
    OVERVIEW_GENERATED = "openbanking.overview.generated"


ID_MAX_LENGTH = 128
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")

Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=ID_MAX_LENGTH)]
BalanceType = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Currency = Annotated[str, StringConstraints(pattern=CURRENCY_RE.pattern)]

# Provider-level balance types ContractSpec knows (the field stays an open-ended string).
KNOWN_BALANCE_TYPES = ("current", "available", "authorised", "uncleared", "credit")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class OpenBankingRefreshBalancesInput(_Model):
    tenantId: Id
    accountId: Id
    connectionId: Id | None = None
    balanceTypes: list[BalanceType] | None = Field(default=None, max_length=16)
    forceRefresh: bool | None = None

    @field_validator("balanceTypes")
    @classmethod
    def _dedupe(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must not be empty when given (omit it to refresh every balance type)")
        return list(dict.fromkeys(v))


class AccountBalanceRecord(_Model):
    """Canonical balance snapshot computed from Powens balance payloads."""

    id: Id
    accountId: Id
    tenantId: Id
    connectionId: Id
    balanceType: BalanceType
    currentBalance: Decimal
    availableBalance: Decimal | None = None
    currency: Currency
    lastUpdatedAt: datetime
    createdAt: datetime
    metadata: dict[str, Any] | None = None


class OpenBankingRefreshBalancesOutput(_Model):
    balances: list[AccountBalanceRecord]
    refreshedAt: datetime
    errors: list[str] | None = None


class OpenBankingGetBalancesOutput(_Model):
    balances: list[AccountBalanceRecord]
    asOf: datetime | None = None


class BankAccountRecord(_Model):
    id: Id
    tenantId: Id
    userId: Id
    connectionId: Id
    externalId: Annotated[str, StringConstraints(min_length=1)]
    institutionId: Annotated[str, StringConstraints(min_length=1)]
    institutionName: Annotated[str, StringConstraints(min_length=1)]
    accountType: Annotated[str, StringConstraints(min_length=1)]
    displayName: Annotated[str, StringConstraints(min_length=1)]
    currency: Currency
    lastSyncedAt: datetime
    createdAt: datetime
    updatedAt: datetime
    institutionLogoUrl: str | None = None
    iban: str | None = None
    bic: str | None = None
    accountNumberMasked: str | None = None
    productCode: str | None = None
    balance: Decimal | None = None
    availableBalance: Decimal | None = None
    metadata: dict[str, Any] | None = None


def parse_input(raw: object) -> OpenBankingRefreshBalancesInput:
    """Validate contract input; the error names each offending field."""
    if isinstance(raw, OpenBankingRefreshBalancesInput):
        return raw
    from pydantic import ValidationError

    try:
        return OpenBankingRefreshBalancesInput.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "input"
            parts.append(f"{field}: {err.get('msg', 'invalid')}")
        raise InvalidInput("invalid input: " + "; ".join(parts)) from None


# Active ISO 4217 codes (plus precious metals and SDR Powens may report). A currency outside this
# set in a Powens payload is an invalid_response, not a guess.
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP
    BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB
    EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR
    MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB
    RWF SAR SBD SCR SDG SEK SGD SHP SLE SLL SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD
    TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XAG XAU XCD XCG XDR XOF XPD XPF
    XPT XSU XUA YER ZAR ZMW ZWG ZWL
    """.split()  # noqa: SIM905
)
