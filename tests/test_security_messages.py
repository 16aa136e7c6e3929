"""Forged task messages and planted beat entries: work is authorized where it executes (the signed
message), and nothing Redis holds is believed because it is there.
Figures go to build/security.json (``tests.support.figures``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import func, select

from app import signing
from app.config import Settings
from app.devtools.sandbox import Sandbox
from app.store import repo
from app.store.db import session_scope
from app.store.models import AccountBalance, ForcedSync, RefreshAttempt
from tests.conftest import SIGNING_KEY
from tests.support.data import seed_tenant
from tests.support.figures import note
from tests.support.metrics import sum_scrape, total
from tests.support.processes import run_worker, service_env, start_beat

UTC_ZONE = ZoneInfo("UTC")
PUSH_KEY = "the-receivers-push-key-" + "7" * 32
FUZZ_EXAMPLES = 5_000  # per pure fuzz test; with the database-backed ones, over 10,000 cases a run
pytestmark = pytest.mark.usefixtures("security_figures")


# -- authenticated work -------------------------------------------------------------------------------


FORGER = """
import json, sys
from celery import Celery
from kombu import Connection
url, spec = sys.argv[1], json.loads(sys.argv[2])
c = Celery("forger", broker=url)
if spec.get("embed") is not None:
    # A raw protocol-2 message whose body overrides request fields (what Celery merges into the
    # request after the headers): e.g. "args" set to a captured message's genuine arguments.
    headers = {"lang": "py", "task": spec["name"], "id": spec["task_id"], "root_id": spec["task_id"],
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", "origin": "forger",
               **spec["headers"]}
    body = [spec["args"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None,
                                **spec["embed"]}]
    with Connection(url) as conn:
        conn.Producer().publish(body, routing_key="interactive", exchange="", headers=headers,
                                serializer="json")
else:
    link = None
    if spec.get("link"):
        link = c.signature(spec["link"]["name"], args=spec["link"]["args"], immutable=True,
                           queue="interactive")
    c.send_task(spec["name"], args=spec["args"], task_id=spec["task_id"], headers=spec["headers"],
                link=link, queue="interactive")
