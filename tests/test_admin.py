"""The admin: results (filters, revoke, retry), dead letters (requeue), workers, permissions."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_tasks.backend import get_backend
from django_tasks.messages import Message, encode, new_id
from django_tasks.models import DeadLetter, TaskResult, Worker
from django_tasks.states import TaskState

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def staff_client() -> Client:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def make_result(**fields: object) -> TaskResult:
    defaults: dict[str, object] = {
        "id": new_id(),
        "task_name": "tests.testapp.tasks.add",
        "state": TaskState.SUCCESS,
        "args": [1, 2],
        "result": 3,
        "enqueued_at": timezone.now(),
        "date_done": timezone.now(),
    }
    return TaskResult.objects.create(**{**defaults, **fields})


def test_results_are_listed_filtered_and_read_only(staff_client: Client) -> None:
    ok = make_result()
    failed = make_result(state=TaskState.FAILURE, task_name="tests.testapp.tasks.fail")
    url = reverse("admin:django_tasks_taskresult_changelist")
    page = staff_client.get(url).content.decode()
    assert ok.id in page and failed.id in page
    filtered = staff_client.get(url, {"state__exact": "FAILURE"}).content.decode()
    assert failed.id in filtered and ok.id not in filtered
    by_task = staff_client.get(url, {"task_name": "tests.testapp.tasks.add"}).content.decode()
    assert ok.id in by_task and failed.id not in by_task
    assert staff_client.get(reverse("admin:django_tasks_taskresult_add")).status_code == 403
    detail = staff_client.get(reverse("admin:django_tasks_taskresult_change", args=[ok.id]))
    assert detail.status_code == 200
    assert b'name="state"' not in detail.content  # shown, not editable


def test_dead_letters_can_be_requeued(staff_client: Client) -> None:
    message = Message(id=new_id(), task="tests.testapp.tasks.add", args=[1, 1])
    letter = DeadLetter.objects.create(
        task_id=message.id, task_name=message.task, queue="default",
        reason="unknown task", body=encode(message),
    )  # fmt: skip
    broken = DeadLetter.objects.create(queue="default", reason="bad JSON", body="{oops")
    url = reverse("admin:django_tasks_deadletter_changelist")
    response = staff_client.post(
        url, {"action": "requeue", "_selected_action": [letter.pk, broken.pk]}, follow=True
    )
    text = response.content.decode()
    assert "1 message requeued." in text
    assert "Not requeued" in text
    assert get_backend().broker.find(message.id, ["default"]) == message
    assert list(DeadLetter.objects.all()) == [broken]


def test_workers_are_listed(staff_client: Client) -> None:
    Worker.objects.create(name="host:1", hostname="host", pid=1, pool="process")
    page = staff_client.get(reverse("admin:django_tasks_worker_changelist")).content.decode()
    assert "host:1" in page


def test_non_staff_users_cannot_reach_the_admin() -> None:
    user = User.objects.create_user("plain", password="pw")
    client = Client()
    client.force_login(user)
    for name in ("taskresult", "deadletter", "worker"):
        response = client.get(reverse(f"admin:django_tasks_{name}_changelist"))
        assert response.status_code == 302
        assert "/admin/login/" in response["Location"]


def test_requeue_needs_the_change_permission() -> None:
    letter = DeadLetter.objects.create(queue="default", reason="x", body="{}")
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client = Client()
    client.force_login(user)
    url = reverse("admin:django_tasks_deadletter_changelist")
    page = client.get(url)
    assert page.status_code == 200
    assert b'value="requeue"' not in page.content
    client.post(url, {"action": "requeue", "_selected_action": [letter.pk]})
    assert DeadLetter.objects.filter(pk=letter.pk).exists()


# Revoke and retry ----------------------------------------------------------------------------

RESULTS_URL = "admin:django_tasks_taskresult_changelist"


def queued_message(task_id: str, eta: float | None = None) -> Message:
    """Publish a message of ``task_id`` on the default backend's broker."""
    message = Message(id=task_id, task="tests.testapp.tasks.add", args=[1, 2], eta=eta)
    get_backend().broker.publish(message)
    return message


