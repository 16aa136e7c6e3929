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


# ISO 4217 minor units where they are not 2. A code with no minor unit (precious metals, the SDR)
# counts as 0: its amounts are shown with the places they have.
_SCALE_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF XAG XAU XDR XPD XPT XSU XUA"
_SCALE_3 = "BHD IQD JOD KWD LYD OMR TND"
_SCALE_4 = "CLF UYW"
_SCALES = {
    code: places for places, codes in ((0, _SCALE_0), (3, _SCALE_3), (4, _SCALE_4)) for code in codes.split()
}


def scale(currency: str) -> int:
    """The currency's decimal places (ISO 4217 minor units): 2 for EUR, 0 for JPY, 3 for KWD."""
    return _SCALES.get(currency, 2)


def at_scale(amount: Decimal, currency: str) -> Decimal:
    """``amount`` written with at least its currency's places (40846.8 EUR is 40846.80): zeros are
    added, never a digit taken away — an amount with more places than its currency keeps them all.
    Equal in value to ``amount``. Built from the digits, not with ``quantize``, which is bounded by
    the context's precision (Powens' amounts may have 30 significant digits)."""
    sign, digits, exponent = amount.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"non-finite amount {amount}")
    places = scale(currency)
    if exponent > -places:
        digits = (*digits, *(0,) * (exponent + places))
        exponent = -places
    return Decimal((sign, digits, exponent))


def money_text(amount: Decimal, currency: str) -> str:
    """An exact amount as the text the shell's JSON carries: ``"40846.80"``."""
    return format(at_scale(amount, currency), "f")


def money_display(amount: Decimal, currency: str, *, sign: bool = False) -> str:
    """An exact amount for a table: digits grouped by thousands, at least the currency's places."""
    return format(at_scale(amount, currency), "+,f" if sign else ",f")


def rounded_text(amount: Decimal, currency: str) -> str:
    """An estimate (a forecast) rounded to its currency's places: its other digits mean nothing."""
    with localcontext() as ctx:
        ctx.prec = max(28, amount.adjusted() + scale(currency) + 2)
        return format(amount.quantize(Decimal(1).scaleb(-scale(currency))), "f")
