"""A pool member's loop, run in this process: batches that adapt, and what a batch costs."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_tasks import TaskState
from django_tasks.backend import TasksBackend
from django_tasks.brokers import Broker, Delivery
from django_tasks.models import TaskResult
from django_tasks.worker.consumer import Consumer, Prefetch, refresh_idle_connections
from tests.conftest import require_postgres
from tests.testapp import tasks


def test_a_fixed_prefetch_stays_fixed() -> None:
    prefetch = Prefetch(7)
    prefetch.observe(100, 0.001)
    assert prefetch.count == 7


def test_prefetch_grows_for_quick_tasks_and_shrinks_for_slow_ones() -> None:
    prefetch = Prefetch()
    assert prefetch.count == Prefetch.INITIAL
    for _ in range(5):
        prefetch.observe(prefetch.count, prefetch.count * 0.0001)  # 0.1 ms a task
    assert prefetch.count == Prefetch.MAXIMUM
    for _ in range(5):
        prefetch.observe(prefetch.count, prefetch.count * 2.0)  # two seconds a task
    assert prefetch.count == 1
    for _ in range(20):  # 4 ms a task: about BATCH_SECONDS of them at a time
        prefetch.observe(prefetch.count, prefetch.count * 0.004)
    assert abs(prefetch.count - Prefetch.BATCH_SECONDS / 0.004) <= 1


class CountingBroker:
    """Wraps a broker and records the size of every consume() it serves."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.batches: list[int] = []

    def consume(self, queues: Any, count: int, timeout: float) -> list[Delivery]:
        deliveries = self.broker.consume(queues, count, timeout)
        if deliveries:
            self.batches.append(len(deliveries))
        return deliveries

    def __getattr__(self, name: str) -> Any:
        return getattr(self.broker, name)


def drain(backend: TasksBackend, **options: Any) -> tuple[Consumer, CountingBroker]:
    """Run a consumer until the queue is empty, counting its batches."""
    real = backend.broker
    counting = CountingBroker(real)
    backend.__dict__["broker"] = counting  # The cached_property's slot.
    try:
        consumer = Consumer(backend, ["default"], "test-0", burst=True, **options)
        consumer.run()
    finally:
        backend.__dict__["broker"] = real
    return consumer, counting


def test_quick_tasks_are_leased_and_stored_in_large_batches(backend: TasksBackend) -> None:
    results = tasks.add.delay_many([(i, i) for i in range(300)])
    with CaptureQueriesContext(connections["default"]) as queries:
        consumer, counting = drain(backend)
    assert consumer.processed == 300
    assert all(r.get(timeout=1) == 2 * i for i, r in enumerate(results))
    assert max(counting.batches) > Prefetch.INITIAL
    assert len(counting.batches) < 300 / Prefetch.INITIAL
    writes = [q for q in queries.captured_queries if "INSERT" in q["sql"]]
    # One statement per flush, each for many tasks; never one per task.
    assert 0 < len(writes) <= 300 / 5
    # Revokes are read from the result store once per batch, never once per task (on the
    # database broker with results on its database, the claim itself says).
    selects = [q for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    assert len(selects) <= len([b for b in counting.batches if b])


def test_a_fixed_prefetch_is_honoured(backend: TasksBackend) -> None:
    tasks.add.delay_many([(i, i) for i in range(20)])
    consumer, counting = drain(backend, prefetch=3)
    assert consumer.processed == 20
    assert max(counting.batches) == 3


def test_a_task_revoked_while_its_message_was_leased_is_skipped_when_redelivered(
    backend: TasksBackend,
) -> None:
    result = tasks.add.delay(1, 2)
    other = tasks.add.delay(3, 4)
    deliveries = backend.broker.consume(["default"], 2, timeout=1)
    result.revoke()  # Leased: the message stays; its next delivery is skipped.
    backend.broker.release(deliveries)
    consumer, _ = drain(backend)
    assert consumer.processed == 2
    assert other.get(timeout=1) == 7
    row = TaskResult.objects.get(pk=result.id)
    assert row.state == TaskState.REVOKED
    assert backend.broker.queue_lengths(["default"]) == {"default": 0}


def test_a_pool_process_reports_its_running_task_to_the_parent() -> None:
    import multiprocessing

    from django_tasks.messages import Message
    from django_tasks.worker.supervisor import SlotMonitor

    monitor = SlotMonitor(multiprocessing.get_context("fork"))
    message = Message(id="t-1", task="tests.testapp.tasks.add", queue="hipri", priority=-3)
    delivery = Delivery("tag\t1", "hipri", "{}", message, delivery_count=2)
    monitor.held([delivery])
    monitor.started(delivery, 1234.5)
    state = monitor.read()
    assert state["running"] == {"tag": "tag\t1", "queue": "hipri", "count": 2, "id": "t-1",
                                "task": "tests.testapp.tasks.add", "priority": -3,
                                "deadline": 1234.5}  # fmt: skip
    assert [h["id"] for h in state["held"]] == ["t-1"]
    monitor.started(delivery, None)
    assert monitor.read()["running"]["deadline"] is None
    monitor.finished()
    assert monitor.read()["running"] is None


@pytest.mark.django_db(databases=["default", "postgres"], transaction=True)
def test_an_idle_consumer_checks_its_database_connections_before_the_next_task() -> None:
    """With CONN_HEALTH_CHECKS, the check runs while idle, and a dead connection is replaced."""
    require_postgres()
    connection = connections["postgres"]
    saved = dict(connection.settings_dict)
    # Persistent connections, checked for health, as production sites run them.
    connection.settings_dict.update(CONN_HEALTH_CHECKS=True, CONN_MAX_AGE=600)
    try:
        connection.close()
        connection.ensure_connection()
        assert connection.health_check_enabled
        refresh_idle_connections()
        # Done now: the next query (the next task's) needs no SELECT 1 first.
        assert connection.connection is not None and connection.health_check_done
        pid = connection.connection.info.backend_pid
        killer = connection.copy()  # Another connection ends this one's server process.
        with killer.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        killer.close()
        refresh_idle_connections()  # The dead connection is found and closed while idle...
        assert connection.connection is None
        with connection.cursor() as cursor:  # ...so the next task's first query just works.
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
    finally:
        connection.close()
        connection.settings_dict.update(saved)


def test_a_coroutine_task_runs_and_its_value_is_stored(backend: TasksBackend) -> None:
    assert tasks.async_add.call(2, 3) == 5
    result = tasks.async_add.delay(2, 3)
    Consumer(backend, ["default"], "test-0", burst=True).run()
    assert (result.state, result.get(timeout=5)) == (TaskState.SUCCESS, 5)
