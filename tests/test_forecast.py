"""Forecast math on hand-computed series."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal as D

from app.reports.forecast import daily_totals, project, robust_sigma, theil_sen_slope

DAY0 = date(2026, 11, 1)


def series(values: list[str]) -> list[tuple[date, D]]:
    return [(DAY0 + timedelta(days=i), D(v)) for i, v in enumerate(values)]


def test_linear_series_gives_its_slope_and_no_band() -> None:
    hist = series(["100", "110", "120", "130", "140", "150", "160", "170"])
    fc = project("EUR", hist, coming=D("-25.50"), horizon=3, min_points=7)
    assert fc.method == "trend" and fc.drift_per_day == D("10.00") and fc.sigma == D("0.00")
    # last 170, +10/day, plus the known coming -25.50
    assert [p.value for p in fc.points] == [D("154.50"), D("164.50"), D("174.50")]
    assert all(p.lower == p.value == p.upper for p in fc.points)
    assert fc.points[0].day == date(2026, 11, 9)


def test_one_outlier_does_not_bend_the_theil_sen_trend() -> None:
    ys = [D(v) for v in ["100", "110", "120", "5000", "140", "150", "160", "170", "180"]]
    assert theil_sen_slope(ys) == D(10)
    # an ordinary least-squares slope would be pulled far away by the 5000


def test_band_is_196_robust_sigmas_times_sqrt_h() -> None:
    # differences alternate 8, 12 around a drift of 10: |d - drift| = 2 everywhere, MAD = 2,
    # sigma = 1.4826 x 2 = 2.9652
    hist = series(["0", "8", "20", "28", "40", "48", "60", "68", "80"])
    ys = [v for _, v in hist]
    assert theil_sen_slope(ys) == D(10)
    assert robust_sigma(ys, D(10)) == D("2.9652")
    fc = project("EUR", hist, coming=D(0), horizon=4, min_points=7)
    half_1 = D("1.96") * D("2.9652")  # 5.811792
    assert fc.points[0].value == D("90.00")
    assert fc.points[0].upper == D("95.81") and fc.points[0].lower == D("84.19")
    # h = 4: sqrt(4) = 2, so the half-width doubles: 11.623584
    assert fc.points[3].value == D("120.00")
    assert fc.points[3].upper - fc.points[3].value == (half_1 * 2).quantize(D("0.01"))


def test_short_history_is_a_flat_projection_that_says_so() -> None:
    fc = project("USD", series(["500", "520", "490"]), coming=D("-10"), horizon=5, min_points=7)
    assert fc.method == "flat"
    assert fc.note and "3 day(s) of history" in fc.note
    assert {p.value for p in fc.points} == {D("480.00")}
    assert all(p.lower == p.upper == p.value for p in fc.points)


def test_daily_totals_carry_missing_days_forward_per_account() -> None:
    d = DAY0
    per_account = {
        "a": {d: D("10"), d + timedelta(days=2): D("30")},
        "b": {d + timedelta(days=1): D("5")},
    }
    totals = daily_totals(per_account, d, d + timedelta(days=3))
    assert totals == [
        (d, D("10")),  # b not known yet
        (d + timedelta(days=1), D("15")),
        (d + timedelta(days=2), D("35")),
        (d + timedelta(days=3), D("35")),  # both carried forward
    ]


def test_money_stays_exact_through_the_projection() -> None:
    hist = series(["0.10", "0.20", "0.30", "0.40", "0.50", "0.60", "0.70"])
    fc = project("EUR", hist, coming=D("0.01"), horizon=1, min_points=7)
    assert fc.points[0].value == D("0.81")
