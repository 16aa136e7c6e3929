"""Exponential backoff with full jitter: how long to wait before trying again.

Full jitter (a uniform draw under an exponential ceiling) spreads retries of many tasks that failed
together, so they do not return as a thundering herd; Powens' ``Retry-After`` is a floor; the cap keeps
every countdown under the broker's visibility timeout (checked in Settings).
"""

from __future__ import annotations

import random

from app.config import Settings


def backoff_seconds(attempt: int, settings: Settings, retry_after: float | None, rng: random.Random) -> float:
    ceiling = min(settings.retry_cap_seconds, settings.retry_base_seconds * (2 ** (attempt - 1)))
    delay = rng.uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, settings.retry_cap_seconds)
