"""The nightly schedule: its slots, and whether its wall-clock times exist in its zone.

A scheduled run is keyed by its slot — the latest time the crontab names at or before now — never by
the moment a worker happens to execute the tick. A time that does not exist on some day (the clock
jumps over it) or happens twice (the clock goes back) is refused at start-up: 02:00-03:00 in
Europe/Paris is both, in March and in October (celery#6438 reports exactly this zone and hour).
Day of month and day of week both apply, as in Celery's crontab.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from celery.schedules import crontab


def parse(cron: str) -> crontab:
    minute, hour, dom, month, dow = cron.split()
    return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month, day_of_week=dow)


def fires_on(c: crontab, day: date) -> bool:
    return (
        day.day in c.day_of_month
        and day.month in c.month_of_year
        and (day.weekday() + 1) % 7 in c.day_of_week  # crontab counts from Sunday = 0
    )


def previous_fire(cron: str, now: datetime, days: int = 400) -> datetime:
    """The latest wall-clock time at or before ``now`` (aware, in its zone) that ``cron`` names."""
    c = parse(cron)
    for back in range(days):
        day = (now - timedelta(days=back)).date()
        if not fires_on(c, day):
            continue
        for h in sorted(c.hour, reverse=True):
            for m in sorted(c.minute, reverse=True):
                at = datetime(day.year, day.month, day.day, h, m, tzinfo=now.tzinfo)
                if at <= now:
                    return at
    raise ValueError(f"the schedule {cron!r} has no slot in the last {days} days")


def cron_time_problem(cron: str, zone: ZoneInfo, days: int = 400) -> str | None:
    """Why the crontab's times are unsafe in ``zone`` on a day it fires, or None."""
    try:
        c = parse(cron)
    except ValueError as exc:
        return f"not a crontab expression ({exc})"
    start = datetime.now(UTC).astimezone(zone).date()
    for offset in range(days):
        day = start + timedelta(days=offset)
        if not fires_on(c, day):
            continue
        for h in sorted(c.hour):
            for m in sorted(c.minute):
                wall = datetime(day.year, day.month, day.day, h, m, tzinfo=zone)
                if wall.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall.replace(tzinfo=None):
                    return f"{h:02d}:{m:02d} does not exist on {day} in {zone.key} (clocks go forward)"
                if wall.utcoffset() != wall.replace(fold=1).utcoffset():
                    return f"{h:02d}:{m:02d} happens twice on {day} in {zone.key} (clocks go back)"
    return None
