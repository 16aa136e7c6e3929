"""The ContractSpec mirror of ``openbanking.balances.refresh`` v1.0.0 (docs/contract.md).

On the wire, field names are the contract's camelCase names, exactly (an alias generator); in Python
they are snake_case attributes. Input from the wire is validated by alias only (``parse_input``), so
a snake_case key is an unknown field there. Money is ``Decimal``; the JSON writer in ``app.jsonio``
prints it as a JSON number without binary noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from app.errors import InvalidInput
from app.money import at_scale


@dataclass(frozen=True)
class OperationMeta:
    """An operation and its policy, in ContractSpec's terms. ``policy_auth`` is an auth level:
    ``anonymous`` (nobody is checked), ``user`` (any known actor with a role) or a role name."""

    key: str
    version: str
    kind: str
    description: str
    policy_auth: str
    goal: str = ""
    context: str = ""
    owners: tuple[str, ...] = ("@platform.finance",)
    tags: tuple[str, ...] = ()
    stability: str = "experimental"

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

# Siblings of the same family, implemented by the admin shell.
GET_OPERATION = OperationMeta(
    key="openbanking.balances.get",
    version="1.0.0",
    kind="query",
    description="Read the canonical balance records of a tenant's accounts (no provider call).",
    policy_auth="user",
    tags=("open-banking", "powens", "balances"),
)
ACCOUNTS_SYNC_OPERATION = OperationMeta(
    key="openbanking.accounts.sync",
    version="1.0.0",
    kind="command",
    description="Discover and refresh the list of bank accounts of a tenant's Powens users.",
    goal="Keep the canonical account list aligned with Powens.",
    context="Run by an operator after linking a Powens user.",
    policy_auth="admin",
    tags=("open-banking", "powens", "accounts"),
)


class TelemetryEvents:
    BALANCES_REFRESHED = "openbanking.balances.refreshed"
    BALANCES_REFRESH_FAILED = "openbanking.balances.refresh_failed"
    ACCOUNTS_SYNCED = "openbanking.accounts.synced"
    ACCOUNTS_SYNC_FAILED = "openbanking.accounts.sync_failed"
    OVERVIEW_GENERATED = "openbanking.overview.generated"


ID_MAX_LENGTH = 128
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


def _printable(value: str) -> str:
    """Ids and balance types are printable text: a control character (a newline in an id) would forge
    log lines and break the admin shell's one-line errors."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


Id = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=ID_MAX_LENGTH),
    AfterValidator(_printable),
]
BalanceType = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64), AfterValidator(_printable)
]
Currency = Annotated[str, StringConstraints(pattern=CURRENCY_RE.pattern)]


def check_id(value: str, what: str) -> str:
    """An id given on its own (a shell option): the contract's rules for ids, the message naming it."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return str(TypeAdapter(Id).validate_python(value))
    except ValidationError as exc:
        problem = str(exc.errors()[0].get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidInput(f"{what} {value[:40]!r}: {problem.lower()}") from None


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class _Money(_Model):
    """A record whose amounts are written at least at their currency's scale (40846.80 EUR, never
    40846.8), whatever path built it: equal in value, never rounded (``app.money.at_scale``)."""

    _amounts: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _at_scale(self) -> _Money:
        currency = getattr(self, "currency", "")
        for name in self._amounts:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, at_scale(value, currency))
        return self


class OpenBankingRefreshBalancesInput(_Model):
    tenant_id: Id
    account_id: Id
    connection_id: Id | None = None
    balance_types: list[BalanceType] | None = Field(default=None, max_length=16)
    force_refresh: bool | None = None

    @field_validator("balance_types")
    @classmethod
    def _dedupe(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must not be empty when given (omit it to refresh every balance type)")
        return list(dict.fromkeys(v))


class AccountBalanceRecord(_Money):
    """Canonical balance snapshot computed from Powens balance payloads."""

    _amounts = ("current_balance", "available_balance")

    id: Id
    account_id: Id
    tenant_id: Id
    connection_id: Id
    balance_type: BalanceType
    current_balance: Decimal
    available_balance: Decimal | None = None
    currency: Currency
    last_updated_at: datetime
    created_at: datetime
    metadata: dict[str, Any] | None = None


class OpenBankingRefreshBalancesOutput(_Model):
    balances: list[AccountBalanceRecord]
    refreshed_at: datetime
    errors: list[str] | None = None


class OpenBankingGetBalancesOutput(_Model):
    balances: list[AccountBalanceRecord]
    as_of: datetime | None = None


NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class BankAccountRecord(_Money):
    _amounts = ("balance", "available_balance")

    id: Id
    tenant_id: Id
    user_id: Id
    connection_id: Id
    external_id: NonEmpty
    institution_id: NonEmpty
    institution_name: NonEmpty
    account_type: NonEmpty
    display_name: NonEmpty
    currency: Currency
    last_synced_at: datetime
    created_at: datetime
    updated_at: datetime
    institution_logo_url: str | None = None
    iban: str | None = None
    bic: str | None = None
    account_number_masked: str | None = None
    product_code: str | None = None
    balance: Decimal | None = None
    available_balance: Decimal | None = None
    metadata: dict[str, Any] | None = None


def parse_input(raw: object) -> OpenBankingRefreshBalancesInput:
    """Validate contract input from the wire (camelCase only); the error names each offending field."""
    if isinstance(raw, OpenBankingRefreshBalancesInput):
        return raw
    from pydantic import ValidationError

    try:
        return OpenBankingRefreshBalancesInput.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "input"
            parts.append(f"{field}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}")
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
