"""Behaviour of the Redis broker beyond the common contract: keys, wake-ups, errors, results."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.test import override_settings
from redis.connection import AbstractConnection

from django_tasks.brokers import Broker, Delivery, create_broker
from django_tasks.brokers.redis import PURGE_CHUNK, RedisBroker
from django_tasks.conf import BackendConfig
from django_tasks.exceptions import BrokerConnectionError
from django_tasks.messages import Message, new_id

QUEUES = ["default", "hipri", "lopri"]


def message(**fields: Any) -> Message:
    fields.setdefault("args", [1, 2])
    return Message(id=new_id(), task="tests.testapp.tasks.add", **fields)


def build(url: str, **options: Any) -> RedisBroker:
    params = {"QUEUES": QUEUES, "OPTIONS": {"BROKER_URL": url, **options}}
    broker = create_broker(BackendConfig.from_params("default", params))
    assert isinstance(broker, RedisBroker)
    return broker


@pytest.fixture
def make(redis_url: str) -> Iterator[Callable[..., RedisBroker]]:
    made: list[Broker] = []

    def factory(**options: Any) -> RedisBroker:
        broker = build(redis_url, **options)
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make: Callable[..., RedisBroker]) -> RedisBroker:
    return make()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.005)


def blocked_consumers(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("cmd") == "blpop")


def sleep_until(wall_time: float) -> None:
    """Let the clock pass ``wall_time``: the condition under test is time itself."""
    time.sleep(max(0.0, wall_time - time.time()))


class Consumer(threading.Thread):
    """Calls consume() once in a thread and records when it returned."""

    def __init__(self, broker: Broker, queues: list[str], timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.broker, self.queues, self.timeout = broker, queues, timeout
        self.deliveries: list[Delivery] = []
        self.returned_at = 0.0

    def run(self) -> None:
        self.deliveries = self.broker.consume(self.queues, 1, self.timeout)
        self.returned_at = time.monotonic()


def test_keys_carry_the_queue_hash_tag(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    broker = make(KEY_PREFIX="myapp")
    broker.publish_many(
        [message(), message(), message(queue="hipri"), message(eta=time.time() + 60)]
    )
    broker.consume(["default"], 1, timeout=1)
    keys = {k.decode() for k in client.keys("*")}
    assert keys
    for key in keys:
        assert re.fullmatch(r"myapp:\{(default|hipri)\}:[a-z]+", key), key
    assert {"myapp:{default}:ready", "myapp:{default}:delayed", "myapp:{default}:leases"} <= keys


def test_the_default_prefix_names_the_project(make: Callable[..., RedisBroker]) -> None:
    with override_settings(ROOT_URLCONF="shop.urls"):
        assert make().config.key_prefix == "dt:shop"
    with override_settings(ROOT_URLCONF=None, SETTINGS_MODULE="blog.settings.production"):
        assert make().config.key_prefix == "dt:blog"
    with override_settings(ROOT_URLCONF="shop.urls"):
        assert make(KEY_PREFIX="dt").config.key_prefix == "dt"


def test_projects_sharing_a_redis_database_do_not_see_each_others_tasks(
    make: Callable[..., RedisBroker],
) -> None:
    with override_settings(ROOT_URLCONF="shop.urls"):
        shop = make()
    with override_settings(ROOT_URLCONF="blog.urls"):
        blog = make()
    sent = message()
    shop.publish_many([sent, message(eta=time.time() + 60)])
    assert blog.consume(["default"], 10, timeout=0.1) == []
    assert blog.queue_lengths(["default"]) == {"default": 0}
    assert blog.purge("default") == 0
    assert [d.message.id for d in shop.consume(["default"], 10, timeout=1) if d.message] == [
        sent.id
    ]


def test_result_notifications_stay_in_their_redis_database(
    make: Callable[..., RedisBroker], redis_url: str
) -> None:
    """PUBLISH reaches every database of a server: the channel names the database."""
    here = make(KEY_PREFIX="same")
    base, db = redis_url.rsplit("/", 1)
    elsewhere = build(f"{base}/{int(db) + 1}", KEY_PREFIX="same")  # It only publishes.
    task_id, later = new_id(), new_id()
    with here.result_waiter(task_id) as waiter, here.result_waiter(later) as later_waiter:
        elsewhere.notify_results([task_id])
        here.notify_results([later])
        assert later_waiter.wait(10)  # Redis delivers in order: what came before is read too.
        assert not waiter.wait(0)
    elsewhere.close()


def test_a_blocked_consumer_wakes_on_publish(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    consumer = Consumer(make(), ["lopri", "default"])
    consumer.start()
    wait_for(lambda: blocked_consumers(client) == 1)
    sent = message()
    published_at = time.monotonic()
    make().publish(sent)
    consumer.join(10)
    assert [d.message.id for d in consumer.deliveries if d.message] == [sent.id]
    assert consumer.returned_at - published_at < 0.5


def test_one_batch_wakes_every_blocked_consumer(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    consumers = [Consumer(make(), ["default"]) for _ in range(2)]
    for consumer in consumers:
        consumer.start()
    wait_for(lambda: blocked_consumers(client) == 2)
    sent = [message(), message()]
    published_at = time.monotonic()
    make().publish_many(sent)
    for consumer in consumers:
        consumer.join(10)
    got = sorted(d.message.id for c in consumers for d in c.deliveries if d.message)
    assert got == sorted(m.id for m in sent)
    # The second consumer is woken by the first (chain wake-up), not by its 1 s BLPOP cap.
    assert max(c.returned_at for c in consumers) - published_at < 0.5


def test_single_sends_and_batches_keep_publish_order(broker: RedisBroker) -> None:
    # Single sends and batches take the same way in: one publish order across them.
    sent = [message() for _ in range(8)]
    for each in sent[:3]:
        broker.publish(each)
    broker.publish_many(sent[3:6])
    for each in sent[6:]:
        broker.publish(each)
    urgent = message(priority=5)
    broker.publish(urgent)
    got = broker.consume(["default"], 20, timeout=1)
    assert [d.tag for d in got] == [urgent.id] + [m.id for m in sent]


def test_the_wake_up_token_is_never_counted_and_never_piles_up(
    broker: RedisBroker, client: redis.Redis
) -> None:
    wake = broker.keys("default").wake
    broker.publish_many([message(), message()])  # Into ready, and one token.
    broker.publish(message())
    broker.publish(message())
    broker.publish_many([message(eta=time.time() + 60)])  # A new earliest delayed message.
    assert client.llen(wake) == 1
    assert client.zcard(broker.keys("default").ready) == 4
    assert broker.queue_lengths(["default"]) == {"default": 5}
    broker.ack(broker.consume(["default"], 10, timeout=1))
    assert client.llen(wake) == 0
    assert broker.queue_lengths(["default"]) == {"default": 1}
    assert broker.purge("default") == 1


def test_send_to_an_unreachable_redis_fails_fast_without_the_password() -> None:
    broker = build("redis://user:s3cret-pw@127.0.0.1:1/0", CONNECT_TIMEOUT=1)
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as caught:
        broker.publish(message())
    assert time.monotonic() - started < 2
    assert "s3cret-pw" not in str(caught.value)
    assert "redis://user:***@127.0.0.1:1/0" in str(caught.value)
    with pytest.raises(BrokerConnectionError):
        broker.consume(["default"], 1, timeout=0.1)


def test_a_silent_server_does_not_hang_send() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        broker = build(f"redis://127.0.0.1:{port}/0", CONNECT_TIMEOUT=0.5)
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            broker.publish(message())
        assert time.monotonic() - started < 3
        broker.close()


def test_result_waiter_wakes_on_its_notification(make: Callable[..., RedisBroker]) -> None:
    broker, worker = make(), make()
    task_id = new_id()
    with broker.result_waiter(task_id) as waiter:
        # Sent before wait(): the subscription is already live, so it is not missed.
        worker.notify_results([new_id(), task_id])
        started = time.monotonic()
        waiter.wait(10)
        assert time.monotonic() - started < 1
        # Notifications of other tasks do not end the wait.
        worker.notify_results([new_id()])
        started = time.monotonic()
        waiter.wait(0.3)
        assert time.monotonic() - started >= 0.25
        # Nor does a notification that arrives while waiting, for this id, wait the full time.
        timer = threading.Timer(0.2, worker.notify_results, args=([task_id],))
        timer.start()
        started = time.monotonic()
        waiter.wait(10)
        timer.join()
        assert time.monotonic() - started < 2


def test_result_waiter_polls_when_redis_is_unreachable() -> None:
    broker = build("redis://127.0.0.1:1/0", CONNECT_TIMEOUT=1)
    with broker.result_waiter(new_id()) as waiter:
        started = time.monotonic()
        waiter.wait(0.05)
        assert time.monotonic() - started < 1


def test_oversize_body_is_refused_at_consume(make: Callable[..., RedisBroker]) -> None:
    big = make(MAX_MESSAGE_SIZE=10_000_000)
    small = make(MAX_MESSAGE_SIZE=1000)
    big.publish(message(args=["x" * 5000]))
    [delivery] = small.consume(["default"], 1, timeout=1)
    assert delivery.message is None
    assert "over the limit" in (delivery.error or "")
    assert len(delivery.body) > 5000


def test_a_due_delayed_message_keeps_its_priority(broker: RedisBroker) -> None:
    eta = time.time() + 0.3
    urgent = message(priority=50, eta=eta)
    later = message(priority=-10)
    broker.publish_many([urgent, later])
    sleep_until(eta + 0.01)
    first = broker.consume(["default"], 1, timeout=1)
    assert [d.message.id for d in first if d.message] == [urgent.id]


def test_an_expired_lease_comes_back_with_its_priority(make: Callable[..., RedisBroker]) -> None:
    broker = make(LEASE_SECONDS=0.3)
    urgent, later = message(priority=50), message(priority=-10)
    broker.publish_many([later, urgent])
    [leased] = broker.consume(["default"], 1, timeout=1)
    assert leased.message and leased.message.id == urgent.id
    sleep_until(time.time() + 0.35)
    [again] = broker.consume(["default"], 1, timeout=1)
    assert again.message and again.message.id == urgent.id
    assert again.delivery_count == 2


def test_leases_use_the_redis_clock(make: Callable[..., RedisBroker], client: redis.Redis) -> None:
    broker = make(LEASE_SECONDS=100)
    broker.publish(message())
    [leased] = broker.consume(["default"], 1, timeout=1)
    seconds, micros = client.time()
    deadline = client.zscore(broker.keys("default").leases, leased.tag)
    assert deadline is not None
    assert abs(deadline - (seconds * 1000 + micros // 1000 + 100_000)) < 1000


def test_extend_does_not_resurrect_an_acked_message(broker: RedisBroker) -> None:
    broker.publish(message())
    deliveries = broker.consume(["default"], 1, timeout=1)
    broker.ack(deliveries)
    broker.extend(deliveries)
    assert broker.queue_lengths(["default"]) == {"default": 0}


def test_release_keeps_the_delivery_count(broker: RedisBroker) -> None:
    broker.publish(message())
    broker.release(broker.consume(["default"], 1, timeout=1))
    [again] = broker.consume(["default"], 1, timeout=1)
    assert again.delivery_count == 2


def test_a_batch_over_several_queues_keeps_each_queue_in_order(broker: RedisBroker) -> None:
    sent = [message(queue=q) for q in ("default", "hipri", "default", "hipri", "default")]
    broker.publish_many(sent)
    assert broker.queue_lengths(["default", "hipri"]) == {"default": 3, "hipri": 2}
    for queue in ("default", "hipri"):
        got = broker.consume([queue], 10, timeout=1)
        assert [d.tag for d in got] == [m.id for m in sent if m.queue == queue]


def test_purge_keeps_leased_messages_and_spans_several_scripts(broker: RedisBroker) -> None:
    total = PURGE_CHUNK + 10
    broker.publish_many([message() for _ in range(total)])
    leased = broker.consume(["default"], 3, timeout=1)
    assert broker.purge("default") == total - 3
    assert broker.queue_lengths(["default"]) == {"default": 3}
    assert all(broker.find(d.tag, ["default"]) for d in leased)


def test_the_broker_works_again_after_close(broker: RedisBroker) -> None:
    broker.publish(message())
    broker.close()
    assert broker.queue_lengths(["default"]) == {"default": 1}


def test_extend_and_release_over_several_queues(make: Callable[..., RedisBroker]) -> None:
    owner, other = make(LEASE_SECONDS=0.5), make(LEASE_SECONDS=0.5)
    owner.publish_many([message(), message(queue="hipri")])
    leased = owner.consume(["default", "hipri"], 2, timeout=1)
    assert {d.queue for d in leased} == {"default", "hipri"}
    sleep_until(time.time() + 0.3)
    owner.extend(leased)
    sleep_until(time.time() + 0.3)  # past the first deadline, within the extended one
    assert other.consume(["default", "hipri"], 2, timeout=0) == []
    owner.release(leased)
    again = other.consume(["default", "hipri"], 2, timeout=1)
    assert sorted(d.tag for d in again) == sorted(d.tag for d in leased)


def test_scripts_are_loaded_again_after_a_script_flush(
    broker: RedisBroker, client: redis.Redis
) -> None:
    broker.publish(message())
    client.script_flush()
    broker.publish(message())
    assert len(broker.consume(["default"], 10, timeout=1)) == 2


def test_a_woken_consumer_gets_its_messages_in_the_same_round_trip(
    make: Callable[..., RedisBroker], client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BLPOP and the claim go out together: woken, the consumer has its message at once."""
    broker = make()
    # Connects and loads the scripts.
    broker.consume(["default"], 1, timeout=0.05)
    sent_by: list[str] = []
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        packed = b"".join(command) if isinstance(command, list) else bytes(command)
        if b"EVALSHA" in packed or b"BLPOP" in packed:  # Not a new connection's handshake.
            sent_by.append(threading.current_thread().name)
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    consumer = Consumer(broker, ["default"])
    consumer.start()
    wait_for(lambda: blocked_consumers(client) == 1)
    make().publish(message())
    consumer.join(10)
    assert len(consumer.deliveries) == 1
    assert sent_by.count(consumer.name) == 2  # The first claim, then BLPOP + claim.


