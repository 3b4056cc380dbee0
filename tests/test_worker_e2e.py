"""End to end: real runworker processes run tasks called through the public APIs."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.tasks import Task as DjangoTask
from django.tasks import TaskResult as DjangoTaskResult
from django.tasks import TaskResultStatus
from django.test import override_settings

from django_tasks import AsyncResult, TaskState
from django_tasks.backend import get_backend
from django_tasks.brokers import create_broker
from django_tasks.conf import BackendConfig
from django_tasks.exceptions import TimeoutError as TaskTimeoutError
from django_tasks.messages import Message, encode, new_id
from django_tasks.models import DeadLetter, TaskResult, Worker
from tests.conftest import E2E
from tests.testapp import reliability_tasks as rt
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for

pytestmark = pytest.mark.e2e

#: Run a test on each pool: the thread pool stops, counts and beats in code of its own.
EACH_POOL = pytest.mark.parametrize("pool", ["process", "thread"])


def test_delay_and_get(e2e: E2E) -> None:
    e2e.start_worker()
    result = tasks.add.delay(2, 2)
    assert result.get(timeout=20) == 4
    assert result.state == TaskState.SUCCESS and result.successful() and result.ready()
    row = TaskResult.objects.get(pk=result.id)
    assert (row.task_name, row.args, row.result) == ("tests.testapp.tasks.add", [2, 2], 4)
    assert row.enqueued_at <= row.started_at <= row.date_done == result.date_done
    assert row.worker and row.worker_ids == [row.worker]


def test_failure_reraises_the_same_exception(e2e: E2E) -> None:
    e2e.start_worker()
    result = tasks.fail.delay("it broke")
    with pytest.raises(tasks.CustomError, match=r"^it broke$"):
        result.get(timeout=20)
    assert result.failed() and result.state == TaskState.FAILURE
    assert isinstance(result.get(propagate=False), tasks.CustomError)
    assert "raise CustomError(message)" in result.traceback
    assert isinstance(result.result, tasks.CustomError)


def test_unserialisable_return_value_is_a_failure(e2e: E2E) -> None:
    e2e.start_worker()
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        tasks.returns_unserialisable.delay().get(timeout=20)


def test_bound_task_sees_its_request(e2e: E2E) -> None:
    e2e.start_worker()
    result = tasks.whoami.delay()
    assert result.get(timeout=20) == {
        "id": result.id,
        "task": "tests.testapp.tasks.whoami",
        "retries": 0,
    }


def test_ignore_result_writes_no_row(e2e: E2E) -> None:
    e2e.start_worker()
    result = tasks.fire_and_forget.delay("ignored")
    wait_for(lambda: Execution.objects.filter(marker="ignored").exists())
    assert not TaskResult.objects.filter(pk=result.id).exists()
    assert result.state == TaskState.PENDING


def test_django_tasks_api(e2e: E2E) -> None:
    e2e.start_worker("-Q", "default,hipri")
    result = tasks.django_add.enqueue(3, 4)
    wait_for(lambda: result.refresh() or result.is_finished)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 7
    assert result.attempts == 1 and len(result.worker_ids) == 1
    assert result.started_at is not None and result.finished_at is not None

    context = tasks.django_attempt.enqueue("v")
    wait_for(lambda: context.refresh() or context.is_finished)
    assert context.return_value == {"attempt": 1, "id": context.id, "value": "v"}

    failing = tasks.django_failing.enqueue()
    wait_for(lambda: failing.refresh() or failing.is_finished)
    assert failing.status == TaskResultStatus.FAILED
    assert failing.errors[0].exception_class is tasks.CustomError
    assert "django failure" in failing.errors[0].traceback


async def finished(task: DjangoTask, result_id: str, timeout: float = 20.0) -> DjangoTaskResult:
    """Await ``task.aget_result()`` until the result is finished; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = await task.aget_result(result_id)
        if result.is_finished:
            return result
        assert time.monotonic() < deadline, f"{result_id} not finished within {timeout} s"
        await asyncio.sleep(0.05)


