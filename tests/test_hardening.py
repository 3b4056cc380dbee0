"""One bad value or one misbehaving task never stops work: each with a real runworker.

Each test runs on four worlds: the Redis broker with results in SQLite and in PostgreSQL, and
the database broker on PostgreSQL (results there too: one commit for results and acks) and on
SQLite. Some run on both pools.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import connections, router
from django.tasks.exceptions import InvalidTask

from django_tasks import AsyncResult, TaskState
from django_tasks.backend import get_backend
from django_tasks.brokers.redis_keys import queue_keys
from django_tasks.exceptions import EncodeError
from django_tasks.messages import Message, new_id
from django_tasks.models import DeadLetter, TaskResult
from django_tasks.results import ResultStore
from tests.conftest import E2E, _world
from tests.routers import ResultsOn
from tests.testapp import hardening_tasks as ht
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for

pytestmark = pytest.mark.e2e


def _postgres_missing() -> bool:
    return "postgres" not in django_settings.DATABASES


def _world_param(broker: str, results: str) -> Any:
    databases = ["default", "postgres"] if "postgres" in (broker, results) else ["default"]
    marks = [pytest.mark.django_db(databases=databases, transaction=True)]
    if "postgres" in databases:
        marks.append(pytest.mark.skipif(_postgres_missing(), reason="PostgreSQL is not answering"))
    label = {"default": "sqlite", "postgres": "pg"}[results]
    return pytest.param((broker, results), marks=marks, id=f"{broker}-broker-{label}-results")


WORLDS = [
    _world_param("redis", "default"),
    _world_param("redis", "postgres"),
    _world_param("postgres", "postgres"),
    _world_param("sqlite", "default"),
]


@pytest.fixture(params=WORLDS)
def world(request: pytest.FixtureRequest, settings: Any, tmp_path: Any) -> Iterator[E2E]:
    """A broker and a database for the results; workers started through it see both."""
    broker, results = request.param
    for made in _world(broker, request, settings, tmp_path):
        if results != "default":
            settings.DATABASE_ROUTERS = [ResultsOn(results)]
            made.env["DT_TEST_RESULTS_DATABASE"] = results
        yield made


def results_on_postgres() -> bool:
    return connections[router.db_for_write(TaskResult)].vendor == "postgresql"


def row(result: AsyncResult) -> TaskResult:
    wait_for(lambda: result.ready(), timeout=30, what=f"task {result.id} in a final state")
    return TaskResult.objects.get(pk=result.id)


def publish_raw(message: Message, body: str | None = None) -> AsyncResult:
    """Send a message as another producer might, past delay()'s checks."""
    broker = get_backend().broker
    broker.send([(message, body if body is not None else broker.encode(message)[1])])
    return AsyncResult(message.id)


def raw_message(task: Any, *args: Any, task_id: str | None = None) -> Message:
    return Message(id=task_id or new_id(), task=task.name, args=list(args), queue="default")


def queue_empty() -> bool:
    return get_backend().broker.queue_lengths(["default"])["default"] == 0


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_values_the_store_refuses_fail_their_task_and_the_batch_goes_on(
    world: E2E, pool: str
) -> None:
    before = tasks.add.delay_many([(i, i) for i in range(5)])
    bad = [
        ht.returns_nul.delay(),
        ht.raises_with_nul.delay(),
        publish_raw(raw_message(ht.returns, "a\x00b")),
    ]
    after = tasks.add.delay_many([(i, 1) for i in range(5)])
    world.start_worker("-c", "1", "--pool", pool, "--prefetch", "20")
    assert [r.get(timeout=30) for r in before] == [0, 2, 4, 6, 8]
    assert [r.get(timeout=30) for r in after] == [1, 2, 3, 4, 5]
    for result in bad:
        stored = row(result)
        if results_on_postgres():
            assert stored.state == TaskState.FAILURE
            assert stored.exception_type == "django_tasks.exceptions.ResultRefused"
            assert "The result store refused" in stored.exception_message
            assert stored.args == [] and stored.result is None
        else:  # SQLite stores a NUL character.
            assert stored.state in (TaskState.SUCCESS, TaskState.FAILURE)
    assert tasks.add.delay(20, 22).get(timeout=30) == 42
    assert "Could not store" not in world.logs()