def test_a_blocked_consumer_survives_a_script_flush(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    consumer = Consumer(make(), ["default"])
    consumer.start()
    wait_for(lambda: blocked_consumers(client) == 1)
    client.script_flush()
    sent = message()
    make().publish(sent)
    consumer.join(10)
    assert [d.message.id for d in consumer.deliveries if d.message] == [sent.id]


def test_revoked_ids_are_marked_on_their_later_deliveries(broker: RedisBroker) -> None:
    leased, later, other = message(), message(), message()
    broker.publish_many([leased, other])
    deliveries = broker.consume(["default"], 2, timeout=1)
    assert [d.revoked for d in deliveries] == [None, None]
    # Leased: the message stays with its consumer; not published yet: nothing to remove.
    assert not broker.revoke(leased.id, ["default"])
    assert not broker.revoke(later.id, ["default"])
    broker.release(deliveries)
    broker.publish(later)
    again = {
        d.message.id: d.revoked for d in broker.consume(["default"], 3, timeout=1) if d.message
    }
    assert again == {leased.id: True, other.id: None, later.id: True}
    # A waiting message is simply removed.
    waiting = message()
    broker.publish(waiting)
    assert broker.revoke(waiting.id, ["default"])
    assert broker.find(waiting.id, ["default"]) is None


def test_ack_announces_the_results_in_the_same_call(make: Callable[..., RedisBroker]) -> None:
    broker, worker = make(), make()
    sent = message()
    worker.publish(sent)
    [delivery] = worker.consume(["default"], 1, timeout=1)
    with broker.result_waiter(sent.id) as waiter:
        worker.ack([delivery], [sent.id])
        started = time.monotonic()
        waiter.wait(10)
        assert time.monotonic() - started < 1
    assert worker.queue_lengths(["default"]) == {"default": 0}


def subscribers(client: redis.Redis, broker: RedisBroker) -> int:
    """The connections subscribed to this broker's results channel."""
    [(_channel, count)] = client.pubsub_numsub(broker.results_channel)
    return int(count)


def test_waiting_callers_share_one_subscription(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    broker, worker = make(KEY_PREFIX="shared"), make(KEY_PREFIX="shared")
    for _ in range(5):
        task_id = new_id()
        with broker.result_waiter(task_id) as waiter:
            worker.notify_results([task_id])
            waiter.wait(10)
    assert subscribers(client, broker) == 1

    def wait_with_a_broker_of_its_own() -> None:  # As Django gives each thread its backends.
        task_id = new_id()
        with make(KEY_PREFIX="shared").result_waiter(task_id) as waiter:
            worker.notify_results([task_id])
            waiter.wait(10)

    other = threading.Thread(target=wait_with_a_broker_of_its_own)
    other.start()
    other.join(30)
    assert subscribers(client, broker) == 1
    # Callers in several threads wait at once; each returns when its own id is announced.
    ids = [new_id() for _ in range(4)]
    returned: dict[str, float] = {}
    waiters = [broker.result_waiter(task_id) for task_id in ids]

    def wait(task_id: str, waiter: Any) -> None:
        waiter.wait(20)
        returned[task_id] = time.monotonic()

    threads = [threading.Thread(target=wait, args=pair) for pair in zip(ids, waiters, strict=True)]
    for thread in threads:
        thread.start()
    # Each waiter is registered: an id announced before its thread waits wakes it all the same.
    announced = {}
    for task_id in reversed(ids):
        announced[task_id] = time.monotonic()
        worker.notify_results([task_id])
        wait_for(lambda task_id=task_id: task_id in returned)
    for thread in threads:
        thread.join(5)
    for waiter in waiters:
        waiter.close()
    assert all(returned[i] - announced[i] < 1 for i in ids)
    assert subscribers(client, broker) == 1


def test_a_lost_subscription_wakes_the_waiters_and_comes_back(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    broker, worker = make(KEY_PREFIX="lost"), make(KEY_PREFIX="lost")
    task_id = new_id()
    with broker.result_waiter(task_id) as waiter:
        killer = threading.Timer(0.2, lambda: client.client_kill_filter(_type="pubsub"))
        killer.start()
        started = time.monotonic()
        waiter.wait(10)  # Woken by the loss: announcements may have been missed meanwhile.
        killer.join()
        assert time.monotonic() - started < 2
    later = new_id()
    with broker.result_waiter(later) as waiter:
        assert subscribers(client, broker) == 1
        worker.notify_results([later])
        started = time.monotonic()
        waiter.wait(10)
        assert time.monotonic() - started < 1


def test_one_push_wakes_one_blocked_consumer_not_all(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    """Idle consumers are not all woken (each to claim nothing) by every single message."""
    make().consume(["default"], 1, timeout=0.05)  # The scripts are loaded.
    consumers = [Consumer(make(), ["default"]) for _ in range(3)]
    for consumer in consumers:
        consumer.start()
    wait_for(lambda: blocked_consumers(client) == 3)
    client.config_resetstat()
    sent = message()
    make().publish(sent)
    wait_for(lambda: any(c.deliveries for c in consumers))
    # Redis ran the claim of every consumer it woke before it answered any of them: the
    # send and one claim.
    scripts = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert scripts == 2
    assert blocked_consumers(client) == 2
    later = [message(), message()]
    for each in later:  # One each for the consumers still waiting.
        make().publish(each)
    for consumer in consumers:
        consumer.join(10)
    got = sorted(d.message.id for c in consumers for d in c.deliveries if d.message)
    assert got == sorted(m.id for m in [sent, *later])


def test_a_blocked_consumer_survives_its_wake_list_being_deleted(
    make: Callable[..., RedisBroker], client: redis.Redis
) -> None:
    broker = make()
    consumer = Consumer(broker, ["default"])
    consumer.start()
    wait_for(lambda: blocked_consumers(client) == 1)
    client.delete(broker.keys("default").wake)  # A FLUSHDB, say.
    sent = message()
    make().publish(sent)
    consumer.join(10)
    assert [d.message.id for d in consumer.deliveries if d.message] == [sent.id]
