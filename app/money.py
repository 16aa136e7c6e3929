"""Exact money arithmetic: sums of amounts to the last digit.

Decimal's default context keeps 28 significant digits and rounds past them, silently. Powens may send
(and the parser accepts) amounts of up to 30 significant digits — under 10^18 with up to 30 decimal
places — so a sum in the default context can round an amount the store keeps exactly. ``exact_sum``
sizes the context to its operands instead, and traps any rounding that would still happen.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, Inexact, localcontext


def exact_sum(*amounts: Decimal) -> Decimal:
    """The sum of ``amounts``, every digit kept."""
    return exact_total(amounts)


def exact_total(amounts: Iterable[Decimal]) -> Decimal:
    """The sum of an iterable of amounts, every digit kept (0 for none)."""
    values = list(amounts)
    if not values:
        return Decimal(0)
    with localcontext() as ctx:
        low = min(min(int(a.as_tuple().exponent), 0) for a in values)
        high = max((a.adjusted() for a in values if a), default=0)
        # enough digits for the widest operand, and for the carries of len(values) additions
        ctx.prec = max(28, high - low + 2 + len(str(len(values))))
        ctx.traps[Inexact] = True
        total = Decimal(0)
        for a in values:
            total += a
        return total


# ISO 4217 minor units that are not 2 (every other currency has 2). A currency's scale is how many
# decimals its amounts are shown with: padded up to it, never rounded down to it.
_MINOR_UNITS: dict[str, int] = {
    code: int(places)
    for places, codes in (
        ("0", "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"),
        ("3", "BHD IQD JOD KWD LYD OMR TND"),
        ("4", "CLF UYW"),
        # Metals, SDR and test codes have no minor unit in ISO 4217: shown as they come.
        ("0", "XAG XAU XDR XPD XPT XSU XUA"),
    )
    for code in codes.split(" ")
}


def scale(currency: str) -> int:
    """The number of decimals ISO 4217 gives ``currency`` (2 unless listed otherwise)."""
    return _MINOR_UNITS.get(currency, 2)


def at_scale(amount: Decimal, currency: str) -> Decimal:
    """``amount`` written with at least its currency's decimals: 40846.8 EUR is 40846.80, 1234.5678 EUR
    stays 1234.5678 (a digit Powens sent is never rounded away). Equal in value to ``amount``."""
    if not amount.is_finite():
        return amount
    places = scale(currency)
    if -int(amount.as_tuple().exponent) >= places:
        return amount
    return amount.quantize(Decimal(1).scaleb(-places))


def money_text(amount: Decimal, currency: str) -> str:
    """An exact amount as the text the shell's JSON carries: ``"40846.80"``."""
    return format(at_scale(amount, currency), "f")


def money_display(amount: Decimal, currency: str, *, sign: bool = False) -> str:
    """An exact amount for a table: digits grouped by thousands, at least the currency's decimals."""
    return format(at_scale(amount, currency), "+,f" if sign else ",f")


def rounded_text(amount: Decimal, currency: str) -> str:
    """An estimate (a forecast) rounded to its currency's decimals: its other digits mean nothing."""
    return format(amount.quantize(Decimal(1).scaleb(-scale(currency))), "f")
