"""Waiting for a result: the store is read when the result can be there, and none is missed."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from django_tasks.backend import TasksBackend
from django_tasks.brokers.database import RESULTS_CHANNEL
from django_tasks.brokers.redis import RedisBroker
from django_tasks.exceptions import TaskRevokedError
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


def results_hub(backend: TasksBackend) -> Any:
    return backend.broker._notifications  # type: ignore[attr-defined]


def test_a_waiting_caller_reads_the_store_when_woken_not_in_a_loop(
    notifying: TasksBackend,
) -> None:
    sent = tasks.add.delay(2, 3)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        with CaptureQueriesContext(connections[TaskResult.objects.db]) as queries:
            outcome["value"] = sent.get(timeout=30)
        outcome["reads"] = reads_of_results(queries)

    waiting = threading.Thread(target=wait)
    waiting.start()
    wait_for(lambda: sent.id in results_hub(notifying)._waiters, what="get() waits")
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 0.5, what="get() waited a while")
    run_queued(notifying)
    waiting.join(30)
    # One read before it waits, one when the announcement wakes it: polling would read often.
    assert outcome == {"value": 5, "reads": 2}


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
    wait_for(lambda: sent.id in results_hub(notifying)._waiters, what="get() waits")
    too_deep = [TOO_DEEP] if isinstance(notifying.broker, RedisBroker) else []
    for payload in [*STRAY_ANNOUNCEMENTS, *too_deep]:
        announce_raw(notifying, payload)
    run_queued(notifying)  # Its announcement comes after the stray ones, on the same listener.
    waiting.join(30)
    assert outcome == {"value": 5}
    assert "Lost the result notifications" not in logged.text
