"""Cashflow forecast: a random walk with a robust drift, plus the known coming amounts.

Model, per tenant and currency, over the daily totals of the last ``history`` days:
- drift = Theil-Sen slope (median of pairwise slopes): one bad day does not bend the trend;
- projection for day h ahead = last total + drift x h + coming (operations Powens already knows of,
  not yet debited);
- band = +-1.96 x sigma x sqrt(h), where sigma = 1.4826 x MAD of the day-over-day changes around the drift (a
  robust standard deviation), so the band widens with the horizon as a random walk's does.
With fewer than ``min_points`` days the projection is flat (last total + coming, no band), and says so.
Everything is Decimal; outputs are rounded to cents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from statistics import median
from typing import Any

from app.money import exact_total, money_text, rounded_text

CENT = Decimal("0.01")
Z95 = Decimal("1.96")
MAD_TO_SIGMA = Decimal("1.4826")


@dataclass(frozen=True)
class ForecastPoint:
    day: date
    value: Decimal
    lower: Decimal
    upper: Decimal


@dataclass
class Forecast:
    currency: str
    method: str  # "trend" | "flat"
    history_days: int
    drift_per_day: Decimal
    sigma: Decimal
    coming: Decimal
    last_total: Decimal
    points: list[ForecastPoint] = field(default_factory=list)
    note: str | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "currency": self.currency,
            "method": self.method,
            "historyDays": self.history_days,
            "driftPerDay": self.drift_per_day,
            "sigma": self.sigma,
            "coming": self.coming,
            "lastTotal": self.last_total,
            "note": self.note,
            "points": [
                {"day": p.day.isoformat(), "value": p.value, "lower": p.lower, "upper": p.upper}
                for p in self.points
            ],
        }


def theil_sen_slope(ys: Sequence[Decimal]) -> Decimal:
    """Median of (y_j - y_i) / (j - i) over all pairs i < j, x being the day index."""
    slopes = [(ys[j] - ys[i]) / Decimal(j - i) for i in range(len(ys)) for j in range(i + 1, len(ys))]
    return Decimal(median(slopes)) if slopes else Decimal(0)


def robust_sigma(ys: Sequence[Decimal], drift: Decimal) -> Decimal:
    diffs = [ys[i + 1] - ys[i] - drift for i in range(len(ys) - 1)]
    if not diffs:
        return Decimal(0)
    mid = Decimal(median(diffs))
    return MAD_TO_SIGMA * Decimal(median([abs(d - mid) for d in diffs]))


def project(
    currency: str,
    history: Sequence[tuple[date, Decimal]],
    *,
    coming: Decimal,
    horizon: int,
    min_points: int,
) -> Forecast:
    """``history`` is one total per consecutive day, oldest first, ending on the forecast's day 0."""
    if not history:
        raise ValueError("no history to project from")
    ys = [v for _, v in history]
    last_day, last = history[-1]
    n = len(ys)
    if n < min_points:
        drift, sigma, method = Decimal(0), Decimal(0), "flat"
        note = f"only {n} day(s) of history (fewer than {min_points}): flat projection, no band"
    else:
        drift, method, note = theil_sen_slope(ys), "trend", None
        sigma = robust_sigma(ys, drift)
    points = []
    for h in range(1, horizon + 1):
        centre = last + drift * h + coming
        half = Z95 * sigma * Decimal(h).sqrt()
        points.append(
            ForecastPoint(
                last_day + timedelta(days=h), _cents(centre), _cents(centre - half), _cents(centre + half)
            )
        )
    return Forecast(
        currency=currency,
        method=method,
        history_days=n,
        drift_per_day=_cents(drift),
        sigma=_cents(sigma),
        coming=coming,
        last_total=last,
        points=points,
        note=note,
    )


def daily_totals(
    per_account: dict[str, dict[date, Decimal]], start: date, end: date
) -> list[tuple[date, Decimal]]:
    """Sum accounts per day, carrying each account's last known value over days it has no snapshot.

    Days before an account's first snapshot do not count it. Returns consecutive days from the first
    day any account has a value, to ``end``.
    """
    first = min((min(days) for days in per_account.values() if days), default=None)
    if first is None:
        return []
    day = max(first, start)
    last_value: dict[str, Decimal] = {}
    for acc, days in per_account.items():  # values before the window seed the carry-forward
        before = [d for d in days if d < day]
        if before:
            last_value[acc] = days[max(before)]
    out = []
    while day <= end:
        for acc, days in per_account.items():
            if day in days:
                last_value[acc] = days[day]
        out.append((day, exact_total(last_value.values())))
        day += timedelta(days=1)
    return out


def _cents(d: Decimal) -> Decimal:
    return d.quantize(CENT, rounding=ROUND_HALF_EVEN)


def present_forecast(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored forecast as every reader gets it: its amounts as strings at the currency's scale, the
    projections rounded to it (an estimate's further digits mean nothing), the rest exact."""
    ccy = str(doc["currency"])

    def exact(value: Any) -> str:
        return money_text(Decimal(str(value)), ccy)

    def estimate(value: Any) -> str:
        return rounded_text(Decimal(str(value)), ccy)

    return {
        **doc,
        "driftPerDay": estimate(doc["driftPerDay"]),
        "sigma": estimate(doc["sigma"]),
        "coming": exact(doc["coming"]),
        "lastTotal": exact(doc["lastTotal"]),
        "points": [
            {**p, "value": estimate(p["value"]), "lower": estimate(p["lower"]), "upper": estimate(p["upper"])}
            for p in doc["points"]
        ],
    }
