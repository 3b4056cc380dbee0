"""Tasks used by the test suite; workers started by the tests discover them."""

from __future__ import annotations

import os
import time
from typing import Any

from django.db import InterfaceError, OperationalError, connection, transaction
from django.tasks import TaskContext
from django.tasks import task as django_task

from django_tasks import task


@task
def add(x: int, y: int) -> int:
    return x + y


@task(name="custom-name", queue="hipri", priority=5)
def named() -> str:
    return "named"


@task
def routed() -> str:
    return "routed"


@task(bind=True)
def whoami(self: Any) -> dict[str, Any]:
    return {"id": self.request.id, "task": self.request.task, "retries": self.request.retries}


class CustomError(Exception):
    pass


@task
def fail(message: str = "boom") -> None:
    raise CustomError(message)


@task
def fail_value(message: str) -> None:
    raise ValueError(message)


@task
def returns_unserialisable() -> object:
    return object()


@task(ignore_result=True)
def fire_and_forget(marker: str) -> None:
    record(marker)


@task
def record(marker: str) -> int:
    """Record one execution of ``marker`` in the database; return how many there are now."""
    from tests.testapp.models import Execution

    Execution.objects.create(marker=marker, pid=os.getpid())
    return Execution.objects.filter(marker=marker).count()


@task
def sleep_then_record(marker: str, seconds: float) -> str:
    time.sleep(seconds)
    record(marker)
    return marker


@task
def pid() -> int:
    return os.getpid()


@task
def vendor() -> str:
    return connection.vendor


@django_task
def django_add(x: int, y: int) -> int:
    return x + y


@django_task(takes_context=True)
def django_attempt(context: TaskContext, value: str) -> dict[str, Any]:
    return {"attempt": context.attempt, "id": context.task_result.id, "value": value}


@django_task(priority=10, queue_name="hipri")
def django_failing() -> None:
    raise CustomError("django failure")


@task
def slow_once(marker: str, seconds: float = 60) -> str:
    """Record the first attempt, then sleep; any later attempt returns at once."""
    from tests.testapp.models import Execution

    first = not Execution.objects.filter(marker=marker).exists()
    record(marker)
    if first:
        time.sleep(seconds)
    return "done"


@task
def observed() -> str:
    return "seen"


@task
def observed_failure() -> None:
    raise CustomError("observed")


# Appended for tests/test_faults.py (the lines above stay as they were).


@task(
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=0.5,
    retry_backoff_max=2.0,
    retry_jitter=False,
    max_retries=None,
)
def record_through_outages(marker: str, seconds: float = 0.0) -> int:
    """record(), then sleep ``seconds`` after the first execution only (a task in flight).

    Written as a task that must survive a restart of its own database is: a database error
    retries it, and its writes are one transaction, so that an attempt cut off between its
    INSERT and its last query leaves nothing behind for the retry to count twice.
    tests/test_faults.py counts its executions while PostgreSQL restarts under it.
    """
    from tests.testapp.models import Execution

    with transaction.atomic():
        first = not Execution.objects.filter(marker=marker).exists()
        count = record(marker)
    if first:
        time.sleep(seconds)
    return count


@task
async def async_add(x: int, y: int) -> int:
    return x + y


@task
def tenant(**kwargs: Any) -> str | None:
    """The tenant the code runs for, as TenantMiddleware (tests/testapp/middleware.py) sets it."""
    from tests.testapp.middleware import current_tenant

    return current_tenant.get()


@task(autoretry_for=(CustomError,), max_retries=1, default_retry_delay=30)
def retried_once() -> None:
    raise CustomError("again")