def test_aenqueue_and_aget_result(e2e: E2E) -> None:
    """Django's async API, from async code: a Django task, one of ours, a coroutine task."""
    e2e.start_worker("-c", "1")
    calls = [(tasks.django_add, (2, 3)), (tasks.add, (4, 5)), (tasks.async_add, (6, 7))]

    async def scenario() -> list[DjangoTaskResult]:
        try:
            sent = [await task.aenqueue(*args) for task, args in calls]
            assert {result.status for result in sent} == {TaskResultStatus.READY}
            done = [await finished(task, r.id) for (task, _), r in zip(calls, sent, strict=True)]
            await sent[0].arefresh()
            assert sent[0].status == TaskResultStatus.SUCCESSFUL
            return done
        finally:
            # The ORM ran in asgiref's executor thread: close its connections there.
            await sync_to_async(connections.close_all)()

    done = asyncio.run(scenario())
    assert [r.status for r in done] == [TaskResultStatus.SUCCESSFUL] * 3
    assert [r.return_value for r in done] == [5, 9, 13]
    assert [r.attempts for r in done] == [1, 1, 1]


def test_get_timeout_raises_a_timeout_error(e2e: E2E) -> None:
    result = tasks.add.delay(1, 1)
    with pytest.raises(TaskTimeoutError) as info:
        result.get(timeout=0.3)
    assert isinstance(info.value, TimeoutError)


def test_bad_messages_are_dead_lettered_and_the_worker_goes_on(e2e: E2E) -> None:
    broker = get_backend().broker
    bad_json = Message(id=new_id(), task="tests.testapp.tasks.add")
    unknown = Message(id=new_id(), task="os.system", args=["echo hacked"])
    broker.send([(bad_json, "{not json")])
    broker.publish(unknown)
    e2e.start_worker("-c", "1")
    assert tasks.add.delay(1, 2).get(timeout=20) == 3
    wait_for(lambda: DeadLetter.objects.count() == 2)
    reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
    assert "not valid JSON" in reasons[0]
    assert reasons[1] == "unknown task 'os.system': not registered here"
    # Dead letters are stored before their deliveries are acked: wait for the acks.
    wait_for(lambda: broker.queue_lengths(["default"]) == {"default": 0})


def envelope(message: Message, **changes: Any) -> str:
    """``message`` encoded, with fields changed or added as another release might send it."""
    return json.dumps({**json.loads(encode(message)), **changes})


def test_a_newer_releases_message_runs_and_its_retry_keeps_the_fields_not_known_here(
    e2e: E2E,
) -> None:
    """A producer one release ahead adds a field: this worker runs the task and sends it again
    (a retry) with that field, so a worker of the newer release still finds it."""
    broker = get_backend().broker
    # Retried once, after a minute: the retry waits in the broker, where it can be read.
    message = Message(id=new_id(), task=rt.always_retries.name, args=["newer", 60])
    broker.send([(message, envelope(message, workflow={"step": 2, "of": 3}))])
    e2e.start_worker("-c", "1")
    wait_for(lambda: Execution.objects.filter(marker="newer").exists())

    def retry_sent() -> Message | None:
        waiting = broker.find(message.id, ["default"])
        return waiting if waiting is not None and waiting.retries == 1 else None

    wait_for(lambda: retry_sent() is not None)
    retry = retry_sent()
    assert retry is not None and retry.extra == {"workflow": {"step": 2, "of": 3}}
    assert AsyncResult(message.id).state == TaskState.RETRY


def test_another_major_version_or_a_wrong_type_is_dead_lettered_with_its_reason(
    e2e: E2E,
) -> None:
    broker = get_backend().broker
    later = Message(id=new_id(), task=tasks.add.name, args=[1, 2])
    wrong = Message(id=new_id(), task=tasks.add.name, args=[1, 2])
    broker.send([(later, envelope(later, v=2)), (wrong, envelope(wrong, retries="1"))])
    e2e.start_worker("-c", "1")
    wait_for(lambda: DeadLetter.objects.count() == 2)
    # Read the ids from the bodies kept: a broker need not know the id of a body it cannot read.
    reasons = {json.loads(body)["id"]: reason for body, reason in
               DeadLetter.objects.values_list("body", "reason")}  # fmt: skip
    assert reasons[later.id].startswith("unsupported envelope version 2: this worker reads")
    assert reasons[wrong.id] == "field 'retries' has the wrong type str"
    assert not TaskResult.objects.filter(pk__in=[later.id, wrong.id]).exists()
    assert tasks.add.delay(1, 1).get(timeout=20) == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("broker_kind", ["redis"], indirect=True)
