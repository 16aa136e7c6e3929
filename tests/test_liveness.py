"""Worker leases on real Redis through kombu's own Redis transport: what a dead worker held goes back to
its queue once, what a live worker holds (or only just received) stays where it is.

The end-to-end proof (a SIGKILLed worker's batches finished by its successor in seconds, with the
shipped settings) is the fault suite's ``test_worker_sigkill_mid_run``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from app.worker import liveness
from tests.support.polling import wait_until

LEASE = 15.0
KEEP = 900.0


@pytest.fixture
def broker(redis_url: str) -> Iterator[tuple[Connection, Queue]]:
    run = uuid.uuid4().hex[:8]
    options = {"unacked_key": f"t-unacked-{run}", "unacked_index_key": f"t-unacked-index-{run}"}
    conn = Connection(redis_url, transport_options=options)
    queue = Queue(f"t-liveness-{run}", Exchange(f"t-liveness-{run}", type="direct"), f"t-liveness-{run}")
    queue(conn.default_channel).declare()
    client = redis.Redis.from_url(redis_url)
    client.delete(liveness.REGISTRY)
    yield conn, queue
    client.delete(liveness.REGISTRY, liveness.EPOCH_KEY, *options.values(), queue.name)
    for key in client.scan_iter(match="balances:worker:*"):  # the leases these tests wrote
        client.delete(key)
    conn.release()


def deliver(conn: Connection, queue: Queue, body: str) -> Any:
    """Publish one message and take it without acknowledging it: kombu keeps it in ``unacked``."""
    producer = conn.Producer()
    producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])
    message = queue(conn.default_channel).get(no_ack=False)
    assert message is not None and message.payload == body
    return message


def queued(conn: Connection, queue: Queue) -> list[Any]:
    found = []
    while (m := queue(conn.default_channel).get(no_ack=True)) is not None:
        found.append(m)
    return found


def unacked(conn: Connection) -> dict[str, float]:
    ch = conn.default_channel
    return {k.decode(): s for k, s in ch.client.zrange(ch.unacked_index_key, 0, -1, withscores=True)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_dead_workers_message_goes_back_once_next_in_line_and_a_live_workers_stays(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    alive, dead = liveness.Held(), liveness.Held()
    kept = deliver(conn, queue, "held by a live worker")
    lost = deliver(conn, queue, "held by a worker that was killed")
    alive.add(kept.delivery_tag)
    dead.add(lost.delivery_tag)
    liveness.renew(ch, "alive", alive, LEASE, KEEP)
    delivered = liveness.renew(ch, "dead", dead, LEASE, KEEP)
    waiting = conn.Producer()
    waiting.publish("queued before the reclaim", exchange=queue.exchange, routing_key=queue.routing_key)
    ages = liveness.Ages()
    ages.update(delivered, 0.0)
    later = ages.update(delivered, LEASE + 1)  # both unacknowledged for over a lease, by our clock

    assert liveness.orphans(ch, later, LEASE) == []  # both leases live
    ch.client.delete(liveness.LEASE_KEY.format("dead"))  # what its expiry does, a lease after the kill
    orphans = liveness.orphans(ch, later, LEASE)
    assert orphans == [lost.delivery_tag]

    # Two reclaimers judging at the same moment: the message goes back once, ahead of the queue.
    assert liveness.reclaim(ch, orphans) == 1 and liveness.reclaim(ch, orphans) == 0
    back = queued(conn, queue)
    assert [m.payload for m in back] == ["held by a worker that was killed", "queued before the reclaim"]
    assert back[0].headers.get("redelivered") is True  # counted against BALANCES_MAX_DELIVERIES
    assert set(unacked(conn)) == {kept.delivery_tag}

    ch.client.delete(liveness.HOLDS_KEY.format("dead"))  # its holdings expire too
    liveness.orphans(ch, later, LEASE)
    assert ch.client.smembers(liveness.REGISTRY) == {b"alive"}  # then it leaves the registry


def test_what_no_lease_ever_listed_is_left_to_the_visibility_timeout(
    broker: tuple[Connection, Queue],
) -> None:
    """A consumer without the lease thread (an older release mid-deploy, another application on the
    same Redis) holds a long task: it is never judged, never duplicated."""
    conn, queue = broker
    ch = conn.default_channel
    theirs = deliver(conn, queue, "held by a consumer that keeps no lease")
    delivered = liveness.renew(ch, "us", liveness.Held(), LEASE, KEEP)
    ages = liveness.Ages()
    ages.update(delivered, 0.0)
    assert liveness.orphans(ch, ages.update(delivered, 10 * LEASE), LEASE) == []
    assert theirs.delivery_tag in unacked(conn)


def test_a_message_seen_for_less_than_a_lease_or_already_acknowledged_is_not_put_back(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    held = liveness.Held()
    young = deliver(conn, queue, "delivered again a moment ago")
    done = deliver(conn, queue, "acknowledged while the reclaimer was judging it")
    held.add(young.delivery_tag)
    held.add(done.delivery_tag)
    delivered = liveness.renew(ch, "killed", held, LEASE, KEEP)
    ch.client.delete(liveness.LEASE_KEY.format("killed"))
    ages = liveness.Ages()
    ages.update(delivered, 0.0)
    # The young one was delivered again (its unacked time changed): its age starts over.
    ch.client.zadd(ch.unacked_index_key, {young.delivery_tag: time.time() + 1})
    judged = liveness.orphans(ch, ages.update(unacked(conn), LEASE + 1), LEASE)
    assert judged == [done.delivery_tag]
    done.ack()
    assert liveness.reclaim(ch, judged) == 0
    assert queued(conn, queue) == []  # acknowledged: not put back


def test_a_worker_lists_what_it_holds_and_forgets_what_was_acknowledged_or_taken_elsewhere(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    key = liveness.HOLDS_KEY.format("me")
    held = liveness.Held()
    first, second, third = (deliver(conn, queue, n) for n in ("first", "second", "third"))
    for m in (first, second, third):
        held.add(m.delivery_tag)
    liveness.renew(ch, "me", held, LEASE, KEEP)
    assert {t.decode() for t in ch.client.smembers(key)} == {m.delivery_tag for m in (first, second, third)}
    first.ack()
    # kombu keeps a tag when it restores a message: "third" went back and another worker took it.
    ch.client.zadd(ch.unacked_index_key, {third.delivery_tag: time.time() + 5})
    liveness.renew(ch, "me", held, LEASE, KEEP)
    assert {t.decode() for t in ch.client.smembers(key)} == {second.delivery_tag}

    # A message received while a renewal was reading ``unacked`` is kept, not forgotten.
    before = held.snapshot()
    now_unacked = unacked(conn)
    fourth = deliver(conn, queue, "fourth")
    held.add(fourth.delivery_tag)
    kept, forgotten = held.settle(before, now_unacked)
    assert (kept, forgotten) == (sorted([second.delivery_tag, fourth.delivery_tag]), [])


def test_a_lease_reclaims_only_after_a_whole_lease_of_healthy_renewals(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    dead = liveness.Held()
    orphan = deliver(conn, queue, "held by a worker that was killed")
    dead.add(orphan.delivery_tag)
    liveness.renew(ch, "killed", dead, LEASE, KEEP)
    ch.client.delete(liveness.LEASE_KEY.format("killed"))
    clock = Clock()
    lease = liveness.Lease(lambda: conn.clone(), liveness.Held(), LEASE, KEEP, worker_id="me", clock=clock)
    assert lease.beat() == 0
    clock.now += LEASE / 2
    assert lease.beat() == 0  # healthy for less than a lease: every live worker may not have listed yet
    clock.now += LEASE
    assert lease.beat() == 1
    assert [m.payload for m in queued(conn, queue)] == ["held by a worker that was killed"]
    lease.stop()
    lease._release()
    assert ch.client.get(liveness.LEASE_KEY.format("me")) is None


def test_a_message_is_in_its_workers_holdings_as_soon_as_it_is_received_not_at_the_next_renewal(
    broker: tuple[Connection, Queue],
) -> None:
    """A worker killed seconds after taking a message (the fault suite's kill lands so) must have it
    in its holdings already: the renewals are five seconds apart."""
    conn, queue = broker
    held = liveness.Held()
    lease = liveness.Lease(lambda: conn.clone(), held, 3600.0, KEEP, worker_id="quick")
    lease.start()
    try:
        wait_until(lambda: conn.default_channel.client.exists(liveness.LEASE_KEY.format("quick")), "a lease")
        message = deliver(conn, queue, "taken just before the kill")
        held.add(message.delivery_tag)  # what task_received does; the next renewal is an hour away
        key = liveness.HOLDS_KEY.format("quick")
        wait_until(
            lambda: conn.default_channel.client.sismember(key, message.delivery_tag), "the holdings", 5
        )
    finally:
        lease.stop()
        lease.join(5)
    assert not lease.is_alive()


def test_the_sweeper_knows_when_the_brokers_redis_restarted(broker: tuple[Connection, Queue]) -> None:
    conn, _queue = broker
    client = conn.default_channel.client
    client.delete(liveness.EPOCH_KEY)
    assert liveness.broker_lost_messages(conn)  # a Redis no sweep asked yet
    assert not liveness.broker_lost_messages(conn)  # one caller per restart
    # A restart from a snapshot keeps the marker but not the run id it was written under.
    client.set(liveness.EPOCH_KEY, "run id of the Redis before its restart")
    assert liveness.broker_lost_messages(conn)
    assert not liveness.broker_lost_messages(conn)
