"""Middleware: the project's hooks around sending and running tasks, in the documented order."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from django_tasks import TaskState
from django_tasks.backend import get_backend
from django_tasks.brokers import Delivery
from django_tasks.messages import Message, decode, new_id
from django_tasks.models import QueuedMessage, TaskResult
from django_tasks.worker.execution import Executor, Outcome
from tests.conftest import E2E, tasks_setting
from tests.testapp import middleware, tasks

RECORDERS = ["tests.testapp.middleware.Recorder", "tests.testapp.middleware.SecondRecorder"]


@pytest.fixture
def recorded(settings: Any) -> list[tuple[str, str, Any]]:
    settings.TASKS = tasks_setting({"MIDDLEWARE": RECORDERS})
    middleware.calls.clear()
    return middleware.calls


def execute(task: Any, *args: Any, retries: int = 0, **kwargs: Any) -> Outcome:
    """Run one call of ``task`` through a worker's executor, in this process."""
    message = Message(id=new_id(), task=task.name, args=list(args), kwargs=kwargs,
                      retries=retries)  # fmt: skip
    delivery = Delivery(tag=message.id, queue="default", body="", message=message)
    return Executor(get_backend(), "test-worker").execute(delivery)


def hooks(calls: list[tuple[str, str, Any]], name: str = "recorder") -> list[tuple[str, Any]]:
    return [(hook, seen) for who, hook, seen in calls if who == name]


@pytest.mark.django_db
def test_hooks_run_in_order_and_unwind_in_reverse(recorded: list[tuple[str, str, Any]]) -> None:
    outcome = execute(tasks.add, 2, 3)
    assert outcome.state == TaskState.SUCCESS
    assert [(who, hook) for who, hook, _ in recorded] == [
        ("recorder", "before_execute"),
        ("second", "before_execute"),
        ("second", "after_execute"),
        ("recorder", "after_execute"),
        ("recorder", "on_success"),
        ("second", "on_success"),
    ]
    assert hooks(recorded) == [
        ("before_execute", TaskState.STARTED),
        ("after_execute", TaskState.SUCCESS),
        ("on_success", 5),
    ]


@pytest.mark.django_db
def test_after_execute_sees_a_failure_that_will_be_retried_as_a_retry(
    recorded: list[tuple[str, str, Any]],
) -> None:
    first = execute(tasks.retried_once)
    assert first.state == TaskState.RETRY and first.retry is not None
    assert hooks(recorded)[1:] == [("after_execute", TaskState.RETRY), ("on_retry", True)]
    recorded.clear()
    last = execute(tasks.retried_once, retries=1)  # Its one retry was used.
    assert last.state == TaskState.FAILURE and last.retry is None
    assert hooks(recorded)[1:] == [
        ("after_execute", TaskState.FAILURE),
        ("on_failure", "CustomError"),
    ]


@pytest.mark.django_db
def test_a_middleware_may_skip_a_task(settings: Any) -> None:
    settings.TASKS = tasks_setting({"MIDDLEWARE": ["tests.testapp.middleware.Maintenance",
                                                   *RECORDERS]})  # fmt: skip
    middleware.calls.clear()
    outcome = execute(tasks.tenant, skip_me=True)
    assert outcome.state == TaskState.REVOKED
    assert outcome.row is not None and outcome.row.reason == "maintenance"
    # Nothing after the skipping middleware began: no before_execute, no after_execute.
    assert [hook for _, hook, _ in middleware.calls] == ["on_skip", "on_skip"]
    assert hooks(middleware.calls) == [("on_skip", "maintenance")]
    assert execute(tasks.tenant).state == TaskState.SUCCESS