def test_superuser_can_revoke(staff_client: Client) -> None:
    waiting = make_result(state=TaskState.RETRY, result=None, date_done=None)
    queued_message(waiting.id, eta=timezone.now().timestamp() + 60)  # the next attempt
    done = make_result()
    response = staff_client.post(
        reverse(RESULTS_URL),
        {"action": "revoke", "_selected_action": [waiting.pk, done.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert "1 task revoked." in text
    assert "1 task had already finished" in text
    waiting.refresh_from_db()
    assert (waiting.state, waiting.reason) == (TaskState.REVOKED, "revoked")
    assert waiting.date_done is not None
    assert get_backend().broker.find(waiting.id, ["default"]) is None
    done.refresh_from_db()
    assert (done.state, done.reason) == (TaskState.SUCCESS, "")


def test_superuser_can_retry(staff_client: Client) -> None:
    failed = make_result(
        state=TaskState.FAILURE,
        args=[4, 5],
        kwargs={},
        queue="hipri",
        priority=7,
        result=None,
        exception_type="builtins.ValueError",
    )
    revoked = make_result(state=TaskState.REVOKED, args=[6], kwargs={"y": 1}, result=None)
    unknown = make_result(state=TaskState.FAILURE, task_name="tests.testapp.tasks.gone")
    done = make_result()
    response = staff_client.post(
        reverse(RESULTS_URL),
        {
            "action": "retry",
            "_selected_action": [failed.pk, revoked.pk, unknown.pk, done.pk],
        },
        follow=True,
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "2 tasks sent again." in text
    assert "1 task was not retried: only failed or revoked tasks are." in text
    assert "Not retried" in text and "tests.testapp.tasks.gone" in text
    broker = get_backend().broker
    [again] = broker.consume(["hipri"], 10, timeout=0.1)
    assert again.message is not None
    assert (again.message.task, again.message.args, again.message.kwargs) == (
        "tests.testapp.tasks.add",
        [4, 5],
        {},
    )
    assert again.message.priority == 7
    assert again.message.id not in {failed.id, revoked.id}
    [other] = broker.consume(["default"], 10, timeout=0.1)
    assert other.message is not None
    assert (other.message.args, other.message.kwargs) == ([6], {"y": 1})
    # The old results are left as they were.
    assert TaskResult.objects.get(pk=failed.pk).state == TaskState.FAILURE
    assert TaskResult.objects.count() == 4


def test_staff_with_the_change_permission_sees_the_actions() -> None:
    user = User.objects.create_user("operator", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_taskresult", "change_taskresult"])
    )
    client = Client()
    client.force_login(user)
    page = client.get(reverse(RESULTS_URL))
    assert b'value="revoke"' in page.content and b'value="retry"' in page.content


def test_revoke_and_retry_need_the_change_permission() -> None:
    waiting = make_result(state=TaskState.PENDING, result=None, date_done=None)
    queued_message(waiting.id)
    failed = make_result(state=TaskState.FAILURE, result=None)
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_taskresult"))
    client = Client()
    client.force_login(user)
    url = reverse(RESULTS_URL)
    page = client.get(url)
    assert page.status_code == 200
    assert b'value="revoke"' not in page.content
    assert b'value="retry"' not in page.content
    for action in ("revoke", "retry"):
        client.post(url, {"action": action, "_selected_action": [waiting.pk, failed.pk]})
    assert TaskResult.objects.get(pk=waiting.pk).state == TaskState.PENDING
    assert TaskResult.objects.get(pk=failed.pk).state == TaskState.FAILURE
    assert get_backend().broker.queue_lengths(["default", "hipri", "lopri"]) == {
        "default": 1,
        "hipri": 0,
        "lopri": 0,
    }


def test_non_staff_users_cannot_revoke_or_retry() -> None:
    waiting = make_result(state=TaskState.PENDING, result=None, date_done=None)
    queued_message(waiting.id)
    failed = make_result(state=TaskState.FAILURE, result=None)
    user = User.objects.create_user("plain", password="pw")
    client = Client()
    client.force_login(user)
    url = reverse(RESULTS_URL)
    for action in ("revoke", "retry"):
        response = client.post(url, {"action": action, "_selected_action": [waiting.pk, failed.pk]})
        assert response.status_code == 302
        assert "/admin/login/" in response["Location"]
    assert TaskResult.objects.get(pk=waiting.pk).state == TaskState.PENDING
    assert get_backend().broker.queue_lengths(["default", "hipri"]) == {"default": 1, "hipri": 0}