"""


def forge(
    broker_url: str,
    name: str,
    task_id: str,
    args: list[Any],
    headers: dict[str, str],
    *,
    link: dict[str, Any] | None = None,
    embed: dict[str, Any] | None = None,
) -> None:
    """Publish as someone with broker access only would: plain Celery or kombu, without the service's
    code or keys."""
    spec = {"name": name, "task_id": task_id, "args": args, "headers": headers, "link": link, "embed": embed}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_"))}
    subprocess.run(
        [sys.executable, "-c", FORGER, broker_url, json.dumps(spec)],
        cwd="/",  # not the project: the forger has no access to its code or keys
        env=env,
        check=True,
        timeout=60,
    )


@pytest.mark.e2e
def test_forged_task_messages_are_denied_audited_counted_and_never_reach_powens(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(redis_url).flushdb()
    t = seed_tenant(settings, sandbox, "sec-forge", accounts=2)
    acc, other = t.account_ids
    calls = sandbox.state.calls_by_user[t.user.id]
    keys = signing.keys_from(SIGNING_KEY)
    genuine_args = [{"tenantId": "sec-forge", "accountId": other}, "alice", "on_demand"]
    stolen = signing.sign(keys, "balances.refresh_account", "captured-1", genuine_args, {})
    forged = {
        "no signature, the scheduler named": (
            [
                {"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True},
                "system:scheduler",
                "scheduled",
            ],
            {},
        ),
        "no signature, a real admin named": (
            [{"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True}, "alice", "on_demand"],
            {},
        ),
        "a signature made with another key": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {signing.HEADER: signing.sign([b"x" * 40], "balances.refresh_account", "forged-3", [], {})},
        ),
        "a captured signature, the account changed": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {signing.HEADER: stolen},
        ),
        "a captured signature, the task id changed": (genuine_args, {signing.HEADER: stolen}),
        "signed with the webhook receiver's key, good for pushes only": (
            [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
            {
                signing.HEADER: signing.sign(
                    signing.keys_from(PUSH_KEY),
                    "balances.refresh_account",
                    f"forged-{5}",
                    [{"tenantId": "sec-forge", "accountId": acc}, "alice", "on_demand"],
                    {},
                )
            },
        ),
    }
    scheduler_forcing = [
        {"tenantId": "sec-forge", "accountId": acc, "forceRefresh": True},
        "system:scheduler",
        "scheduled",
    ]
    env = service_env(settings.database_url, redis_url, sandbox, BALANCES_PUSH_SIGNING_KEY=PUSH_KEY)
    with run_worker(env, tmp_path / "w.log") as worker:
        before = worker.scrape()
        for i, (args, headers) in enumerate(forged.values()):
            forge(redis_url, "balances.refresh_account", f"forged-{i}", args, headers)
        # The captured message itself, its body rewriting the request's copy of the arguments (what a
        # check of request.args would verify) while the task would run with the forged ones.
        forge(
            redis_url,
            "balances.refresh_account",
            "captured-1",
            scheduler_forcing,
            {signing.HEADER: stolen},
            embed={"args": genuine_args},
        )
        # A forged refresh riding as the callback of another task's message: the carrier is denied,
        # and its callback must never be published (this worker would sign it).
        forge(
            redis_url,
            "balances.sweep_runs",
            "forged-carrier",
            [],
            {},
            link={"name": "balances.refresh_account", "args": scheduler_forcing},
        )
        forged["a captured signature, the arguments rewritten in the body"] = (scheduler_forcing, {})

        def denials() -> int:
            with session_scope(settings) as s:
                return int(
                    s.scalar(
                        select(func.count())
                        .select_from(RefreshAttempt)
                        .where(RefreshAttempt.reason == "policy_denied")
                    )
                    or 0
                )

        def carrier_denied() -> bool:
            with session_scope(settings) as s:
                return any(e.outcome == "denied" for e in repo.audit_events(s, "balances.sweep_runs"))

        deadline = time.monotonic() + 60
        while denials() < len(forged) or not carrier_denied():
            assert time.monotonic() < deadline, "forged messages not all denied"
            time.sleep(0.2)
        after = worker.scrape()
    # The worker has shut down warm (every started task finished): a callback the carrier published
    # would now be in a queue or already run; neither happened.
    broker = redis.Redis.from_url(redis_url)
    assert sum(broker.llen(q) for q in ("interactive", "push", "reports", "refresh")) == 0
    assert sandbox.state.calls_by_user[t.user.id] == calls  # no Powens call at all
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0  # no PSD2 slot spent
        assert s.scalar(select(func.count()).select_from(AccountBalance)) == 0  # nothing refreshed
        audits = repo.attempts(s, "sec-forge")
    assert [a.reason for a in audits] == ["policy_denied"] * len(forged)
    assert all(a.task_id is None for a in audits)  # a forger cannot pre-empt a real task's outcome
    failed = "openbanking_balances_refresh_failed_total"
    assert sum_scrape(after, failed) - sum_scrape(before, failed) == len(forged)
    denied = total(after, "balances_task_executions_total", task="balances.refresh_account", outcome="denied")
    assert denied == len(forged)
    assert total(after, "balances_task_executions_total", task="balances.sweep_runs", outcome="denied") == 1
    tried = len(forged) + 1
    note("forged task messages", tried=tried, run=0, denied_audited_counted=len(audits) + 1)


PLANT_ENTRY = """
import sys
from celery import Celery
from celery.schedules import schedule
from redbeat.schedulers import RedBeatSchedulerEntry
url, acc = sys.argv[1:]
c = Celery("forger", broker=url)
c.conf.redbeat_redis_url = url
c.conf.redbeat_key_prefix = "balances:redbeat"  # visible to anyone who can read Redis
args = [{"tenantId": "sec-beat", "accountId": acc, "forceRefresh": True}, "system:scheduler", "scheduled"]
RedBeatSchedulerEntry("planted", "balances.refresh_account", schedule(1), args=args,
                      options={"queue": "interactive"}, app=c).save()
RedBeatSchedulerEntry("sweep-nightly-runs", "balances.refresh_account", schedule(1), args=args,
                      options={"queue": "interactive"}, app=c).save()  # a configured name, another task
"""


@pytest.mark.e2e
def test_a_schedule_entry_planted_in_redis_is_deleted_by_beat_and_never_sent(
    settings: Settings, sandbox: Sandbox, redis_url: str, tmp_path: Path
) -> None:
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    t = seed_tenant(settings, sandbox, "sec-beat", accounts=1)
    calls = sandbox.state.calls_by_user[t.user.id]
    env = service_env(settings.database_url, redis_url, sandbox)
    with run_worker(env, tmp_path / "w.log"):
        beat, log = start_beat(env, tmp_path, "beat")
        try:
            deadline = time.monotonic() + 60
            while "Acquired lock" not in log.read_text(errors="replace"):
                assert beat.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
            fenv = {k: v for k, v in os.environ.items() if not k.startswith(("BALANCES_", "POWENS_"))}
            subprocess.run(
                [sys.executable, "-c", PLANT_ENTRY, redis_url, t.account_ids[0]],
                cwd="/",
                env=fenv,
                check=True,
            )
            while log.read_text(errors="replace").count("is not the service's: deleted") < 2:
                assert beat.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
        finally:
            beat.terminate()
            beat.wait(timeout=30)
    assert not broker.exists("balances:redbeat:planted")
    assert sum(broker.llen(q) for q in ("interactive", "push", "reports", "refresh")) == 0
    with session_scope(settings) as s:
        assert s.scalar(select(func.count()).select_from(RefreshAttempt)) == 0
        assert s.scalar(select(func.count()).select_from(ForcedSync)) == 0
    assert sandbox.state.calls_by_user[t.user.id] == calls
