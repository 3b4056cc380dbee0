"""The database broker beyond the contract: transactions, LISTEN/NOTIFY, query counts, leases."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_tasks.brokers import notifications
from django_tasks.brokers.base import Delivery
from django_tasks.brokers.database import DatabaseBroker, queue_channel
from django_tasks.conf import BackendConfig
from django_tasks.exceptions import BrokerConnectionError
from django_tasks.messages import Message, new_id
from django_tasks.models import QueuedMessage, TaskResult
from django_tasks.states import TaskState
from django_tasks.worker.consumer import Consumer
from tests.conftest import tasks_setting
from tests.testapp import tasks

HAS_POSTGRES = "postgres" in settings.DATABASES
POSTGRES_MARKS = [
    pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not answering"),
    pytest.mark.django_db(databases=["default", "postgres"], transaction=True),
]
ALIASES = [
    pytest.param("default", id="sqlite", marks=pytest.mark.django_db(transaction=True)),
    pytest.param("postgres", id="postgres", marks=POSTGRES_MARKS),
]
postgres_only = pytest.mark.parametrize("alias", [ALIASES[1]])
both = pytest.mark.parametrize("alias", ALIASES)

BrokerMaker = Callable[..., DatabaseBroker]


class Rollback(Exception):
    pass


def message(**fields: Any) -> Message:
    return Message(id=new_id(), task="tests.testapp.tasks.add", **fields)


@pytest.fixture
def make(alias: str) -> Iterator[BrokerMaker]:
    """Build database brokers on ``alias``; ``make(LEASE_SECONDS=1)`` sets options."""
    made: list[DatabaseBroker] = []

    def factory(**options: Any) -> DatabaseBroker:
        params = {"QUEUES": ["default", "hipri"], "OPTIONS": {"DATABASE": alias, **options}}
        broker = DatabaseBroker(BackendConfig.from_params("default", params))
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        broker.close()


def start[T](function: Callable[[], T]) -> Callable[[], T]:
    """Run ``function`` in another thread (so on other database connections); return a join."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = function()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> T:
        thread.join(60)
        assert not thread.is_alive()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


def in_thread[T](function: Callable[[], T]) -> T:
    """Run ``function`` in another thread and return its result."""
    return start(function)()


