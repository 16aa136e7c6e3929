"""Metrics under prefork: one /metrics per worker, summing its children, surviving child recycling."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.refresh.outcomes import wait_for
from tests.support.data import seed_tenant
from tests.support.metrics import sum_scrape
from tests.support.processes import Worker, run_worker, service_env

pytestmark = pytest.mark.e2e


@pytest.fixture
def recycling_worker(
    settings: Settings, redis_url: str, sandbox: Sandbox, tmp_path: Path
) -> Iterator[Worker]:
    env = service_env(settings.database_url, redis_url, sandbox)
    # Each child exits after 2 tasks: the worker recycles its children throughout the test.
    with run_worker(env, tmp_path / "w.log", concurrency=2, extra_args=("--max-tasks-per-child", "2")) as w:
        yield w


def test_one_scrape_counts_every_refresh_of_every_child_even_after_recycling(
    recycling_worker: Worker, settings: Settings, sandbox: Sandbox
) -> None:
    import time

    from app.contract import OpenBankingRefreshBalancesInput
    from app.store.states import Trigger
    from app.worker.tasks import app, dispatch_refresh

    app.conf.broker_url = recycling_worker.env["CELERY_BROKER_URL"]
    first = recycling_worker.scrape()
    # Label sets known in advance exist at zero before anything happened (rate() works at once).
    assert (
        'openbanking_balances_refresh_failed_total{provider="powens",reason="rate_limited",'
        'trigger="scheduled"} 0.0' in first
    )
    assert sum_scrape(first, "openbanking_balances_refreshed_total") == 0

    t = seed_tenant(settings, sandbox, "m-1", accounts=3)
    n = 11
    ids = []
    for i in range(n):
        acc = t.account_ids[i % 3]
        ids.append(
            dispatch_refresh(
                OpenBankingRefreshBalancesInput(tenant_id="m-1", account_id=acc),
                "alice",
                Trigger.ON_DEMAND,
                task_id=str(uuid.uuid4()),
            )
        )
    deadline = time.monotonic() + 90
    for task_id in ids:
        assert wait_for(settings, task_id, None, timeout=deadline - time.monotonic(), poll=0.1) is not None
    time.sleep(0.5)  # let the last children finish exiting (their files are folded at scrape time)

    body = recycling_worker.scrape()
    assert sum_scrape(body, "openbanking_balances_refreshed_total") == n
    assert sum_scrape(body, "openbanking_balance_refresh_duration_seconds_count") == n
    # No tenant or account id in any label.
    assert "m-1" not in body and not any(a in body for a in t.account_ids)
    # Children were recycled (pids changed) and their files were folded: the directory stays small.
    mdir = Path(recycling_worker.env["BALANCES_METRICS_DIR"])
    counter_files = sorted(p.name for p in mdir.glob("counter_*.db"))
    assert "counter_archive.db" in counter_files
    assert len(counter_files) <= 4, counter_files  # parent + 2 live children + archive
    again = recycling_worker.scrape()
    assert sum_scrape(again, "openbanking_balances_refreshed_total") == n  # stable across scrapes
