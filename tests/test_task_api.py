"""The calling API: what delay()/apply_async()/enqueue() put in the queue, and what they refuse."""

from __future__ import annotations

import copy
import dataclasses
import time
import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.db import transaction
from django.tasks import TaskResultStatus, default_task_backend
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.test import override_settings

from django_tasks import AsyncResult, Task, TaskState, task
from django_tasks.backend import get_backend
from django_tasks.exceptions import EncodeError, MessageTooLarge
from django_tasks.messages import Message
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def queued(task_id: str) -> Message:
    message = get_backend().broker.find(task_id, ["default", "hipri", "lopri"])
    assert message is not None, f"{task_id} is not queued"
    return message


def test_direct_call_runs_inline() -> None:
    assert tasks.add(2, 2) == 4
    assert tasks.whoami()["id"] is None


def test_names_default_to_the_dotted_path() -> None:
    assert tasks.add.name == "tests.testapp.tasks.add"
    assert tasks.named.name == "custom-name"
    assert tasks.django_add.name == "tests.testapp.tasks.django_add"


def test_delay_queues_a_message_and_returns_a_pending_result() -> None:
    result = tasks.add.delay(2, 3)
    assert isinstance(result, AsyncResult)
    assert result.state == TaskState.PENDING == result.status
    assert not result.ready()
    message = queued(result.id)
    assert (message.task, message.args, message.kwargs) == ("tests.testapp.tasks.add", [2, 3], {})
    assert (message.queue, message.priority, message.eta) == ("default", 0, None)


def test_apply_async_options() -> None:
    before = time.time()
    result = tasks.add.apply_async(
        args=(1,),
        kwargs={"y": 2},
        countdown=30,
        expires=60,
        queue="lopri",
        priority=7,
        task_id="my-id",
    )
    assert result.id == "my-id"
    message = queued("my-id")
    assert message.queue == "lopri" and message.priority == 7
    assert message.kwargs == {"y": 2}
    assert before + 30 <= message.eta <= time.time() + 30
    assert before + 60 <= message.expires <= time.time() + 60


def test_naive_eta_is_read_in_time_zone() -> None:
    result = tasks.add.apply_async((1, 1), eta=datetime(2030, 1, 1, 12, 0))
    paris = datetime(2030, 1, 1, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    assert queued(result.id).eta == paris.timestamp()
    aware = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert queued(tasks.add.apply_async((1, 1), eta=aware).id).eta == aware.timestamp()


def test_routes_and_explicit_queue() -> None:
    assert queued(tasks.routed.delay().id).queue == "hipri"
    assert queued(tasks.routed.apply_async(queue="lopri").id).queue == "lopri"
    assert queued(tasks.named.delay().id).priority == 5


def test_delay_sends_the_message_apply_async_sends(backend: Any) -> None:
    """delay() has a path of its own (its route worked out once per task): same message."""
    for each, args in ((tasks.add, (1, 2)), (tasks.routed, ()), (tasks.named, ())):
        sent = [each.delay(*args).id, each.apply_async(args).id, each.delay_many([args])[0].id]
        found = [backend.broker.find(task_id, ["default", "hipri", "lopri"]) for task_id in sent]
        assert [m.id for m in found] == sent
        plain = [dataclasses.replace(m, id="", enqueued_at=0) for m in found]
        assert plain[0] == plain[1] == plain[2]
    assert (plain[0].task, plain[0].priority) == ("custom-name", 5)


def test_delay_follows_routes_and_queues_changed_in_settings() -> None:
    assert queued(tasks.add.delay().id).queue == "default"
    setting = settings_with_routes({"tests.testapp.tasks.add": {"queue": "lopri", "priority": 3}})
    with override_settings(TASKS=setting):
        message = queued(tasks.add.delay().id)
        assert (message.queue, message.priority) == ("lopri", 3)
    with (
        override_settings(TASKS=settings_with_routes({}, queues=["hipri"])),
        pytest.raises(InvalidTask, match="Queue 'default' is not in"),
    ):
        tasks.add.delay()
    assert queued(tasks.add.delay().id).queue == "default"


def settings_with_routes(routes: dict[str, Any], queues: list[str] | None = None) -> dict:
    tasks_setting = copy.deepcopy(django_settings.TASKS)
    tasks_setting["default"]["OPTIONS"]["ROUTES"] = routes
    if queues is not None:
        tasks_setting["default"]["QUEUES"] = queues
    return tasks_setting


def test_delay_of_a_task_with_run_after_is_delayed() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    assert queued(tasks.add.using(run_after=later).delay(1, 2).id).eta == later.timestamp()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CountingTask(Task):
    """A Task subclass that overrides apply_async(), as Celery projects do for their base task."""

    calls: list[tuple[Any, ...]] = dataclasses.field(default_factory=list, compare=False)

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> AsyncResult:
        self.calls.append((args, kwargs))
        return Task.apply_async(self, args, kwargs, **options)


def test_delay_goes_through_an_overridden_apply_async() -> None:
    counting = CountingTask(func=tasks.add.func, name="tests.counting-add")
    result = counting.delay(1, y=2)
    assert counting.calls == [((1,), {"y": 2})]
    assert (queued(result.id).args, queued(result.id).kwargs) == ([1], {"y": 2})


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"queue": "nope"}, "Queue 'nope' is not in"),
        ({"priority": 101}, "priority must be between -100 and 100"),
        ({"priority": 1.5}, "priority must be a whole number"),
        ({"countdown": 1, "eta": datetime(2030, 1, 1, tzinfo=UTC)}, "either countdown or eta"),
        ({"countdown": "soon"}, "countdown must be seconds"),
        ({"expires": "later"}, "expires must be"),
    ],
)
def test_bad_options_are_refused_at_call_time(options: dict, error: str) -> None:
    with pytest.raises(InvalidTask, match=error):
        tasks.add.apply_async((1, 2), **options)
    assert get_backend().broker.queue_lengths(["default", "hipri", "lopri"]) == {
        "default": 0,
        "hipri": 0,
        "lopri": 0,
    }


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        tasks.add.apply_async((1, 2), retry_policy={})  # type: ignore[call-arg]


