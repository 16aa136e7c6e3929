"""Coordination through real Redis: leases that outlive long work but not a dead holder, delivery
counts, shared reads and their shared failures."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from app.refresh.coordination import RedisCoordinator, Throttled
from tests.support.processes import ROOT


@pytest.fixture
def coord(redis_url: str) -> RedisCoordinator:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return RedisCoordinator(client, rate_limit=0, seal_keys=[b"k" * 40])


def test_a_shared_read_or_failure_planted_in_redis_is_not_believed(coord: RedisCoordinator) -> None:
    # Anyone who can write to Redis knows the keys (run and Powens user ids are visible there): a value
    # they plant must not become an account's balances, nor a failure its recorded reason.
    from app.errors import RefreshError
    from app.refresh.coordination import Sharing

    sharing = Sharing(failure_key="planted:failed:1", failure_ttl=5, lease=2)
    coord.r.set("balances:shared:planted", '{"accounts": [{"id": 1, "balance": 99999999}]}')
    coord.r.set("balances:shared:planted:failed:1", '{"reason": "not_found", "message": "forged"}')
    fetched: list[int] = []

    def fetch() -> dict[str, object]:
        fetched.append(1)
        return {"accounts": [{"id": 1, "balance": 12}]}

    assert coord.shared("planted", fetch, ttl=60, wait=5, sharing=sharing) == {
        "accounts": [{"id": 1, "balance": 12}]
    }
    assert fetched == [1]  # the planted value was ignored and Powens read
    assert coord.shared("planted", fetch, ttl=60, wait=5, sharing=sharing)["accounts"][0]["balance"] == 12
    assert fetched == [1]  # our own sealed value is shared

    def failing() -> dict[str, object]:
        raise RefreshError(__import__("app.errors").errors.Reason.PROVIDER_UNAVAILABLE, "down")

    other = Sharing(failure_key="planted2:failed:1", failure_ttl=5, lease=2)
    coord.r.set("balances:shared:planted2:failed:1", '{"reason": "not_found", "message": "forged"}')
    with pytest.raises(RefreshError) as info:
        coord.shared("planted2", failing, ttl=60, wait=5, sharing=other)
    assert info.value.message == "down"  # our failure, not the planted one


def test_a_held_lock_outlives_its_lease_while_the_work_goes_on(coord: RedisCoordinator) -> None:
    with coord.account_lock("acc-long", lease=1.0, wait=0.1):
        time.sleep(2.5)  # work longer than two leases: the lock must still be ours
        with pytest.raises(Throttled), coord.account_lock("acc-long", lease=1.0, wait=0.1):
            pass
    with coord.account_lock("acc-long", lease=1.0, wait=0.1):  # released at the end
        pass


def test_a_killed_holder_frees_its_lock_within_one_lease(coord: RedisCoordinator, redis_url: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import redis, sys, time\n"
            "from app.refresh.coordination import RedisCoordinator\n"
            f"c = RedisCoordinator(redis.Redis.from_url({redis_url!r}), rate_limit=0,"
            " seal_keys=[b'k' * 40])\n"
            "with c.account_lock('acc-dead', lease=2.0, wait=1):\n"
            "    print('held', flush=True); time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
    holder.kill()  # SIGKILL: no release, no more renewals
    holder.wait()
    killed = time.monotonic()
    with coord.account_lock("acc-dead", lease=2.0, wait=5.0):
        waited = time.monotonic() - killed
    assert waited <= 2.5  # one lease, not the task's whole time limit


def test_deliveries_are_counted_per_task_and_retry(coord: RedisCoordinator) -> None:
    assert [coord.count_delivery("task-1:0", ttl=60) for _ in range(3)] == [1, 2, 3]
    assert coord.count_delivery("task-1:1", ttl=60) == 1


def test_a_shared_failure_is_shared_by_its_attempt_only(coord: RedisCoordinator) -> None:
    from app.errors import Reason, RefreshError
    from app.refresh.coordination import Sharing

    calls: list[int] = []

    def failing() -> object:
        calls.append(1)
        raise RefreshError(Reason.PROVIDER_UNAVAILABLE, "503")

    def sharing(attempt: int) -> Sharing:
        return Sharing(failure_key=f"k:failed:{attempt}", failure_ttl=30, lease=5)

    for _ in range(3):  # three tasks at attempt 1: one call, the same failure
        with pytest.raises(RefreshError):
            coord.shared("k", failing, ttl=60, wait=1, sharing=sharing(1))
    assert calls == [1]
    assert coord.shared("k", lambda: {"ok": True}, ttl=60, wait=1, sharing=sharing(2)) == {"ok": True}
    assert coord.shared("k", failing, ttl=60, wait=1, sharing=sharing(3)) == {"ok": True}  # cached answer
    assert calls == [1]