@pytest.mark.django_db
def test_a_failing_hook_is_logged_and_the_task_runs_all_the_same(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.TASKS = tasks_setting({"MIDDLEWARE": ["tests.testapp.middleware.Broken"]})
    with caplog.at_level(logging.ERROR, "django_tasks.middleware"):
        outcome = execute(tasks.add, 1, 1)
        result = tasks.add.delay(4, 4)
    assert outcome.state == TaskState.SUCCESS and outcome.row is not None
    assert outcome.row.result == 2
    failed = {str(r.exc_info[1]) for r in caplog.records if r.exc_info}
    assert failed == {"broken before_enqueue", "broken before_execute", "broken after_execute",
                      "broken on_success"}  # fmt: skip
    assert QueuedMessage.objects.filter(task_id=result.id).exists()


@pytest.mark.django_db
def test_enqueue_hooks_see_each_message_and_may_add_headers(settings: Any) -> None:
    settings.TASKS = tasks_setting({"MIDDLEWARE": ["tests.testapp.middleware.TenantMiddleware",
                                                   RECORDERS[0]]})  # fmt: skip
    middleware.calls.clear()
    token = middleware.current_tenant.set("acme")
    try:
        sent = [tasks.add.delay(1, 2), tasks.add.apply_async((3, 4), countdown=60)]
        sent += tasks.add.delay_many([(5, 6)])
    finally:
        middleware.current_tenant.reset(token)
    plain = tasks.add.delay(7, 8)
    for result in sent:
        body = QueuedMessage.objects.get(task_id=result.id).body
        assert decode(body).headers == {"tenant": "acme"}
    assert decode(QueuedMessage.objects.get(task_id=plain.id).body).headers == {}
    assert [hook for _, hook, _ in middleware.calls] == ["before_enqueue", "after_enqueue"] * 4


def test_a_middleware_that_cannot_be_imported_is_a_check_error(settings: Any) -> None:
    settings.TASKS = tasks_setting({"MIDDLEWARE": ["tests.testapp.middleware.Nowhere",
                                                   "tests.testapp.tasks.add"]})  # fmt: skip
    errors = get_backend().check()
    assert [e.id for e in errors] == ["django_tasks.E005", "django_tasks.E005"]
    assert "Nowhere" in errors[0].msg and "not a subclass" in errors[1].msg


@pytest.mark.e2e
def test_a_tenant_travels_with_its_tasks_to_a_worker(e2e: E2E, settings: Any) -> None:
    e2e.options["MIDDLEWARE"] = ["tests.testapp.middleware.TenantMiddleware", RECORDERS[0]]
    settings.TASKS = tasks_setting(e2e.options)
    e2e.start_worker("-c", "1")
    token = middleware.current_tenant.set("acme")
    try:
        for_acme = tasks.tenant.delay()
    finally:
        middleware.current_tenant.reset(token)
    for_nobody = tasks.tenant.delay()
    assert for_acme.get(timeout=20) == "acme"
    assert for_nobody.get(timeout=20) is None
    assert "Middleware" not in e2e.workers[0].log()  # No hook failed.


@pytest.mark.django_db(transaction=True)
def test_after_ack_sees_each_batch_once_it_is_stored_and_acknowledged(
    recorded: list[tuple[str, str, Any]],
) -> None:
    from django_tasks.worker.consumer import Consumer

    sent = [r.id for r in tasks.add.delay_many([(i, 1) for i in range(20)])]

    def stored_and_acked(task_ids: list[str]) -> bool:
        done = TaskResult.objects.filter(pk__in=task_ids, state=TaskState.SUCCESS).count()
        return (
            done == len(task_ids)
            and not QueuedMessage.objects.filter(task_id__in=task_ids).exists()
        )

    seen: list[str] = []
    original = middleware.Recorder.after_ack

    def checking(self: Any, runs: Any) -> None:
        ids = [run.message.id for run in runs]
        assert stored_and_acked(ids)
        if self.name == "recorder":  # SecondRecorder inherits this hook.
            seen.extend(ids)
        original(self, runs)

    middleware.Recorder.after_ack = checking  # type: ignore[method-assign]
    try:
        Consumer(get_backend(), ["default"], "test-0", burst=True).run()
    finally:
        middleware.Recorder.after_ack = original  # type: ignore[method-assign]
    assert sorted(seen) == sorted(sent)
