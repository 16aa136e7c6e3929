"""The security suites' figures (build/security.json), from which ``python -m tests.report`` renders
the "Security checks" table of docs/security.md. Each suite module notes what it measured; the
figures are written when the module ends, only if none of its tests failed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RESULTS_FILE = Path(__file__).resolve().parents[2] / "build" / "security.json"
figures: dict[str, dict[str, Any]] = {}


def note(check: str, **values: Any) -> None:
    figures.setdefault(check, {}).update(values)


def count_case(check: str, cases: int = 1) -> None:
    """Fuzzed cases tried (none ever uncaught: a test fails first)."""
    figures.setdefault(check, {"cases": 0, "uncaught": 0})
    figures[check]["cases"] += cases


@pytest.fixture(scope="module")
def security_figures(request: pytest.FixtureRequest) -> Iterator[None]:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        return  # a failing run's figures are not the documentation's
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    RESULTS_FILE.write_text(json.dumps({**previous, **figures}, indent=2))