def test_a_task_id_no_row_can_hold_is_dead_lettered(world: E2E) -> None:
    if world.kind != "redis" or not results_on_postgres():
        pytest.skip("only PostgreSQL refuses a long id, and its database broker at the send")
    long_id = "x" * 300
    publish_raw(raw_message(tasks.add, 1, 2, task_id=long_id))
    world.start_worker("-c", "1")
    wait_for(lambda: DeadLetter.objects.filter(task_id=long_id[:255]).exists(), timeout=30)
    assert "refused" in DeadLetter.objects.get(task_id=long_id[:255]).reason
    assert tasks.add.delay(1, 2).get(timeout=30) == 3


def test_delay_refuses_what_the_store_could_not_hold(world: E2E) -> None:
    with pytest.raises(InvalidTask, match="at most 255 characters"):
        tasks.add.apply_async((1, 2), task_id="x" * 256)
    if results_on_postgres():
        with pytest.raises(EncodeError, match="NUL character"):
            tasks.add.delay("a\x00b", "")
        with pytest.raises(EncodeError, match="NUL character"):
            tasks.add.delay_many([(1, 2), ({"k\x00": 1}, 2)])
    else:
        tasks.add.delay("a\x00b", "")
    # A backslash followed by "u0000" is no NUL character.
    tasks.add.delay("a\\u0000b", "")
    assert get_backend().broker.queue_lengths(["default"])["default"] == (
        1 if results_on_postgres() else 2
    )


BASE_EXCEPTIONS = {
    "exit0": "builtins.SystemExit",
    "exit2": "builtins.SystemExit",
    "keyboard": "builtins.KeyboardInterrupt",
    "generator": "builtins.GeneratorExit",
    "cancelled": "asyncio.exceptions.CancelledError",
}


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_base_exceptions_fail_the_task_not_the_worker(world: E2E, pool: str) -> None:
    sent = {kind: ht.raises_base.delay(kind) for kind in BASE_EXCEPTIONS}
    world.start_worker("-c", "1", "--pool", pool)
    for kind, result in sent.items():
        stored = row(result)
        assert (stored.state, stored.exception_type) == (TaskState.FAILURE, BASE_EXCEPTIONS[kind])
    assert tasks.add.delay(1, 2).get(timeout=30) == 3
    assert "outside shutdown" not in world.logs() and "died" not in world.logs()


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_a_pool_member_that_exits_outside_shutdown_is_replaced(world: E2E, pool: str) -> None:
    # A receiver of task_prerun calls sys.exit(0) the first time this task runs: the exception
    # is not the task's, so it ends its pool member (tests/testapp/receivers.py).
    result = ht.returns.apply_async(("survived",), task_id=f"exit-consumer-{new_id()}")
    worker = world.start_worker("-c", "1", "--pool", pool)
    assert result.get(timeout=30) == "survived"
    log = worker.log()
    assert "outside shutdown" in log or "died; starting a new one" in log
    assert Execution.objects.filter(marker=f"consumer-exit:{result.id}").count() == 1


def test_a_pool_process_that_exits_with_status_0_is_replaced(world: E2E) -> None:
    died = ht.exits_process.delay("exit-0")
    worker = world.start_worker("-c", "1")
    assert tasks.add.delay(2, 2).get(timeout=30) == 4
    wait_for(lambda: "exited with code 0 outside shutdown" in worker.log())
    # The task itself killed its process: delivered again once, then WorkerLostError.
    stored = row(died)
    assert stored.exception_type == "django_tasks.exceptions.WorkerLostError"
    assert Execution.objects.filter(marker="exit-0").count() == 2


def test_receivers_of_djangos_signals_that_raise_break_nothing(world: E2E) -> None:
    enqueued = ht.noisy.enqueue()  # Its task_enqueued receiver raises: logged, not raised.
    world.start_worker("-c", "1")
    assert AsyncResult(enqueued.id).get(timeout=30) == "noisy"
    assert ht.noisy.delay().get(timeout=30) == "noisy"
    wait_for(lambda: world.logs().count("this Django signal receiver is broken") >= 4)


