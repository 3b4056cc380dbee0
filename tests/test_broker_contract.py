"""One contract, every broker: Redis, the database broker on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import threading
import time

from django_tasks.brokers import Broker
from django_tasks.messages import Message, new_id
from tests.conftest import BrokerFactory


def message(task: str = "tests.testapp.tasks.add", **fields: object) -> Message:
    fields.setdefault("args", [1, 2])
    return Message(id=new_id(), task=task, **fields)  # type: ignore[arg-type]


def drain(broker: Broker, queues: list[str] | None = None, count: int = 100) -> list[Message]:
    """Consume, ack and return everything that is ready now."""
    got: list[Message] = []
    while True:
        deliveries = broker.consume(queues or ["default"], count, timeout=0.05)
        if not deliveries:
            return got
        broker.ack(deliveries)
        got.extend(d.message for d in deliveries if d.message)


def consume_until(broker: Broker, want: int, deadline: float = 10.0, **kw: object):
    """Consume until ``want`` deliveries arrived or the deadline passed."""
    got = []
    end = time.monotonic() + deadline
    while len(got) < want and time.monotonic() < end:
        got.extend(broker.consume(kw.get("queues", ["default"]), want - len(got), timeout=0.2))
    return got


def test_publish_consume_ack(broker: Broker) -> None:
    sent = message(kwargs={"x": "é"})
    broker.publish(sent)
    assert broker.queue_lengths(["default"]) == {"default": 1}
    [delivery] = broker.consume(["default"], 10, timeout=1)
    assert delivery.message == sent
    assert delivery.queue == "default"
    assert delivery.error is None
    assert delivery.delivery_count == 1
    broker.ack([delivery])
    assert broker.queue_lengths(["default"]) == {"default": 0}
    assert broker.consume(["default"], 10, timeout=0.05) == []


def test_fifo_within_a_priority(broker: Broker) -> None:
    sent = [message() for _ in range(20)]
    for m in sent:
        broker.publish(m)
    assert [m.id for m in drain(broker, count=3)] == [m.id for m in sent]


def test_publish_many_keeps_order(broker: Broker) -> None:
    sent = [message() for _ in range(50)]
    broker.publish_many(sent)
    assert [m.id for m in drain(broker, count=7)] == [m.id for m in sent]


def test_higher_priority_first(broker: Broker) -> None:
    low, mid, high, top = (message(priority=p) for p in (-10, 0, 10, 100))
    for m in (low, mid, high, top):
        broker.publish(m)
    later_mid = message(priority=0)
    broker.publish(later_mid)
    assert [m.id for m in drain(broker, count=1)] == [top.id, high.id, mid.id, later_mid.id, low.id]


def test_queues_are_separate_and_taken_in_order(broker: Broker) -> None:
    a, b = message(queue="hipri"), message(queue="default")
    broker.publish(b)
    broker.publish(a)
    assert drain(broker, ["lopri"]) == []
    assert [m.id for m in drain(broker, ["hipri", "default"], count=1)] == [a.id, b.id]


def test_delayed_message_is_not_delivered_early(broker: Broker) -> None:
    eta = time.time() + 1.0
    delayed = message(eta=eta)
    broker.publish(delayed)
    assert broker.consume(["default"], 10, timeout=0.2) == []
    assert broker.queue_lengths(["default"]) == {"default": 1}
    [delivery] = consume_until(broker, 1)
    assert time.time() >= eta
    assert delivery.message.id == delayed.id


def test_expired_lease_is_delivered_again(make_broker: BrokerFactory) -> None:
    first, second = make_broker(LEASE_SECONDS=0.5), make_broker(LEASE_SECONDS=0.5)
    sent = message()
    first.publish(sent)
    [leased] = first.consume(["default"], 1, timeout=1)
    assert leased.message == sent
    assert second.consume(["default"], 1, timeout=0.1) == []
    [again] = consume_until(second, 1)
    assert again.message.id == sent.id
    assert again.delivery_count == 2
    second.ack([again])
    assert second.queue_lengths(["default"]) == {"default": 0}


def test_a_stale_lease_holder_cannot_touch_the_message(make_broker: BrokerFactory) -> None:
    """A consumer whose lease expired and was taken over can no longer end or move that lease."""
    first, second = make_broker(LEASE_SECONDS=0.3), make_broker(LEASE_SECONDS=30)
    sent = message()
    first.publish(sent)
    [stale] = first.consume(["default"], 1, timeout=1)
    [fresh] = consume_until(second, 1)
    assert fresh.message == sent
    assert fresh.delivery_count == 2
    first.ack([stale])
    first.extend([stale])
    first.release([stale])
    first.requeue(stale, message())
    first.requeue(stale, message(queue="hipri"))  # Moving it to another queue: refused too.
    assert second.queue_lengths(["default", "hipri"]) == {"default": 1, "hipri": 0}
    assert second.find(sent.id, ["default"]) == sent
    assert first.consume(["default"], 1, timeout=0) == []  # Still leased by the second.
    second.ack([fresh])
    assert second.queue_lengths(["default"]) == {"default": 0}


def test_a_stale_lease_holder_does_not_keep_the_new_lease_alive(
    make_broker: BrokerFactory,
) -> None:
    """The lease keeper of a consumer that lost the lease does not renew the new holder's."""
    first, second, third = (make_broker(LEASE_SECONDS=0.4) for _ in range(3))
    sent = message()
    first.publish(sent)
    [stale] = first.consume(["default"], 1, timeout=1)
    [taken] = consume_until(second, 1)  # The second consumer then dies without renewing it.
    assert taken.delivery_count == 2
    again = []
    end = time.monotonic() + 10
    while not again and time.monotonic() < end:
        first.extend([stale])  # Still running its stale delivery, and renewing it.
        again = third.consume(["default"], 1, timeout=0.1)
    assert [d.delivery_count for d in again] == [3]
    third.ack(again)