def test_unserialisable_arguments_fail_at_delay() -> None:
    with pytest.raises(EncodeError, match="not JSON-serialisable") as info:
        tasks.add.delay(object(), 1)
    assert isinstance(info.value, TypeError)
    with pytest.raises(EncodeError):
        tasks.add.delay(float("nan"), 1)


def test_oversize_message_fails_at_delay() -> None:
    with pytest.raises(MessageTooLarge, match="over the limit of 1000000 bytes"):
        tasks.add.delay("x" * 1_000_001, "")


def test_priority_and_queue_on_the_decorator_are_validated() -> None:
    with pytest.raises(InvalidTask):
        task(priority=500)(tasks.add.func)
    with pytest.raises(InvalidTask, match="bind=True"):

        def nothing() -> None: ...

        task(bind=True)(nothing)


def test_django_enqueue_and_get_result_while_queued() -> None:
    result = tasks.django_add.enqueue(1, 2)
    assert result.status == TaskResultStatus.READY
    assert result.args == [1, 2]
    assert result.backend == "default"
    assert result.enqueued_at is not None
    fetched = default_task_backend.get_result(result.id)
    assert fetched.status == TaskResultStatus.READY
    assert fetched.task.func is tasks.django_add.func
    assert tasks.django_add.get_result(result.id).id == result.id
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result("no-such-id")


def test_using_changes_priority_queue_and_run_after() -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    result = tasks.django_add.using(priority=9, queue_name="hipri", run_after=later).enqueue(1, 1)
    message = queued(result.id)
    assert (message.queue, message.priority, message.eta) == ("hipri", 9, later.timestamp())


def test_our_tasks_enqueue_through_django_api_too() -> None:
    result = tasks.add.enqueue(5, 5)
    assert queued(result.id).task == "tests.testapp.tasks.add"


def test_unknown_id_reads_pending() -> None:
    result = AsyncResult("never-sent")
    assert result.state == TaskState.PENDING
    assert result.result is None
    assert result.traceback is None


def test_rollback_discards_the_task() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        task_id = tasks.add.delay(1, 1).id
        raise RuntimeError("roll back")
    assert get_backend().broker.find(task_id, ["default"]) is None


@override_settings(TASKS={})
def test_without_our_backend_in_tasks_the_database_broker_is_used() -> None:
    backend = get_backend()
    assert backend.config.broker_kind == "database"
    result = tasks.add.delay(1, 1)
    assert backend.broker.find(result.id, ["default"]) is not None


def test_delay_many_queues_every_call_in_order() -> None:
    results = tasks.add.delay_many([(1, 2), (3, 4), [5, 6]])
    assert len({r.id for r in results}) == 3
    messages = [queued(r.id) for r in results]
    assert [m.args for m in messages] == [[1, 2], [3, 4], [5, 6]]
    later = tasks.add.apply_many([((1,), {"y": 2})], queue="lopri", countdown=60)
    message = queued(later[0].id)
    assert (message.queue, message.kwargs) == ("lopri", {"y": 2})
    assert message.eta is not None


def test_delay_many_sends_all_or_none() -> None:
    with pytest.raises(EncodeError):
        tasks.add.delay_many([(1, 2), (object(), 1)])
    assert get_backend().broker.queue_lengths(["default"]) == {"default": 0}
    with pytest.raises(InvalidTask):
        tasks.add.apply_many([((1, 2), {})], task_id="x")
    with pytest.raises(TypeError):
        tasks.add.apply_many([((1, 2), {})], retry_policy={})