def test_a_worker_leaves_the_tasks_of_another_project_on_its_redis_database(e2e: E2E) -> None:
    with override_settings(ROOT_URLCONF="blog.urls"):  # Another project, default options.
        blog = create_broker(BackendConfig.from_params("default", {"OPTIONS": e2e.options}))
    theirs = [
        Message(id=new_id(), task="tests.testapp.tasks.add", args=[1, 1]),  # Known here too.
        Message(id=new_id(), task="blog.tasks.publish"),  # Unknown here: a dead letter if taken.
    ]
    blog.publish_many(theirs)
    worker = e2e.start_worker("-c", "1")
    assert "key prefix 'dt:tests'" in worker.log()  # The banner says which project it serves.
    assert tasks.add.delay(1, 2).get(timeout=20) == 3  # Sent after theirs, on the same queue.
    assert worker.stop() == 0  # All it did is stored by now.
    assert not TaskResult.objects.filter(pk__in=[m.id for m in theirs]).exists()
    assert not DeadLetter.objects.exists()
    assert blog.queue_lengths(["default"]) == {"default": 2}
    blog.close()


def test_queues_and_routes(e2e: E2E) -> None:
    e2e.start_worker("-c", "1", "-Q", "hipri")
    assert tasks.routed.delay().get(timeout=20) == "routed"
    low = tasks.add.apply_async((1, 1), queue="lopri")
    with pytest.raises(TaskTimeoutError):
        low.get(timeout=0.5)


