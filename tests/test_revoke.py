"""Revoking from the caller's side: AsyncResult.revoke(), the stored state and the queue.

No worker runs here: these tests look at the result store and at the broker's queues, on every
broker. What a worker does with a revoked task is tested with the workers.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone
from redis.connection import AbstractConnection

from django_tasks import TaskState
from django_tasks.backend import TasksBackend, get_backend
from django_tasks.exceptions import TaskRevokedError
from django_tasks.messages import new_id
from django_tasks.models import TaskResult
from django_tasks.result import AsyncResult
from django_tasks.results import ResultStore
from tests.conftest import tasks_setting
from tests.testapp import tasks


def queued(backend: TasksBackend, task_id: str) -> bool:
    return backend.broker.find(task_id, backend.known_queues()) is not None


def assert_revoked(result: AsyncResult, backend: TasksBackend, reason: str = "revoked") -> None:
    assert result.state == TaskState.REVOKED
    assert result.ready() and not result.successful() and not result.failed()
    assert isinstance(result.result, TaskRevokedError)
    with pytest.raises(TaskRevokedError, match=reason):
        result.get(timeout=5)
    assert isinstance(result.get(timeout=5, propagate=False), TaskRevokedError)
    fresh = AsyncResult(result.id)
    assert fresh.state == TaskState.REVOKED and fresh.date_done is not None
    assert TaskResult.objects.get(pk=result.id).reason == reason


def test_revoke_a_queued_task(backend: TasksBackend) -> None:
    result = tasks.routed.delay()
    other = tasks.add.delay(1, 2)
    assert queued(backend, result.id)
    result.revoke()
    assert not queued(backend, result.id)
    assert_revoked(result, backend)
    assert backend.broker.queue_lengths(backend.known_queues()) == {
        "default": 1,
        "hipri": 0,
        "lopri": 0,
    }
    assert queued(backend, other.id) and other.state == TaskState.PENDING
    # The row tells what was revoked, so that the admin can show it and send it again.
    row = TaskResult.objects.get(pk=result.id)
    assert (row.task_name, row.queue, row.args, row.kwargs) == (
        "tests.testapp.tasks.routed",
        "hipri",
        [],
        {},
    )
    assert row.enqueued_at is not None and row.enqueued_at <= row.date_done


def test_revoke_a_delayed_task(backend: TasksBackend) -> None:
    result = tasks.add.apply_async((2, 3), countdown=60, priority=7)
    assert queued(backend, result.id)
    result.revoke()
    assert not queued(backend, result.id)
    assert backend.broker.queue_lengths(["default"]) == {"default": 0}
    assert_revoked(result, backend)
    row = TaskResult.objects.get(pk=result.id)
    assert (row.task_name, row.args, row.priority) == ("tests.testapp.tasks.add", [2, 3], 7)


def test_revoke_with_terminate(backend: TasksBackend) -> None:
    result = tasks.add.delay(1, 1)
    result.revoke(terminate=True)
    assert not queued(backend, result.id)
    assert_revoked(result, backend, reason="terminated")


def test_revoke_a_task_a_worker_holds(backend: TasksBackend) -> None:
    """The message stays with its worker, which finds the task REVOKED in the store."""
    result = tasks.add.delay(1, 1)
    [delivery] = backend.broker.consume(["default"], 1, timeout=1)
    result.revoke()
    assert result.state == TaskState.REVOKED
    assert queued(backend, result.id)
    backend.broker.ack([delivery])
    assert not queued(backend, result.id)


@pytest.mark.parametrize("state", [TaskState.SUCCESS, TaskState.FAILURE])
def test_revoke_a_finished_task_changes_nothing(backend: TasksBackend, state: str) -> None:
    done_at = timezone.now()
    row = TaskResult.objects.create(
        id=new_id(),
        task_name="tests.testapp.tasks.add",
        state=state,
        result=3 if state == TaskState.SUCCESS else None,
        exception_type="" if state == TaskState.SUCCESS else "builtins.ValueError",
        exception_message="" if state == TaskState.SUCCESS else "bad",
        date_done=done_at,
    )
    result = AsyncResult(row.id)
    assert result.state == state  # Cached: revoke() must not leave a stale state behind.
    result.revoke()
    result.revoke(terminate=True)
    assert result.state == state
    after = TaskResult.objects.get(pk=row.id)
    assert (after.state, after.reason, after.date_done) == (state, "", done_at)
    if state == TaskState.SUCCESS:
        assert result.get(timeout=1) == 3
    else:
        with pytest.raises(ValueError, match="bad"):
            result.get(timeout=1)


def test_revoke_an_unknown_id(backend: TasksBackend) -> None:
    result = AsyncResult(new_id(), task_name="tests.testapp.tasks.add")
    result.revoke()
    assert_revoked(result, backend)
    assert TaskResult.objects.get(pk=result.id).task_name == "tests.testapp.tasks.add"


# The result store ---------------------------------------------------------------------------


def make_row(state: str, reason: str = "") -> TaskResult:
    return TaskResult.objects.create(
        id=new_id(), task_name="tests.testapp.tasks.add", state=state, reason=reason
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("state", [TaskState.PENDING, TaskState.STARTED, TaskState.RETRY])
def test_store_revokes_unfinished_rows(state: str) -> None:
    row = make_row(state)
    ResultStore().revoke(row.id, reason="revoked")
    after = TaskResult.objects.get(pk=row.id)
    assert (after.state, after.reason) == (TaskState.REVOKED, "revoked")
    assert after.date_done is not None


@pytest.mark.django_db(transaction=True)
def test_store_escalates_a_revoke_to_terminate_only() -> None:
    """A revoked task still running can be terminated; a terminate is never watered down."""
    row = make_row(TaskState.STARTED)
    store = ResultStore()
    store.revoke(row.id, reason="revoked")
    store.revoke(row.id, reason="terminated")
    assert TaskResult.objects.get(pk=row.id).reason == "terminated"
    store.revoke(row.id, reason="revoked")
    assert TaskResult.objects.get(pk=row.id).reason == "terminated"
    expired = make_row(TaskState.REVOKED, reason="expired")
    store.revoke(expired.id, reason="terminated")
    assert TaskResult.objects.get(pk=expired.id).reason == "expired"


@pytest.mark.django_db(transaction=True)
def test_store_revoke_takes_two_queries(django_assert_num_queries: Any) -> None:
    row = make_row(TaskState.STARTED)
    with django_assert_num_queries(2):
        ResultStore().revoke(row.id, reason="revoked")
    with django_assert_num_queries(2):
        ResultStore().revoke(new_id(), reason="revoked")


@pytest.mark.django_db(transaction=True)
def test_revoke_on_the_database_broker_takes_four_statements(
    settings: Any, django_assert_num_queries: Any
) -> None:
    """find, insert, update, delete (in its own transaction, as QuerySet.delete() makes one:
    BEGIN and COMMIT count too); a queued task's row is inserted with its details."""
    settings.TASKS = tasks_setting({"DATABASE": "default"})
    result = tasks.add.delay(1, 2)
    with django_assert_num_queries(6):
        result.revoke()
    assert result.state == TaskState.REVOKED


@pytest.mark.django_db(transaction=True)
def test_revoke_on_redis_takes_three_round_trips(
    redis_url: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """find, the remove script of every queue in one MULTI/EXEC, the announcement (and two
    queries)."""
    settings.TASKS = tasks_setting({"BROKER_URL": redis_url})
    result = tasks.add.delay(1, 2)
    get_backend().broker.queue_lengths(["default"])  # Connects the pool (a handshake of its own).
    sent: list[Any] = []
    original = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        sent.append(command)
        original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    result.revoke()
    monkeypatch.undo()
    assert len(sent) == 3
    assert result.state == TaskState.REVOKED
    assert get_backend().broker.find(result.id, ["default"]) is None
