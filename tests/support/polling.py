"""Waiting for a condition another process makes true (never a sleep standing in for it)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30, every: float = 0.05) -> Any:
    """``predicate()``'s first truthy value, polled every ``every`` seconds for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
