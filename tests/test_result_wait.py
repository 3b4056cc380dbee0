"""Waiting for a result: the store is read when the result can be there, and none is missed.

A caller waiting for a task its own process sent skips the read of the store before its first
wait, while the broker's notifications show that the task cannot have finished yet.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_tasks.backend import TasksBackend
from django_tasks.brokers import notifications
from django_tasks.brokers.database import RESULTS_CHANNEL
from django_tasks.brokers.redis import RedisBroker
from django_tasks.exceptions import TaskRevokedError, TimeoutError
from django_tasks.models import TaskResult
from django_tasks.result import AsyncResult
from django_tasks.worker.consumer import Consumer
from tests.conftest import BROKER_PARAMS
from tests.testapp import tasks
from tests.workers import wait_for


@pytest.fixture(params=[param for param in BROKER_PARAMS if param.id != "sqlite"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """The brokers that announce results: Redis, and the database broker on PostgreSQL."""
    return str(request.param)


@pytest.fixture
def notifying(backend: TasksBackend) -> TasksBackend:
    """The backend, its process subscribed to result notifications."""
    with backend.broker.result_waiter("subscribe"):
        pass  # The process's subscription is made here, as by a first get().
    return backend


def run_queued(backend: TasksBackend) -> None:
    """Run every queued task as a worker would: store the results, ack, announce."""
    Consumer(backend, ["default"], "test-0", burst=True).run()


def reads_of_results(queries: CaptureQueriesContext) -> int:
    table = TaskResult._meta.db_table
    return sum(1 for q in queries.captured_queries if q["sql"].startswith("SELECT")
               and table in q["sql"])  # fmt: skip


def test_a_caller_waits_before_reading_the_result_of_a_task_it_sent(
    notifying: TasksBackend,
) -> None:
    sent = tasks.add.delay(2, 3)
    results = connections[TaskResult.objects.db]
    with CaptureQueriesContext(results) as queries, pytest.raises(TimeoutError):
        sent.get(timeout=0.2)
    # Nothing announced: one read, after the wait, where a caller without the mark reads twice.
    assert reads_of_results(queries) == 1
    with CaptureQueriesContext(results) as queries, pytest.raises(TimeoutError):
        AsyncResult(sent.id).get(timeout=0.2)
    assert reads_of_results(queries) == 2
    run_queued(notifying)
    with CaptureQueriesContext(results) as queries:
        assert sent.get(timeout=10) == 5
    assert reads_of_results(queries) == 1


def test_a_result_announced_before_the_caller_waits_is_not_missed(
    notifying: TasksBackend,
) -> None:
    sent = tasks.add.delay(2, 3)
    run_queued(notifying)
    # Another caller in this process reads the announcement first.
    with notifying.broker.result_waiter(sent.id) as waiter:
        waiter.wait(10)
    with notifying.broker.result_waiter(sent.id) as waiter:
        assert not waiter.unannounced_since(sent._sent)
    assert sent.get(timeout=10) == 5


def test_a_forgotten_announcement_makes_the_caller_read_the_store(
    notifying: TasksBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notifications, "REMEMBERED", 2)
    sent = tasks.add.delay(2, 3)
    others = [tasks.add.delay(i, i) for i in range(3)]
    with notifying.broker.result_waiter(sent.id) as waiter:
        assert waiter.unannounced_since(sent._sent)
    run_queued(notifying)
    # Their announcements are read, and push the first ones out of the hub's memory.
    assert [other.get(timeout=10) for other in others] == [0, 2, 4]
    with notifying.broker.result_waiter(sent.id) as waiter:
        assert not waiter.unannounced_since(sent._sent)
    assert sent.get(timeout=10) == 5
    # A mark taken now needs none of what was forgotten.
    later = tasks.add.delay(1, 1)
    with notifying.broker.result_waiter(later.id) as waiter:
        assert waiter.unannounced_since(later._sent)


def test_a_new_subscription_makes_the_caller_read_the_store(notifying: TasksBackend) -> None:
    sent = tasks.add.delay(2, 3)
    notifying.broker.close()  # Announcements made meanwhile would be missed.
    run_queued(notifying)
    with notifying.broker.result_waiter(sent.id) as waiter:
        assert not waiter.unannounced_since(sent._sent)
    assert sent.get(timeout=10) == 5


def test_a_mark_of_another_process_is_not_trusted(notifying: TasksBackend) -> None:
    sent = tasks.add.delay(2, 3)
    assert isinstance(sent._sent, tuple)
    foreign: Any = ("0" * 16, *sent._sent[1:])
    with notifying.broker.result_waiter(sent.id) as waiter:
        assert waiter.unannounced_since(sent._sent)
        assert not waiter.unannounced_since(foreign)


def test_revoking_a_queued_task_wakes_its_waiting_caller(notifying: TasksBackend) -> None:
    sent = tasks.add.delay(2, 3)
    with notifying.broker.result_waiter(sent.id) as waiter:
        AsyncResult(sent.id).revoke()  # From another caller: no worker will announce it.
        started = time.monotonic()
        waiter.wait(10)
        assert time.monotonic() - started < 1
    with pytest.raises(TaskRevokedError):
        sent.get(timeout=10)


#: What another program might publish on the results channel: not JSON, JSON but not a list, a
#: list of things other than ids, JSON nested too deep to read.
STRAY_ANNOUNCEMENTS = ["not json", '{"id": "x"}', '[1, ["nested"], {"id": "x"}, null]']
#: Deeper than json can read; NOTIFY payloads (under 8000 bytes) cannot nest that deep.
TOO_DEEP = "[" * 100_000 + "]" * 100_000


def announce_raw(backend: TasksBackend, payload: str) -> None:
    """Publish ``payload`` on the results channel of ``backend``'s broker, as anyone can."""
    broker = backend.broker
    if isinstance(broker, RedisBroker):
        broker.client.publish(broker.results_channel, payload)
        return
    with connections[broker.config.database].cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [RESULTS_CHANNEL, payload])


def test_a_stray_announcement_is_skipped_by_the_waiting_caller(
    notifying: TasksBackend, logged: pytest.LogCaptureFixture
) -> None:
    sent = tasks.add.delay(2, 3)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        try:
            outcome["value"] = sent.get(timeout=30)
        except Exception as exc:
            outcome["error"] = exc

    waiting = threading.Thread(target=wait)
    waiting.start()
    wait_for(lambda: notifying.broker._notifications.blocked == 1, what="get() waits")
    too_deep = [TOO_DEEP] if isinstance(notifying.broker, RedisBroker) else []
    for payload in [*STRAY_ANNOUNCEMENTS, *too_deep]:
        announce_raw(notifying, payload)
    run_queued(notifying)  # Its announcement comes after the stray ones, on the same listener.
    waiting.join(30)
    assert outcome == {"value": 5}
    assert "Lost the result notifications" not in logged.text
