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