def test_countdown(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    sent = time.time()
    result = tasks.add.apply_async((1, 1), countdown=1)
    assert result.get(timeout=20) == 2
    assert TaskResult.objects.get(pk=result.id).started_at.timestamp() >= sent + 1


def test_thread_pool(e2e: E2E) -> None:
    e2e.start_worker("--pool", "thread", "-c", "2")
    results = [tasks.add.delay(i, i) for i in range(10)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(10)]


def test_many_workers_share_a_queue_and_run_each_task_once(e2e: E2E) -> None:
    first = e2e.start_worker("-c", "2")
    second = e2e.start_worker("-c", "2", "--pool", "thread")
    markers = [f"m{i}" for i in range(60)]
    # Tasks of 20 ms: with quick ones, one pool member may lease (adaptively) and run them all
    # before another wakes; these are enough work for every member to take its share.
    for marker in markers:
        tasks.sleep_then_record.delay(marker, 0.02)
    wait_for(lambda: Execution.objects.count() >= len(markers), timeout=60)
    wait_for(lambda: get_backend().broker.queue_lengths(["default"])["default"] == 0)
    counts = {m: Execution.objects.filter(marker=m).count() for m in markers}
    assert set(counts.values()) == {1}
    assert len(set(Execution.objects.values_list("pid", flat=True))) >= 2
    assert first.process.poll() is None and second.process.poll() is None


@EACH_POOL
def test_warm_shutdown_finishes_the_running_task(e2e: E2E, pool: str) -> None:
    worker = e2e.start_worker("-c", "1", "--pool", pool)
    result = tasks.sleep_then_record.delay("warm", 1.5)
    wait_for(lambda: result.state == TaskState.STARTED)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert result.state == TaskState.SUCCESS
    assert Execution.objects.filter(marker="warm").count() == 1
    assert "finishing running tasks" in worker.log()


@EACH_POOL
def test_warm_shutdown_gives_back_the_tasks_not_started(e2e: E2E, pool: str) -> None:
    running = tasks.sleep_then_record.delay("running", 1.5)
    waiting = tasks.record.delay("waiting")
    worker = e2e.start_worker("-c", "1", "--pool", pool, "--prefetch", "2")
    wait_for(lambda: running.state == TaskState.STARTED)
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert (running.state, waiting.state) == (TaskState.SUCCESS, TaskState.PENDING)
    # Released, not left to its 30 s lease: the next worker runs it at once.
    e2e.start_worker("-c", "1", "--burst", ready=False)
    assert waiting.get(timeout=20) == 1


@EACH_POOL
def test_second_signal_aborts_and_the_task_returns_to_the_queue(e2e: E2E, pool: str) -> None:
    worker = e2e.start_worker("-c", "1", "--pool", pool)
    result = tasks.slow_once.delay("abort", 60)
    wait_for(lambda: result.state == TaskState.STARTED)
    worker.signal(signal.SIGTERM)
    wait_for(lambda: "finishing running tasks" in worker.log())
    worker.signal(signal.SIGINT)
    worker.wait(30)
    assert result.state == TaskState.STARTED
    assert get_backend().broker.queue_lengths(["default"]) == {"default": 1}
    e2e.start_worker("-c", "1")
    assert result.get(timeout=20) == "done"
    assert Execution.objects.filter(marker="abort").count() == 2


@EACH_POOL
def test_burst_runs_what_is_queued_then_exits(e2e: E2E, pool: str) -> None:
    results = tasks.add.delay_many([(i, i) for i in range(6)])
    worker = e2e.start_worker("-c", "2", "--pool", pool, "--burst", ready=False)
    assert worker.wait(60) == 0
    assert [r.get(timeout=1) for r in results] == [2 * i for i in range(6)]
    assert get_backend().broker.queue_lengths(["default"]) == {"default": 0}


@EACH_POOL
def test_max_tasks_exits_after_that_many_tasks(e2e: E2E, pool: str) -> None:
    results = tasks.add.delay_many([(i, i) for i in range(5)])
    worker = e2e.start_worker("-c", "1", "--pool", pool, "--max-tasks", "3", ready=False)
    assert worker.wait(60) == 0
    assert [r.state for r in results] == [TaskState.SUCCESS] * 3 + [TaskState.PENDING] * 2
    assert get_backend().broker.queue_lengths(["default"]) == {"default": 2}
    # Not held under a lease of the worker that left: the next worker runs them at once.
    e2e.start_worker("-c", "1", "--burst", ready=False)
    assert [r.get(timeout=20) for r in results[3:]] == [6, 8]


def test_killed_worker_task_runs_on_another_after_the_lease(e2e: E2E) -> None:
    victim = e2e.start_worker("-c", "1", LEASE_SECONDS=2)
    result = tasks.slow_once.delay("killed", 60)
    wait_for(lambda: Execution.objects.filter(marker="killed").exists())
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    e2e.start_worker("-c", "1", LEASE_SECONDS=2)
    assert result.get(timeout=30) == "done"
    assert Execution.objects.filter(marker="killed").count() == 2


def test_banner_and_heartbeat(e2e: E2E) -> None:
    worker = e2e.start_worker("-c", "1", "-Q", "default,hipri", "-n", "banner-host")
    log = worker.log()
    assert "queues:      default, hipri" in log
    assert "tests.testapp.tasks.add" in log
    record = wait_for(lambda: Worker.objects.filter(hostname="banner-host").first())
    assert record.queues == ["default", "hipri"] and record.is_alive()
    worker.stop()
    record.refresh_from_db()
    assert record.stopped_at is not None and not record.is_alive()


@EACH_POOL
def test_the_heartbeat_advances_while_the_worker_runs(e2e_sqlite: E2E, pool: str) -> None:
    e2e_sqlite.start_worker("-c", "1", "--pool", pool, "-n", "beating-host")
    started = wait_for(lambda: Worker.objects.filter(hostname="beating-host").first())
    assert started.processed == 0
    assert [r.get(timeout=20) for r in tasks.add.delay_many([(1, 1)] * 3)] == [2] * 3

    def beat_after(last: Worker, processed: int) -> Worker | None:
        later = Worker.objects.filter(pk=last.pk, last_seen__gt=last.last_seen)
        return later.filter(processed=processed).first()

    # A beat every 5 seconds: with the tasks counted, then again while idle.
    beat = wait_for(lambda: beat_after(started, 3), what="a heartbeat counting 3 tasks")
    beat = wait_for(lambda: beat_after(beat, 3), what="a heartbeat of the idle worker")
    assert beat.is_alive() and beat.stopped_at is None


def test_delay_many(e2e: E2E) -> None:
    e2e.start_worker("-c", "2")
    results = tasks.add.delay_many([(i, 1) for i in range(50)])
    assert [r.get(timeout=20) for r in results] == [i + 1 for i in range(50)]


def test_a_worker_deletes_results_older_than_result_expires(e2e_sqlite: E2E) -> None:
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    rows = {
        name: TaskResult.objects.create(
            id=new_id(), task_name="tests.testapp.tasks.add", state=state, date_done=done
        ).pk
        for name, state, done in (
            ("old", TaskState.SUCCESS, now - timedelta(days=2)),
            ("recent", TaskState.FAILURE, now - timedelta(hours=1)),
            ("unfinished", TaskState.STARTED, None),
        )
    }
    e2e_sqlite.start_worker("-c", "1")  # RESULT_EXPIRES: one day, the default.
    wait_for(lambda: not TaskResult.objects.filter(pk=rows["old"]).exists(),
             what="the result older than RESULT_EXPIRES deleted")  # fmt: skip
    assert TaskResult.objects.filter(pk__in=[rows["recent"], rows["unfinished"]]).count() == 2
    assert "Deleted 1 expired result(s)" in e2e_sqlite.workers[0].log()
