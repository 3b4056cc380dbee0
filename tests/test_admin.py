"""The admin: results read-only with filters, dead letters with a requeue action, permissions."""

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