def wait_for(condition: Callable[[], bool], deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "the condition did not hold in time"
        time.sleep(0.01)


def consume_until(broker: DatabaseBroker, want: int, deadline: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    end = time.monotonic() + deadline
    while len(got) < want and time.monotonic() < end:
        got += broker.consume(["default"], want - len(got), timeout=0.2)
    return got


def postgres_sessions(where: str) -> list[int]:
    """The backend pids of other sessions on the test database matching ``where``."""
    with connections["postgres"].cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            f"AND pid <> pg_backend_pid() AND {where}"
        )
        return [pid for (pid,) in cursor.fetchall()]


def terminate(pid: int) -> None:
    """Kill a PostgreSQL session, as a server restart would, and wait until it is gone."""
    with connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_for(lambda: not postgres_sessions(f"pid = {int(pid)}"))


# Transactions -------------------------------------------------------------------------------


@both
def test_send_rolls_back_with_the_callers_transaction(make: BrokerMaker, alias: str) -> None:
    broker = make()
    with pytest.raises(Rollback), transaction.atomic(using=alias):
        broker.publish(message())
        assert broker.queue_lengths(["default"]) == {"default": 1}
        raise Rollback
    assert broker.queue_lengths(["default"]) == {"default": 0}
    assert broker.consume(["default"], 1, timeout=0) == []


@both
def test_send_commits_with_the_callers_transaction(make: BrokerMaker, alias: str) -> None:
    producer, consumer = make(), make()
    sent = message()
    with transaction.atomic(using=alias):
        producer.publish(sent)
        assert in_thread(lambda: consumer.queue_lengths(["default"])) == {"default": 0}
    [delivery] = in_thread(lambda: consumer.consume(["default"], 1, timeout=5))
    assert delivery.message == sent


# Leases ---------------------------------------------------------------------------------------


@both
def test_requeue_resets_the_delivery_count(make: BrokerMaker) -> None:
    broker = make()
    sent = message()
    broker.publish(sent)
    [first] = broker.consume(["default"], 1, timeout=1)
    retry = message(retries=1, queue="hipri", priority=5)
    broker.requeue(first, retry)
    assert broker.queue_lengths(["default", "hipri"]) == {"default": 0, "hipri": 1}
    [again] = broker.consume(["hipri"], 1, timeout=1)
    assert again.message == retry
    assert again.delivery_count == 1


@both
def test_oversize_body_is_refused_at_consume(make: BrokerMaker) -> None:
    big, small = make(MAX_MESSAGE_SIZE=10_000_000), make(MAX_MESSAGE_SIZE=1000)
    big.publish(message(args=["x" * 5000]))
    [delivery] = small.consume(["default"], 1, timeout=1)
    assert delivery.message is None
    assert "over the limit" in (delivery.error or "")
    assert len(delivery.body) > 5000


# Waking ---------------------------------------------------------------------------------------


@postgres_only
def test_an_idle_consumer_is_woken_by_a_publish(make: BrokerMaker) -> None:
    consumer, producer = make(), make()
    consumer.max_wait = 600  # Within the test's timeout, only a notification can wake it.
    sent = message()

    def publish_once_listening() -> None:
        wait_for(lambda: bool(postgres_sessions("state = 'idle' AND query LIKE 'LISTEN %'")))
        producer.publish(sent)

    published = start(publish_once_listening)
    deliveries = consumer.consume(["default"], 1, timeout=60)
    published()
    assert [d.message for d in deliveries] == [sent]


@postgres_only
def test_an_idle_consumer_wakes_when_a_delayed_message_is_due(make: BrokerMaker) -> None:
    broker = make()
    broker.max_wait = 600  # Only the computed time of the next due message can wake it.
    delayed = message(queue="hipri", eta=time.time() + 0.3)
    broker.publish(delayed)
    [delivery] = broker.consume(["default", "hipri"], 1, timeout=60)
    assert delivery.message == delayed


@postgres_only
def test_a_consumer_that_left_the_queue_empty_waits_before_claiming_again(
    make: BrokerMaker,
) -> None:
    consumer, producer = make(), make()
    consumer.max_wait = 600
    first, second = message(), message()
    producer.publish(first)
    # A short claim (one of ten asked for) says in the same statement that nothing else is
    # ready and nothing is delayed: the next consume waits for a notification, not a claim.
    assert [d.message for d in consumer.consume(["default"], 10, timeout=1)] == [first]
    idle = sql_of("postgres", lambda: consumer.consume(["default"], 10, timeout=0.2))
    assert len(idle) == 1  # The one claim after the wait: no claim before it, no other query.
    producer.publish(second)
    started = time.monotonic()
    assert [d.message for d in consumer.consume(["default"], 10, timeout=30)] == [second]
    assert time.monotonic() - started < 15  # Woken by the notification, not the timeout.


@postgres_only
def test_a_consumer_claims_again_after_max_wait_without_a_notification(
    make: BrokerMaker,
) -> None:
    broker = make()
    broker.max_wait = 0.1
    sent = message(eta=time.time() + 3600)  # Far ahead: published without a notification.
    broker.publish(sent)
    assert broker.consume(["default"], 1, timeout=0.01) == []
    claimed_at = time.monotonic()
    wait_for(lambda: time.monotonic() - claimed_at > 0.2)  # As if it ran a long batch.
    # Made ready behind the broker's back (as an expired lease is): nothing notifies.
    QueuedMessage.objects.using("postgres").update(available_at=timezone.now())
    broker.max_wait = 600
    started = time.monotonic()
    [delivery] = broker.consume(["default"], 1, timeout=30)
    assert delivery.message == sent
    assert time.monotonic() - started < 15  # Its last claim was too old to trust: it claimed.


def consume_in_threads(
    make: BrokerMaker, count: int, timeout: float, threads: int = 2
) -> tuple[list[Callable[[], tuple[list[Delivery], int]]], DatabaseBroker]:
    """Start ``threads`` consumers (a broker each, as in a thread pool), all waiting when this
    returns; each join gives its deliveries and how many claims it made."""

    def consume() -> tuple[list[Delivery], int]:
        broker = make()
        broker.max_wait = 600  # Within the test's timeouts, only a notification wakes one.
        with CaptureQueriesContext(connections["postgres"]) as queries:
            deliveries = broker.consume(["default"], count, timeout=timeout)
        return deliveries, sum("RETURNING" in q["sql"] for q in queries.captured_queries)

    joins = [start(consume) for _ in range(threads)]
    producer = make()
    channel = queue_channel("default")
    hub = producer._queue_hub([channel])
    wait_for(lambda: len(hub._waiters.get(channel, ())) == threads)  # Registered: none is missed.
    return joins, producer


@postgres_only
def test_consumer_threads_share_one_listen_connection_and_a_message_is_delivered_once(
    make: BrokerMaker,
) -> None:
    joins, producer = consume_in_threads(make, count=10, timeout=3)
    assert len(postgres_sessions("query LIKE 'LISTEN %'")) == 1
    sent = message()
    started = time.monotonic()
    producer.publish(sent)
    outcomes = sorted((join() for join in joins), key=lambda outcome: len(outcome[0]))
    (missed, _), (got, _) = outcomes
    assert missed == [] and [d.message for d in got] == [sent]
    # Woken by the notification: the other one went back to sleep until its timeout.
    assert time.monotonic() - started >= 2


@postgres_only
def test_a_consumer_whose_claim_came_back_full_wakes_another(make: BrokerMaker) -> None:
    joins, producer = consume_in_threads(make, count=1, timeout=30)
    sent = [message(), message()]
    started = time.monotonic()
    producer.publish_many(sent)  # One NOTIFY for both.
    got = [d.message for join in joins for d in join()[0]]
    assert sorted(m.id for m in got) == sorted(m.id for m in sent)
    assert time.monotonic() - started < 15  # Woken by the first one, not by the timeout.


@postgres_only
def test_result_waiter_wakes_when_its_task_is_announced(make: BrokerMaker) -> None:
    waiting, announcing = make(), make()
    task_ids = [new_id() for _ in range(500)]  # More than one NOTIFY payload can carry.
    woke = threading.Event()
    with waiting.result_waiter(task_ids[-1]) as waiter:
        thread = threading.Thread(target=lambda: (waiter.wait(120), woke.set()))
        thread.start()
        announcing.notify_results(task_ids)
        assert woke.wait(60)
        thread.join(5)


def test_result_waiter_polls_on_sqlite() -> None:
    params = {"OPTIONS": {"DATABASE": "default"}}
    broker = DatabaseBroker(BackendConfig.from_params("default", params))
    with broker.result_waiter(new_id()) as waiter:
        waiter.wait(0.01)
    broker.notify_results([new_id()])  # Nobody listens: nothing to do, nothing raised.


# Query counts -----------------------------------------------------------------------------------


def sql_of(alias: str, operation: Callable[[], object]) -> list[str]:
    with CaptureQueriesContext(connections[alias]) as context:
        operation()
    return [query["sql"] for query in context.captured_queries]


@postgres_only
def test_postgres_query_counts(make: BrokerMaker) -> None:
    broker = make()
    broker.consume(["default"], 1, timeout=0)  # Returns expired leases (none) once.
    broker.lease_check_interval = 3600
    publish = sql_of("postgres", lambda: broker.publish_many([message(), message()]))
    assert len(publish) == 1
    assert "INSERT" in publish[0] and "pg_notify" in publish[0]

    deliveries: list[Delivery] = []
    claim = sql_of("postgres", lambda: deliveries.extend(broker.consume(["default"], 10, 0)))
    assert len(deliveries) == 2
    assert len(claim) == 1
    assert "UPDATE" in claim[0] and "SKIP LOCKED" in claim[0] and "RETURNING" in claim[0]

    assert len(sql_of("postgres", lambda: broker.extend(deliveries))) == 1
    # Acknowledging, and announcing stored results: one transaction (usually the worker's).
    acked = sql_of("postgres", lambda: broker.ack(deliveries[:1]))
    assert [q.split()[0] for q in acked] == ["BEGIN", "DELETE", "COMMIT"]
    acked = sql_of("postgres", lambda: broker.ack(deliveries[1:], ["some-task-id"]))
    assert [q.split()[0] for q in acked] == ["BEGIN", "DELETE", "SELECT", "COMMIT"]
    assert "pg_notify" in acked[2]
    assert broker.queue_lengths(["default"]) == {"default": 0}
    assert len(sql_of("postgres", lambda: broker.queue_lengths(["default", "hipri"]))) == 1


@pytest.mark.django_db(transaction=True)
def test_sqlite_claim_is_one_update() -> None:
    params = {"OPTIONS": {"DATABASE": "default"}}
    broker = DatabaseBroker(BackendConfig.from_params("default", params))
    broker.consume(["default"], 1, timeout=0)
    broker.lease_check_interval = 3600
    sent = [message(), message()]
    broker.publish_many(sent)
    deliveries: list[Delivery] = []
    claim = sql_of("default", lambda: deliveries.extend(broker.consume(["default"], 10, 0)))
    assert len(deliveries) == 2
    assert [q.split()[0] for q in claim] == ["UPDATE"]
    assert [d.message.id for d in deliveries if d.message] == [m.id for m in sent]


# Lost connections -------------------------------------------------------------------------------


@contextmanager
def database_alias(alias: str, settings_dict: dict[str, Any]) -> Iterator[str]:
    """A database alias of the test's own, configured by ``settings_dict``, for its duration."""
    connections.settings[alias] = settings_dict
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]


@pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not answering")
def test_delay_gives_up_on_a_silent_database_after_connect_timeout(
    settings: Any, django_db_blocker: Any
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # Accepts, never answers.
        # Hang up at last, so that a delay() that would wait for ever fails the test instead.
        hang_up = threading.Timer(20, silent.close)
        hang_up.start()
        port = silent.getsockname()[1]
        postgres = connections["postgres"].settings_dict
        # No connect_timeout in OPTIONS: the broker sets it from CONNECT_TIMEOUT.
        silent_postgres = {**postgres, "PORT": str(port), "OPTIONS": {}}
        # Not a django_db test: no test case forbids the alias it adds.
        with database_alias("silent", silent_postgres), django_db_blocker.unblock():
            settings.TASKS = tasks_setting({"DATABASE": "silent", "CONNECT_TIMEOUT": 2})
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError, match="'silent'"):
                tasks.add.delay(1, 2)
            elapsed = time.monotonic() - started
        hang_up.cancel()
    assert elapsed < 2 + 3


@postgres_only
def test_a_lost_connection_raises_then_reconnects(make: BrokerMaker) -> None:
    broker = make()
    broker.queue_lengths(["default"])
    with connections["postgres"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    in_thread(lambda: terminate(pid))
    with pytest.raises(BrokerConnectionError, match="'postgres'"):
        broker.queue_lengths(["default"])
    assert broker.queue_lengths(["default"]) == {"default": 0}


@postgres_only
def test_a_consumer_carries_on_after_losing_its_listen_connection(
    make: BrokerMaker, logged: pytest.LogCaptureFixture
) -> None:
    consumer, producer = make(), make()
    consumer.max_wait = 600  # Within the test's timeouts, it does not claim on a timer.
    assert consumer.consume(["default"], 1, timeout=0.01) == []
    [pid] = postgres_sessions("query LIKE 'LISTEN %'")
    terminate(pid)
    wait_for(lambda: "Lost the queue notifications" in logged.text)
    lost = message()
    producer.publish(lost)  # Its NOTIFY is lost with the connection: the consumer polls.
    [delivery] = consumer.consume(["default"], 1, timeout=5)
    assert delivery.message == lost
    # It listens again (a waiting consumer subscribes anew), then sleeps until a notification.
    listening = "state = 'idle' AND query LIKE 'LISTEN %'"
    wait_for(
        lambda: (
            consumer.consume(["default"], 1, timeout=0.05) == [] and postgres_sessions(listening)
        )
    )
    sent = message()
    producer.publish(sent)
    started = time.monotonic()
    [delivery] = consumer.consume(["default"], 1, timeout=30)
    assert delivery.message == sent
    assert time.monotonic() - started < 15


@postgres_only
def test_waiting_callers_share_one_listen_connection(make: BrokerMaker) -> None:
    waiting, announcing = make(), make()

    def wait_once(broker: DatabaseBroker) -> None:
        task_id = new_id()
        with broker.result_waiter(task_id) as waiter:
            announcing.notify_results([task_id])
            started = time.monotonic()
            waiter.wait(10)
            assert time.monotonic() - started < 5  # Woken, not timed out.

    for turn in range(6):  # Callers in this thread, and in others with brokers of their own.
        if turn % 2:
            in_thread(lambda: wait_once(make()))
        else:
            wait_once(waiting)
    with connections["postgres"].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE %s",
            ['LISTEN "dt_results"'],
        )
        assert cursor.fetchone()[0] == 1


