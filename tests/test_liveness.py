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

LEASE = 15.0


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
    client.delete(liveness.REGISTRY, *options.values(), queue.name)
    for key in client.scan_iter(match="balances:worker:*"):
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


def test_a_dead_workers_message_goes_back_once_and_a_live_workers_stays(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    alive, dead = liveness.Held(), liveness.Held()
    kept = deliver(conn, queue, "held by a live worker")
    lost = deliver(conn, queue, "held by a worker that was killed")
    alive.add(kept.delivery_tag)
    dead.add(lost.delivery_tag)
    liveness.renew(ch, "alive", alive, LEASE)
    delivered = liveness.renew(ch, "dead", dead, LEASE)
    later = time.time() + LEASE + 1  # both messages unacknowledged for over a lease

    assert liveness.orphans(ch, delivered, LEASE, later) == []  # both leases live
    ch.client.delete(liveness.LEASE_KEY.format("dead"))  # what its expiry does, a lease after the kill
    orphans = liveness.orphans(ch, delivered, LEASE, later)
    assert orphans == [lost.delivery_tag]
    assert ch.client.smembers(liveness.REGISTRY) == {b"alive"}  # the expired lease pruned

    # Two reclaimers judging at the same moment: the message goes back once.
    assert liveness.reclaim(ch, orphans) == 1 and liveness.reclaim(ch, orphans) == 0
    back = queued(conn, queue)
    assert [m.payload for m in back] == ["held by a worker that was killed"]
    assert back[0].headers.get("redelivered") is True  # counted against BALANCES_MAX_DELIVERIES
    assert set(unacked(conn)) == {kept.delivery_tag}


def test_a_message_only_just_delivered_or_already_acknowledged_is_not_reclaimed(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    ch = conn.default_channel
    young = deliver(conn, queue, "received a moment ago, not listed yet")
    delivered = liveness.renew(ch, "someone", liveness.Held(), LEASE)
    assert liveness.orphans(ch, delivered, LEASE, time.time()) == []  # younger than a lease

    done = deliver(conn, queue, "acknowledged while the reclaimer was judging it")
    delivered = liveness.renew(ch, "someone", liveness.Held(), LEASE)
    judged = liveness.orphans(ch, delivered, LEASE, time.time() + LEASE + 1)
    assert set(judged) == {young.delivery_tag, done.delivery_tag}
    done.ack()
    assert liveness.reclaim(ch, [done.delivery_tag]) == 0
    assert queued(conn, queue) == []  # acknowledged: not put back


def test_a_worker_forgets_what_it_acknowledged_and_reclaims_only_after_a_healthy_lease(
    broker: tuple[Connection, Queue],
) -> None:
    conn, queue = broker
    held = liveness.Held()
    first = deliver(conn, queue, "first")
    second = deliver(conn, queue, "second")
    held.add(first.delivery_tag)
    held.add(second.delivery_tag)
    first.ack()
    lease = liveness.Lease(lambda: conn.clone(), held, LEASE, worker_id="me")
    assert lease.beat() == 0
    listed = conn.default_channel.client.get(liveness.LEASE_KEY.format("me"))
    assert listed is not None and listed.decode() == f'["{second.delivery_tag}"]'

    orphan = deliver(conn, queue, "held by nobody")
    ch = conn.default_channel
    ch.client.zadd(ch.unacked_index_key, {orphan.delivery_tag: time.time() - LEASE - 1})
    assert lease.beat() == 0  # healthy for less than a lease: every live worker may not have listed yet
    assert lease._healthy_since is not None
    lease._healthy_since -= LEASE
    assert lease.beat() == 1
    assert [m.payload for m in queued(conn, queue)] == ["held by nobody"]
    lease.stop()
    lease._release()
    assert ch.client.get(liveness.LEASE_KEY.format("me")) is None


def test_the_sweeper_knows_when_the_brokers_redis_lost_its_data(broker: tuple[Connection, Queue]) -> None:
    conn, _queue = broker
    client = conn.default_channel.client
    client.delete(liveness.EPOCH_KEY)
    assert liveness.broker_lost_messages(conn)  # a new (or emptied) Redis
    liveness.mark_broker_seen(conn)
    assert not liveness.broker_lost_messages(conn)
    client.delete(liveness.EPOCH_KEY)  # what a restart without persistence does to every key
    assert liveness.broker_lost_messages(conn)
