"""The retry schedule: backoff, its cap and jitter, retry(countdown=/eta=), max_retries=None.

Task.retry_delay() is checked on its own; the Executor runs one delivery in this process to show
when the worker schedules the next attempt; real workers show that a broker holds the attempt
until then, and that a task without a retry limit is retried until it succeeds.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest

from django_tasks import Task
from django_tasks.backend import get_backend
from django_tasks.brokers import Delivery
from django_tasks.messages import Message, new_id
from django_tasks.models import TaskResult
from django_tasks.states import TaskState
from django_tasks.worker.execution import Executor, Outcome
from tests.conftest import E2E
from tests.testapp import reliability_tasks as rt
from tests.testapp import tasks


def with_backoff(**options: Any) -> Task:
    """rt.autoretried with other retry options (the same function: registered only once)."""
    return dataclasses.replace(rt.autoretried, **options)


def test_backoff_doubles_from_its_base_up_to_the_cap() -> None:
    task = with_backoff(retry_backoff=2, retry_backoff_max=10, retry_jitter=False)
    assert [task.retry_delay(n) for n in range(6)] == [2, 4, 8, 10, 10, 10]


def test_backoff_true_starts_at_one_second_and_stops_at_ten_minutes() -> None:
    task = with_backoff(retry_backoff=True, retry_backoff_max=600.0, retry_jitter=False)
    assert [task.retry_delay(n) for n in range(4)] == [1, 2, 4, 8]
    assert task.retry_delay(30) == 600


def test_without_backoff_every_retry_waits_the_default_delay() -> None:
    task = with_backoff(retry_backoff=False, default_retry_delay=7)
    assert {task.retry_delay(n) for n in range(5)} == {7}


@pytest.mark.parametrize(("retries", "ceiling"), [(0, 2), (2, 8), (5, 10)])
def test_jitter_spreads_the_delay_between_zero_and_the_backoff(
    retries: int, ceiling: float
) -> None:
    assert tasks.add.retry_jitter  # On unless a task turns it off.
    task = with_backoff(retry_backoff=2, retry_backoff_max=10, retry_jitter=True)
    delays = [task.retry_delay(retries) for _ in range(500)]
    assert all(0 <= delay <= ceiling for delay in delays)
    # Spread over the whole range: 500 draws all missing a tenth of it are about 1e-23 likely.
    assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling


def run_once(task: Task, retries: int = 0, **kwargs: Any) -> Outcome:
    """Run one delivery of ``task`` here, as a worker's consumer would; return its outcome."""
    message = Message(id=new_id(), task=task.name, kwargs=kwargs, retries=retries)
    delivery = Delivery("tag-1", "default", "", message)
    return Executor(get_backend(), "test-0").execute(delivery)


def assert_retry_due(outcome: Outcome, retries: int, earliest: float, latest: float) -> None:
    """Assert that ``outcome`` is the next attempt of its task, due between the two times."""
    assert outcome.state == TaskState.RETRY and outcome.retry is not None
    following, eta = outcome.retry
    assert following.id == outcome.delivery.message.id
    assert (following.retries, following.eta) == (retries + 1, eta)
    # A millisecond of slack: an eta= passes through a datetime (microseconds).
    assert earliest - 0.001 <= eta <= latest + 0.001


@pytest.mark.django_db
@pytest.mark.parametrize(("retries", "delay"), [(0, 0.05), (1, 0.1), (2, 0.1), (50, 0.1)])
def test_the_worker_schedules_an_automatic_retry_after_the_backoff(
    retries: int, delay: float
) -> None:
    """Backoff 0.05 s capped at 0.1 s, no jitter, max_retries=None (the 51st retry too)."""
    before = time.time()
    outcome = run_once(rt.succeeds_after_failures, retries, marker="backoff", failures=100)
    assert_retry_due(outcome, retries, before + delay, time.time() + delay)


@pytest.mark.django_db  # The worker reads whether the task was revoked before it retries.
@pytest.mark.parametrize(
    ("options", "delay"),
    # An "eta" here is in seconds from now; the task is given it as a Unix time.
    [({"countdown": 7}, 7), ({"eta": 30}, 30), ({"eta": -30}, 0), ({}, 42)],
    ids=["countdown", "eta", "eta-past", "default_retry_delay"],
)
def test_the_worker_schedules_retry_as_the_task_asked(
    options: dict[str, float], delay: float
) -> None:
    before = time.time()
    if "eta" in options:
        options = {"eta": before + options["eta"]}
    outcome = run_once(rt.asks_for_retry, **options)
    assert_retry_due(outcome, 0, before + delay, time.time() + delay)


@pytest.mark.django_db  # The worker reads whether the task was revoked before it retries.
def test_a_retry_carries_on_the_fields_this_worker_does_not_know() -> None:
    """A newer producer's fields ride along when an older worker sends the task again."""
    extra = {"workflow": {"step": 2}, "trace": "abc"}
    message = Message(id=new_id(), task=rt.asks_for_retry.name, kwargs={"countdown": 5},
                      extra=extra)  # fmt: skip
    outcome = Executor(get_backend(), "test-0").execute(Delivery("tag-1", "default", "", message))
    assert outcome.retry is not None
    following = outcome.retry[0]
    assert (following.retries, following.extra) == (1, extra)


@pytest.mark.e2e
def test_max_retries_none_retries_until_the_task_succeeds(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    # Five failures: more than the three retries that tasks get by default.
    result = rt.succeeds_after_failures.delay("for-ever", 5)
    assert result.get(timeout=30) == 6
    assert result.retries == 5
    assert len(TaskResult.objects.get(pk=result.id).errors) == 5


@pytest.mark.e2e
def test_a_retry_with_eta_runs_no_sooner(e2e: E2E) -> None:
    e2e.start_worker("-c", "1")
    eta = time.time() + 1.5
    result = rt.asks_for_retry.apply_async(kwargs={"eta": eta})
    ran_at = result.get(timeout=30)
    assert result.retries == 1
    assert eta <= ran_at < eta + 15