@postgres_only
def test_a_subscription_no_caller_reads_does_not_hold_back_the_notify_queue(
    make: BrokerMaker,
) -> None:
    waiting, announcing = make(), make()
    task_id = new_id()
    with waiting.result_waiter(task_id) as waiter:  # Subscribes, then no caller waits.
        announcing.notify_results([task_id])
        waiter.wait(10)
    # Far more than socket buffers hold (~27 MB): unread, its session would stop in the middle
    # of sending them, and the cluster's NOTIFY queue would keep them until it is full.
    many = [new_id() for _ in range(250_000)]
    for _ in range(3):
        announcing.notify_results(many)

    def queue_usage() -> float:
        with connections["postgres"].cursor() as cursor:
            cursor.execute("SELECT pg_notification_queue_usage()")
            return float(cursor.fetchone()[0])

    wait_for(lambda: queue_usage() == 0, deadline=60)  # Read by the hub's thread.


@postgres_only
def test_a_subscription_unused_for_a_while_is_closed_then_made_again(
    make: BrokerMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifications, "CLOSE_AFTER", 0.5)
    waiting, announcing = make(), make()
    with waiting.result_waiter(new_id()) as waiter:
        waiter.wait(0.01)
    subscribed = "query = 'LISTEN \"dt_results\"'"
    assert postgres_sessions(subscribed)
    wait_for(lambda: not postgres_sessions(subscribed))
    task_id = new_id()
    with waiting.result_waiter(task_id) as waiter:
        announcing.notify_results([task_id])
        started = time.monotonic()
        waiter.wait(30)
        assert time.monotonic() - started < 15  # Woken by the announcement.