def test_requeue_to_another_queue(broker: Broker) -> None:
    sent = message()
    broker.publish(sent)
    [leased] = broker.consume(["default"], 1, timeout=1)
    retry = message(queue="hipri", retries=1)
    retry.id = sent.id
    broker.requeue(leased, retry)
    assert broker.queue_lengths(["default", "hipri"]) == {"default": 0, "hipri": 1}
    [again] = broker.consume(["hipri"], 1, timeout=1)
    assert again.message == retry
    assert again.delivery_count == 1  # A new attempt counts its deliveries afresh.
    broker.ack([again])


class Warnings(logging.Handler):
    """The warnings the brokers log while it is attached (their logger does not propagate)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> Warnings:
        logging.getLogger("django_tasks.brokers").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("django_tasks.brokers").removeHandler(self)


def test_only_leases_taken_over_are_warned_about(make_broker: BrokerFactory) -> None:
    """An ack sent again, or an extend listing a delivery acked meanwhile, logs nothing."""
    first, second = make_broker(LEASE_SECONDS=0.3), make_broker(LEASE_SECONDS=30)
    first.publish_many([message(), message()])
    done, running = consume_until(first, 2)
    first.ack([done])
    with Warnings() as warnings:
        first.ack([done])  # As after a reply lost in an outage.
        first.extend([done, running])
    assert warnings.messages == []
    [taken] = consume_until(second, 1)  # The running one's lease expired; it was taken over.
    with Warnings() as warnings:
        first.extend([running])
        first.ack([running])
    assert [m.split(":")[0] for m in warnings.messages] == [
        "1 of 1 extend(s) did nothing",
        "1 of 1 ack(s) did nothing",
    ]
    second.ack([taken])
    assert second.queue_lengths(["default"]) == {"default": 0}


def test_extend_keeps_the_lease(make_broker: BrokerFactory) -> None:
    owner, other = make_broker(LEASE_SECONDS=0.6), make_broker(LEASE_SECONDS=0.6)
    owner.publish(message())
    [leased] = owner.consume(["default"], 1, timeout=1)
    end = time.monotonic() + 1.8
    while time.monotonic() < end:
        owner.extend([leased])
        assert other.consume(["default"], 1, timeout=0.2) == []
    owner.ack([leased])


def test_release_makes_it_ready_at_once(broker: Broker) -> None:
    sent = message()
    broker.publish(sent)
    [leased] = broker.consume(["default"], 1, timeout=1)
    broker.release([leased])
    [again] = broker.consume(["default"], 1, timeout=1)
    assert again.message.id == sent.id


def test_requeue_replaces_the_message(broker: Broker) -> None:
    sent = message()
    broker.publish(sent)
    [leased] = broker.consume(["default"], 1, timeout=1)
    retry = message(retries=1)
    retry.id = sent.id
    broker.requeue(leased, retry, eta=time.time() + 0.5)
    assert broker.consume(["default"], 1, timeout=0.1) == []
    [again] = consume_until(broker, 1)
    assert again.message.retries == 1
    broker.ack([again])
    assert broker.queue_lengths(["default"]) == {"default": 0}


def test_two_consumers_never_get_the_same_message(make_broker: BrokerFactory) -> None:
    producer = make_broker()
    sent = [message() for _ in range(200)]
    producer.publish_many(sent)
    seen: list[list[str]] = [[], []]

    def consume(index: int) -> None:
        consumer = make_broker()
        while True:
            deliveries = consumer.consume(["default"], 5, timeout=0.3)
            if not deliveries:
                return
            seen[index].extend(d.message.id for d in deliveries)
            consumer.ack(deliveries)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(m.id for m in sent)


def test_consume_wakes_when_a_message_arrives(broker: Broker, make_broker: BrokerFactory) -> None:
    producer = make_broker()
    sent = message()
    timer = threading.Timer(0.3, producer.publish, args=(sent,))
    timer.start()
    try:
        deliveries = broker.consume(["default"], 1, timeout=10)
    finally:
        timer.join()
    assert [d.message.id for d in deliveries] == [sent.id]


def test_purge_and_queue_lengths(broker: Broker) -> None:
    broker.publish_many([message() for _ in range(3)] + [message(queue="hipri")])
    broker.publish(message(eta=time.time() + 60))
    assert broker.queue_lengths(["default", "hipri", "lopri"]) == {
        "default": 4,
        "hipri": 1,
        "lopri": 0,
    }
    assert broker.purge("default") == 4
    assert broker.queue_lengths(["default", "hipri"]) == {"default": 0, "hipri": 1}


def test_find_a_waiting_message(broker: Broker) -> None:
    sent = message(queue="hipri")
    broker.publish(sent)
    assert broker.find(sent.id, ["default", "hipri"]) == sent
    assert broker.find(new_id(), ["default", "hipri"]) is None
    broker.ack(broker.consume(["hipri"], 1, timeout=1))
    assert broker.find(sent.id, ["default", "hipri"]) is None


def test_undecodable_body_is_delivered_with_its_error(broker: Broker) -> None:
    bad = message()
    broker.send([(bad, "{not json")])
    good = message()
    broker.publish(good)
    first, second = consume_until(broker, 2)
    assert first.message is None
    assert first.body == "{not json"
    assert "not valid JSON" in (first.error or "")
    assert second.message == good


def test_oversize_body_is_refused_at_consume(make_broker: BrokerFactory) -> None:
    big = make_broker(MAX_MESSAGE_SIZE=10_000_000)
    small = make_broker(MAX_MESSAGE_SIZE=1000)
    big.publish(message(args=["x" * 5000]))
    [delivery] = small.consume(["default"], 1, timeout=1)
    assert delivery.message is None
    assert "over the limit" in (delivery.error or "")


ALL_QUEUES = ["default", "hipri", "lopri"]


def test_remove_a_ready_message(broker: Broker) -> None:
    gone, kept = message(queue="hipri"), message(queue="hipri")
    broker.publish_many([gone, kept])
    assert broker.remove(gone.id, ALL_QUEUES) is True
    assert broker.find(gone.id, ALL_QUEUES) is None
    assert broker.queue_lengths(["hipri"]) == {"hipri": 1}
    assert [m.id for m in drain(broker, ["hipri"])] == [kept.id]
    assert broker.remove(gone.id, ALL_QUEUES) is False


def test_remove_a_delayed_message(broker: Broker) -> None:
    delayed = message(eta=time.time() + 0.5)
    broker.publish(delayed)
    assert broker.remove(delayed.id, ["default"]) is True
    assert broker.find(delayed.id, ["default"]) is None
    assert broker.queue_lengths(["default"]) == {"default": 0}
    time.sleep(0.6)
    assert broker.consume(["default"], 10, timeout=0.2) == []


def test_remove_leaves_a_leased_message(broker: Broker) -> None:
    sent = message()
    broker.publish(sent)
    [leased] = broker.consume(["default"], 1, timeout=1)
    assert broker.remove(sent.id, ALL_QUEUES) is False
    assert broker.find(sent.id, ALL_QUEUES) == sent
    broker.extend([leased])
    broker.ack([leased])
    assert broker.queue_lengths(["default"]) == {"default": 0}


def test_remove_after_release_forgets_the_deliveries(broker: Broker) -> None:
    sent = message()
    broker.publish(sent)
    broker.release(broker.consume(["default"], 1, timeout=1))
    assert broker.remove(sent.id, ["default"]) is True
    # The same id published again starts counting its deliveries afresh.
    broker.publish(sent)
    [delivery] = broker.consume(["default"], 1, timeout=1)
    assert delivery.delivery_count == 1
    broker.ack([delivery])


def test_remove_an_unknown_id(broker: Broker) -> None:
    broker.publish(message())
    assert broker.remove(new_id(), ALL_QUEUES) is False
    assert broker.remove(new_id(), []) is False
    assert broker.queue_lengths(["default"]) == {"default": 1}


def test_remove_leaves_other_messages_alone(broker: Broker) -> None:
    first, target, last = message(), message(), message()
    other_queue = message(queue="hipri")
    later = message(eta=time.time() + 60)
    broker.publish_many([first, target, last, other_queue, later])
    elsewhere = message(queue="lopri")
    elsewhere.id = target.id  # The same id, in a queue the call does not name.
    broker.publish(elsewhere)
    assert broker.remove(target.id, ["default", "hipri"]) is True
    assert broker.queue_lengths(ALL_QUEUES) == {"default": 3, "hipri": 1, "lopri": 1}
    assert [m.id for m in drain(broker, ["default"])] == [first.id, last.id]
    assert broker.find(later.id, ["default"]) == later
    assert drain(broker, ["hipri"]) == [other_queue]
    assert drain(broker, ["lopri"]) == [elsewhere]
