"""The outbox: tasks sent inside atomic() with the Redis broker survive Redis being down at commit.

Real Redis and real databases: the project's data on SQLite ("default") or PostgreSQL
("postgres"); "down" is a broker URL on a port nothing listens on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.db import connections, transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_tasks import AsyncResult, outbox
from django_tasks.backend import get_backend
from django_tasks.models import DeadLetter, OutboxMessage
from tests.conftest import E2E, tasks_setting
from tests.testapp import tasks
from tests.testapp.models import Execution

DOWN = "redis://127.0.0.1:1/0"


class Records(logging.Handler):
    """Keeps the records it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == logging.ERROR]


@pytest.fixture
def outbox_log() -> Iterator[Records]:
    """The records of the django_tasks.outbox logger."""
    handler = Records()
    logger = logging.getLogger("django_tasks.outbox")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def redis_down(settings) -> None:
    settings.TASKS = tasks_setting({"BROKER_URL": DOWN, "CONNECT_TIMEOUT": 1})


def redis_up(settings, redis_url: str) -> None:
    settings.TASKS = tasks_setting({"BROKER_URL": redis_url})


def rows(using: str) -> list[OutboxMessage]:
    return list(OutboxMessage.objects.using(using).all())


def make_due(using: str) -> None:
    """Age the rows past the grace period, as if their sender had died long ago."""
    earlier = timezone.now() - outbox.GRACE - timedelta(seconds=1)
    OutboxMessage.objects.using(using).update(created_at=earlier)


def queued(task_id: str) -> bool:
    return get_backend().broker.find(task_id, ["default"]) is not None


@pytest.mark.e2e
def test_redis_down_at_commit_keeps_the_task_for_a_worker(
    using: str, settings, redis_url: str, outbox_log, tmp_path: Path
) -> None:
    redis_down(settings)
    later: list[str] = []
    with transaction.atomic(using=using):
        Execution.objects.using(using).create(marker="data", pid=0)
        result = tasks.record.delay("from-outbox")
        transaction.on_commit(lambda: later.append("ran"), using=using)

    assert Execution.objects.using(using).filter(marker="data").exists()
    assert later == ["ran"]
    [error] = outbox_log.errors()
    assert result.id in error and "cannot be reached" in error
    [row] = rows(using)
    assert (row.task_id, row.task_name, row.queue) == (result.id, "tests.testapp.tasks.record",
                                                       "default")  # fmt: skip
    assert row.attempts == 1 and "cannot be reached" in row.last_error

    redis_up(settings, redis_url)
    make_due(using)
    world = E2E("redis", {"BROKER_URL": redis_url}, tmp_path)
    worker = world.start_worker("-c", "1")
    try:
        assert AsyncResult(result.id).get(timeout=30) == 1
        assert rows(using) == []
        assert "Published 1 message(s) left in the outbox" in worker.log()
    finally:
        worker.stop()


@pytest.mark.e2e
def test_commit_with_redis_up_runs_the_task_once_and_leaves_no_row(
    using: str, settings, redis_url: str, tmp_path: Path
) -> None:
    redis_up(settings, redis_url)
    world = E2E("redis", {"BROKER_URL": redis_url}, tmp_path)
    worker = world.start_worker("-c", "1")
    try:
        with transaction.atomic(using=using):
            result = tasks.record.delay("once")
            assert len(rows(using)) == 1  # Written in the transaction...
            assert not queued(result.id)  # ...and published only after the commit.
        assert rows(using) == []
        assert result.get(timeout=30) == 1
        worker.stop()
        assert Execution.objects.filter(marker="once").count() == 1
        assert get_backend().broker.queue_lengths(["default"]) == {"default": 0}
    finally:
        worker.stop()


def test_rollback_leaves_no_row_and_no_message(using: str, settings, redis_url: str) -> None:
    redis_up(settings, redis_url)
    with pytest.raises(RuntimeError), transaction.atomic(using=using):
        result = tasks.record.delay("rolled-back")
        raise RuntimeError("roll back")
    assert rows(using) == []
    assert not queued(result.id)


def test_delay_outside_a_transaction_makes_no_query(
    settings, redis_url: str, django_assert_num_queries, transactional_db
) -> None:
    redis_up(settings, redis_url)
    with django_assert_num_queries(0):
        result = tasks.record.delay("direct")
    assert queued(result.id)