def test_a_retry_too_large_to_send_fails_the_task(world: E2E) -> None:
    limit = get_backend().config.max_message_size
    backend = get_backend()
    empty = len(backend.broker.encode(backend.message(ht.retries_grown, [""], {}))[1])
    result = ht.retries_grown.delay("x" * (limit - empty - 10))
    world.start_worker("-c", "1")
    stored = row(result)
    assert (stored.state, stored.exception_type) == (
        TaskState.FAILURE,
        "django_tasks.exceptions.RetryNotSent",
    )
    assert "over the limit" in stored.exception_message
    assert tasks.add.delay(1, 1).get(timeout=30) == 2


def test_a_message_nested_too_deeply_is_dead_lettered(world: E2E) -> None:
    message = raw_message(tasks.add)
    deep = "[" * 200_000 + "]" * 200_000
    body = (
        f'{{"v":1,"id":"{message.id}","task":"{message.task}","args":{deep},'
        '"kwargs":{},"queue":"default"}'
    )
    publish_raw(message, body)
    world.start_worker("-c", "1")
    wait_for(lambda: DeadLetter.objects.filter(reason__contains="nested too deeply").exists())
    assert tasks.add.delay(1, 1).get(timeout=30) == 2


def test_a_return_value_json_cannot_hold_fails_the_task_naming_its_type(world: E2E) -> None:
    result = ht.returns_object.delay()
    world.start_worker("-c", "1")
    stored = row(result)
    assert stored.state == TaskState.FAILURE
    assert "(object) is not JSON-serialisable" in stored.exception_message


def test_a_task_revoked_while_it_runs_is_not_retried(world: E2E) -> None:
    result = ht.retries_slowly.delay("revoked-retry", 1.5)
    world.start_worker("-c", "1")
    wait_for(lambda: Execution.objects.filter(marker="revoked-retry").exists())
    result.revoke()
    forget_redis_revoke_mark(world, result.id)
    # A retry would wait a minute in the queue.
    wait_for(queue_empty, timeout=30, what="the revoked task's message gone")
    assert row(result).state == TaskState.REVOKED
    assert Execution.objects.filter(marker="revoked-retry").count() == 1


def test_a_revoked_row_is_honoured_without_the_brokers_mark(world: E2E) -> None:
    result = tasks.add.delay(1, 2)
    # As if the broker lost its mark (a Redis restart or failover): only the row says so.
    ResultStore().revoke(result.id, reason="revoked", task_name=tasks.add.name)
    world.start_worker("-c", "1")
    wait_for(queue_empty, timeout=30, what="the revoked task's message gone")
    assert row(result).state == TaskState.REVOKED
    assert tasks.add.delay(2, 2).get(timeout=30) == 4


def forget_redis_revoke_mark(world: E2E, task_id: str) -> None:
    """Remove the Redis broker's revoke mark of ``task_id``, as a Redis restart would."""
    if world.kind != "redis":
        return
    broker = get_backend().broker
    key = queue_keys(broker.config.key_prefix, "default").revoked
    broker.client.zrem(key, task_id)  # type: ignore[attr-defined]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"countdown": float("nan")}, "countdown must be a finite number"),
        ({"countdown": float("inf")}, "countdown must be a finite number"),
        ({"expires": float("nan")}, "expires must be a finite number"),
        ({"countdown": 10**12}, "under 100 years"),
        ({"task_id": ""}, "task_id must be a non-empty string"),
        ({"task_id": 42}, "task_id must be a non-empty string"),
        ({"headers": ["a"]}, "headers must be a dict"),
        ({"headers": {1: "a"}}, "headers must be a dict with string keys"),
        ({"headers": {"time_limit": "soon"}}, "headers may not set time_limit"),
        ({"time_limit": float("nan")}, "time_limit must be a finite number"),
        ({"soft_time_limit": -1}, "soft_time_limit must be a positive number"),
        ({"on_commit": "yes"}, "on_commit must be True, False or None"),
        ({"queue": 7}, "queue must be a queue name"),
        ({"args": "ab"}, "args must be a list or a tuple"),
        ({"kwargs": {1: 2}}, "kwargs must be a dict with string keys"),
    ],
)
def test_apply_async_options_are_validated_when_called(options: dict[str, Any], error: str) -> None:
    call = {"args": (1, 2), **options}
    with pytest.raises(InvalidTask, match=error):
        tasks.add.apply_async(**call)
    assert get_backend().broker.queue_lengths(["default"]) == {"default": 0}