class ResultsOnPostgres:
    """Routes TaskResult rows to the "postgres" database."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return "postgres" if model is TaskResult else None

    db_for_write = db_for_read


@both
def test_the_claim_says_which_tasks_were_revoked(
    make: BrokerMaker, alias: str, settings: Any
) -> None:
    """With the results on the broker's database, the claim itself reads the REVOKED rows."""
    if alias == "postgres":
        # The test settings keep results on "default": the broker cannot tell, and the worker
        # asks the result store.
        elsewhere = make()
        elsewhere.publish(message())
        assert [d.revoked for d in elsewhere.consume(["default"], 1, 0)] == [None]
        settings.DATABASE_ROUTERS = [ResultsOnPostgres()]
    broker = make()
    revoked, kept = message(), message()
    broker.publish_many([revoked, kept])
    TaskResult.objects.using(alias).create(
        id=revoked.id, task_name=revoked.task, state=TaskState.REVOKED
    )
    flags = {d.message.id: d.revoked for d in broker.consume(["default"], 2, 0) if d.message}
    assert flags == {revoked.id: True, kept.id: False}


@postgres_only
def test_consumers_vacuum_the_queue_table_as_they_go(make: BrokerMaker) -> None:
    def last_vacuum() -> Any:
        with connections["postgres"].cursor() as cursor:
            cursor.execute(
                "SELECT pg_stat_clear_snapshot(), last_vacuum FROM pg_stat_user_tables "
                "WHERE relname = 'django_tasks_queuedmessage'"
            )
            return cursor.fetchone()[1]

    broker = make()
    broker.vacuum_every = 10
    before = last_vacuum()
    for _ in range(2):
        broker.publish_many([message() for _ in range(5)])
        broker.ack(broker.consume(["default"], 5, 0))
    deadline = time.monotonic() + 10
    while last_vacuum() == before:
        assert time.monotonic() < deadline, "the queue table was not vacuumed"
        time.sleep(0.05)


REFUSE_ACKS = """
CREATE FUNCTION dt_test_refuse_acks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'acks are refused' USING ERRCODE = 'query_canceled'; END $$;
CREATE TRIGGER dt_test_refuse_acks BEFORE DELETE ON django_tasks_queuedmessage
FOR EACH ROW EXECUTE FUNCTION dt_test_refuse_acks();
"""
ACCEPT_ACKS = "DROP FUNCTION IF EXISTS dt_test_refuse_acks() CASCADE"


@postgres_only
def test_results_and_acks_commit_together(alias: str, settings: Any, logged: Any) -> None:
    """While the database refuses the ack, the result stored before it is not committed
    either: the message stays leased, no result is visible. Once the ack goes through, both do.
    """
    from django_tasks.backend import get_backend

    settings.DATABASE_ROUTERS = [ResultsOnPostgres()]
    settings.TASKS = tasks_setting({"DATABASE": "postgres"})
    result = tasks.add.delay(2, 3)
    with connections["postgres"].cursor() as cursor:
        cursor.execute(REFUSE_ACKS)
    try:
        consumer = Consumer(get_backend(), ["default"], "test-0", burst=True, max_tasks=1)
        done = start(consumer.run)
        wait_for(lambda: "acknowledge 1 task(s)" in logged.text)
        assert not TaskResult.objects.using("postgres").filter(pk=result.id).exists()
        [row] = QueuedMessage.objects.using("postgres").filter(task_id=result.id)
        assert row.leased_until is not None
    finally:
        with connections["postgres"].cursor() as cursor:
            cursor.execute(ACCEPT_ACKS)
    done()
    assert TaskResult.objects.using("postgres").get(pk=result.id).state == TaskState.SUCCESS
    assert not QueuedMessage.objects.using("postgres").filter(task_id=result.id).exists()
