"""Execution semantics: retries, time limits, expiry, revoke-terminate, dying pool processes,
per-child recycling and transactional enqueue, each with a real runworker."""

from __future__ import annotations

import time

import pytest
from django.db import transaction
from django.tasks import TaskResultStatus

from django_tasks import AsyncResult, TaskState
from django_tasks.backend import get_backend
from django_tasks.exceptions import TaskRevokedError, TimeLimitExceeded, WorkerLostError
from django_tasks.models import TaskResult
from tests.conftest import E2E, tasks_setting
from tests.testapp import reliability_tasks as rt
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for

pytestmark = pytest.mark.e2e


def attempts(marker: str) -> int:
    return Execution.objects.filter(marker=marker).count()


def test_retry_until_success(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    result = rt.succeeds_on_third_attempt.delay("third")
    assert result.get(timeout=30) == {"attempt": 3, "retries": 2}
    assert result.retries == 2
    row = TaskResult.objects.get(pk=result.id)
    assert [e["message"] for e in row.errors] == ["attempt 1", "attempt 2"]
    django_result = get_backend().get_result(result.id)
    assert django_result.status == TaskResultStatus.SUCCESSFUL
    assert django_result.attempts == 3
    assert [e.exception_class for e in django_result.errors] == [rt.Flaky, rt.Flaky]


def test_retry_state_then_failure_with_the_last_exception(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    result = rt.always_retries.delay("twice", 1.5)
    wait_for(lambda: result.state == TaskState.RETRY)
    assert result.retries == 1
    with pytest.raises(rt.Flaky, match=r"^attempt 2$"):
        result.get(timeout=30)
    assert attempts("twice") == 2
    assert result.retries == 1


def test_autoretry_with_backoff(e2e_sqlite: E2E) -> None:
    e2e_sqlite.start_worker("-c", "1")
    result = rt.autoretried.delay("auto")
    with pytest.raises(rt.Flaky, match=r"^attempt 3$"):
        result.get(timeout=30)
    assert attempts("auto") == 3
    assert len(TaskResult.objects.get(pk=result.id).errors) == 3


def test_soft_time_limit_lets_the_task_clean_up(e2e_sqlite: E2E) -> None:
    e2e_sqlite.start_worker("-c", "1")
    assert rt.cleans_up_after_soft_limit.delay(30).get(timeout=20) == "cleaned up"


def test_soft_time_limit_in_the_thread_pool(e2e_sqlite: E2E) -> None:
    e2e_sqlite.start_worker("--pool", "thread", "-c", "2")
    assert rt.polls_until_soft_limit.delay(30).get(timeout=20) == "cleaned up"
    assert tasks.add.delay(1, 2).get(timeout=20) == 3


def test_a_soft_time_limit_ends_with_its_task(e2e_sqlite: E2E) -> None:
    # The quick task's alarm must not go off in the slower task run next by the same process.
    e2e_sqlite.start_worker("-c", "1")
    quick = tasks.sleep_then_record.apply_async(("quick", 0.0), soft_time_limit=1)
    slower = tasks.sleep_then_record.delay("slower", 1.5)
    assert quick.get(timeout=20) == "quick"
    assert slower.get(timeout=20) == "slower"


def test_hard_time_limit_stops_the_task_and_the_pool_goes_on(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    result = rt.overruns.delay(60)
    with pytest.raises(TimeLimitExceeded, match="exceeded its time limit"):
        result.get(timeout=30)
    per_call = rt.sleeps.apply_async((60,), time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        per_call.get(timeout=30)
    assert rt.sleeps.delay(0).get(timeout=20) == "finished"


def test_expired_message_is_not_run(e2e_sqlite: E2E) -> None:
    result = tasks.record.apply_async(("expired",), expires=0.5)
    deadline = time.time() + 0.5
    wait_for(lambda: time.time() > deadline)
    e2e_sqlite.start_worker("-c", "1")
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=20)
    assert result.state == TaskState.REVOKED
    assert TaskResult.objects.get(pk=result.id).reason == "expired"
    assert attempts("expired") == 0


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_task_that_outlives_its_lease_runs_once(e2e: E2E, pool: str) -> None:
    """Its worker renews the lease: a second worker, idle all along, never takes the task."""
    e2e.start_worker("-c", "1", "--pool", pool, LEASE_SECONDS=2)
    result = tasks.slow_once.delay("outlives", 6)  # Three leases long.
    wait_for(lambda: attempts("outlives") == 1)
    e2e.start_worker("-c", "1", LEASE_SECONDS=2)
    assert result.get(timeout=30) == "done"
    assert attempts("outlives") == 1
    assert len(TaskResult.objects.get(pk=result.id).worker_ids) == 1


def test_a_task_revoked_while_prefetched_never_runs(e2e: E2E) -> None:
    """Leased behind a slow task on a worker of concurrency 1, then revoked: skipped."""
    ahead = tasks.sleep_then_record.delay("ahead", 3)
    result = tasks.record.delay("prefetched")
    e2e.start_worker("-c", "1", "--prefetch", "2")
    wait_for(lambda: ahead.state == TaskState.STARTED)
    result.revoke()
    broker = get_backend().broker
    assert broker.find(result.id, ["default"]) is not None  # Held by the worker, not removed.
    assert ahead.get(timeout=20) == "ahead"
    wait_for(lambda: broker.queue_lengths(["default"]) == {"default": 0})
    assert attempts("prefetched") == 0
    assert result.state == TaskState.REVOKED
    assert TaskResult.objects.get(pk=result.id).reason == "revoked"


def test_revoke_terminate_stops_a_running_task(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    result = tasks.slow_once.delay("terminate", 60)
    wait_for(lambda: attempts("terminate") == 1)
    result.revoke(terminate=True)
    with pytest.raises(TaskRevokedError):
        result.get(timeout=20)
    wait_for(lambda: TaskResult.objects.get(pk=result.id).date_done is not None)
    assert TaskResult.objects.get(pk=result.id).reason == "terminated"
    assert tasks.add.delay(1, 1).get(timeout=20) == 2


def test_dying_pool_process_redelivers_once_then_fails(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    result = rt.dies.delay("dies")
    with pytest.raises(WorkerLostError, match="died"):
        result.get(timeout=40)
    assert attempts("dies") == 2
    assert tasks.add.delay(2, 2).get(timeout=20) == 4


def test_max_tasks_per_child_replaces_the_process(e2e_sqlite: E2E) -> None:
    e2e_sqlite.start_worker("-c", "1", "--max-tasks-per-child", "2")
    pids = [tasks.pid.delay().get(timeout=20) for _ in range(5)]
    assert len(set(pids)) == 3
    assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]


def test_max_memory_per_child_replaces_the_process(e2e_sqlite: E2E) -> None:
    e2e_sqlite.start_worker("-c", "1", "--max-memory-per-child", "200000")
    first = rt.grows.delay(250).get(timeout=20)
    second = tasks.pid.delay().get(timeout=20)
    assert first != second


def test_enqueue_in_a_transaction_is_seen_only_after_commit(e2e: E2E) -> None:
    e2e.start_worker("-c", "2")
    results = []
    for index in range(10):
        with transaction.atomic():
            Execution.objects.create(marker=f"tx{index}", pid=0)
            results.append(rt.row_exists.delay(f"tx{index}"))
            # Give a worker every chance to run the task before the commit.
            time.sleep(0.05)
    assert [r.get(timeout=20) for r in results] == [True] * 10


def test_rollback_cancels_the_task(e2e: E2E) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        result = tasks.record.delay("rolled-back")
        raise RuntimeError("roll back")
    assert get_backend().broker.find(result.id, ["default"]) is None
    assert AsyncResult(result.id).state == TaskState.PENDING


@pytest.mark.django_db(transaction=True)
def test_redis_publishes_on_commit_unless_told_otherwise(redis_url: str, settings) -> None:
    settings.TASKS = tasks_setting({"BROKER_URL": redis_url})
    broker = get_backend().broker
    with transaction.atomic():
        deferred = tasks.record.delay("later")
        immediate = tasks.record.apply_async(("now",), on_commit=False)
        assert broker.find(deferred.id, ["default"]) is None
        assert broker.find(immediate.id, ["default"]) is not None
    assert broker.find(deferred.id, ["default"]) is not None
    settings.TASKS = tasks_setting({"BROKER_URL": redis_url, "PUBLISH_ON_COMMIT": False})
    with transaction.atomic():
        result = tasks.record.delay("setting")
        assert get_backend().broker.find(result.id, ["default"]) is not None