def test_a_batch_waits_in_the_outbox_until_the_grace_period_ends(
    using: str, settings, redis_url: str, outbox_log
) -> None:
    redis_down(settings)
    with transaction.atomic(using=using):
        results = tasks.add.delay_many([(1, 2), (3, 4)])
    assert sorted(row.task_id for row in rows(using)) == sorted(r.id for r in results)
    [error] = outbox_log.errors()
    assert all(r.id in error for r in results)

    redis_up(settings, redis_url)
    broker = get_backend().broker
    assert outbox.sweep(broker, "default") == 0  # Too recent: the sender may still publish.
    make_due(using)
    assert outbox.sweep(broker, "other-backend") == 0
    assert outbox.sweep(broker, "default") == 2
    assert all(queued(r.id) for r in results)
    assert rows(using) == []


@pytest.mark.skipif("postgres" not in django_settings.DATABASES, reason="no PostgreSQL")
@pytest.mark.django_db(databases=["default", "postgres"], transaction=True)
def test_the_sweep_skips_rows_another_worker_holds(settings, redis_url: str) -> None:
    using = "postgres"
    redis_down(settings)
    with transaction.atomic(using=using):
        result = tasks.add.delay(1, 1)
    make_due(using)
    redis_up(settings, redis_url)
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with transaction.atomic(using=using):
            list(OutboxMessage.objects.using(using).select_for_update())
            locked.set()
            release.wait(30)
        connections[using].close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(30)
        assert outbox.sweep(get_backend().broker, "default") == 0
        assert not queued(result.id)
    finally:
        release.set()
        holder.join(30)
    assert outbox.sweep(get_backend().broker, "default") == 1
    assert queued(result.id)


@pytest.mark.django_db(transaction=True)
def test_a_row_that_does_not_decode_is_dead_lettered(settings, redis_url: str) -> None:
    redis_down(settings)
    with transaction.atomic():
        good = tasks.add.delay(1, 1)
    OutboxMessage.objects.create(backend="default", task_id="bad", task_name="?", queue="default",
                                 body="{oops")  # fmt: skip
    make_due("default")
    redis_up(settings, redis_url)
    assert outbox.sweep(get_backend().broker, "default") == 2
    assert queued(good.id)
    [letter] = DeadLetter.objects.all()
    assert (letter.task_id, letter.body) == ("bad", "{oops")
    assert "not valid JSON" in letter.reason
    assert rows("default") == []


@pytest.mark.django_db(transaction=True)
def test_the_admin_publishes_now_with_the_change_permission(settings, redis_url: str) -> None:
    redis_down(settings)
    with transaction.atomic():
        result = tasks.add.delay(2, 3)
    [row] = rows("default")
    url = reverse("admin:django_tasks_outboxmessage_changelist")
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client = Client()
    client.force_login(user)
    page = client.get(url).content.decode()
    assert result.id in page and "publish_now" not in page

    user.user_permissions.add(Permission.objects.get(codename="change_outboxmessage"))
    redis_up(settings, redis_url)
    response = client.post(url, {"action": "publish_now", "_selected_action": [row.pk]},
                           follow=True)  # fmt: skip
    assert "1 message published." in response.content.decode()
    assert queued(result.id)
    assert rows("default") == []


class NoTasksOnPostgres:
    """A router that keeps django_tasks' tables out of the "postgres" database."""

    def allow_migrate(self, db: str, app_label: str, **hints: object) -> bool | None:
        return False if app_label == "django_tasks" and db == "postgres" else None


@pytest.mark.skipif("postgres" not in django_settings.DATABASES, reason="no PostgreSQL")
@pytest.mark.django_db(databases=["default", "postgres"], transaction=True)
def test_a_database_without_the_outbox_keeps_failed_tasks_in_the_routed_one(
    settings, outbox_log
) -> None:
    settings.DATABASE_ROUTERS = [f"{__name__}.NoTasksOnPostgres"]
    redis_down(settings)
    with transaction.atomic(using="postgres"):
        result = tasks.add.delay(1, 1)
        assert rows("postgres") == rows("default") == []  # No row in this transaction.
    [row] = rows("default")
    assert (row.task_id, row.attempts) == (result.id, 1)
    assert rows("postgres") == []
    [error] = outbox_log.errors()
    assert result.id in error and "'default'" in error
