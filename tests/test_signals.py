"""Signals: Django's task_enqueued/started/finished and ours around execution in the worker."""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.tasks import TaskResultStatus
from django.tasks.signals import task_enqueued

from tests.conftest import E2E
from tests.testapp import reliability_tasks as rt
from tests.testapp import tasks
from tests.testapp.models import Execution
from tests.workers import wait_for


@pytest.mark.django_db(transaction=True)
def test_enqueue_sends_task_enqueued() -> None:
    seen: list[Any] = []

    def receiver(sender: Any, task_result: Any, **kwargs: Any) -> None:
        seen.append(task_result)

    task_enqueued.connect(receiver)
    try:
        result = tasks.django_add.enqueue(1, 2)
    finally:
        task_enqueued.disconnect(receiver)
    assert [r.id for r in seen] == [result.id]
    assert seen[0].status == TaskResultStatus.READY


def markers(task_id: str) -> set[str]:
    names = Execution.objects.filter(marker__endswith=f":{task_id}").values_list(
        "marker", flat=True
    )
    return {name.split(":", 1)[0] for name in names}


@pytest.mark.e2e
def test_worker_sends_signals_around_execution(e2e_sqlite: E2E) -> None:
    e2e = e2e_sqlite
    e2e.start_worker("-c", "1")
    ok = tasks.observed.delay()
    assert ok.get(timeout=20) == "seen"  # a failing receiver does not break the task
    wait_for(lambda: "postrun" in markers(ok.id))
    assert markers(ok.id) == {"started", "prerun", "success", "finished-SUCCESSFUL", "postrun"}

    bad = tasks.observed_failure.delay()
    bad.get(timeout=20, propagate=False)
    wait_for(lambda: "postrun" in markers(bad.id))
    assert markers(bad.id) == {"started", "prerun", "failure", "finished-FAILED", "postrun"}
    assert "this receiver is broken" in e2e.workers[0].log()


@pytest.mark.e2e
def test_retry_and_revoked_signals(e2e_sqlite: E2E) -> None:
    expired = tasks.observed.apply_async(expires=0.2)
    deadline = time.time() + 0.2
    wait_for(lambda: time.time() > deadline)
    e2e_sqlite.start_worker("-c", "1")
    retried = rt.observed_retry.delay()
    assert retried.get(timeout=20) == 1
    wait_for(lambda: "postrun" in markers(expired.id) or "revoked" in markers(expired.id))
    assert markers(expired.id) == {"revoked"}
    assert {"retry", "success"} <= markers(retried.id)
