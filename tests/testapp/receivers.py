"""Receivers that record, in the database, the signals a worker sends for the ``observed`` task."""

from __future__ import annotations

import os
from typing import Any

from django.dispatch import receiver
from django.tasks.signals import task_enqueued, task_finished, task_started

from django_tasks import signals

OBSERVED = {
    "tests.testapp.tasks.observed",
    "tests.testapp.tasks.observed_failure",
    "tests.testapp.reliability_tasks.observed_retry",
}


def _record(name: str, task_id: str) -> None:
    from tests.testapp.models import Execution

    Execution.objects.create(marker=f"{name}:{task_id}", pid=os.getpid())


@receiver(task_started)
@receiver(task_finished)
def on_django_signal(sender: Any, task_result: Any, signal: Any, **kwargs: Any) -> None:
    if task_result.task.name in OBSERVED:
        name = "started" if signal is task_started else f"finished-{task_result.status}"
        _record(name, task_result.id)


def _ours(name: str) -> Any:
    def handler(sender: Any, task_id: str, **kwargs: Any) -> None:
        if getattr(sender, "name", None) in OBSERVED:
            _record(name, task_id)

    return handler


_HANDLERS = {
    name: _ours(name) for name in ("prerun", "postrun", "success", "failure", "retry", "revoked")
}
signals.task_prerun.connect(_HANDLERS["prerun"])
signals.task_postrun.connect(_HANDLERS["postrun"])
signals.task_success.connect(_HANDLERS["success"])
signals.task_failure.connect(_HANDLERS["failure"])
signals.task_retry.connect(_HANDLERS["retry"])
signals.task_revoked.connect(_HANDLERS["revoked"])


@receiver(signals.task_prerun)
def broken_receiver(sender: Any, **kwargs: Any) -> None:
    """A receiver that always fails: the task must run regardless."""
    if getattr(sender, "name", None) in OBSERVED:
        raise RuntimeError("this receiver is broken")


@receiver(task_started)
@receiver(task_finished)
@receiver(task_enqueued)
def broken_django_receiver(sender: Any, task_result: Any, **kwargs: Any) -> None:
    """Receivers of Django's signals that always fail for one task: it must run regardless."""
    if task_result.task.name == "tests.testapp.hardening_tasks.noisy":
        raise RuntimeError("this Django signal receiver is broken")


@receiver(signals.task_prerun)
def exits_its_consumer_once(sender: Any, task_id: str, **kwargs: Any) -> None:
    """sys.exit(0) in a receiver, the first time a task whose id says so runs."""
    from tests.testapp.models import Execution

    seen = Execution.objects.filter(marker=f"consumer-exit:{task_id}")
    if task_id.startswith("exit-consumer-") and not seen.exists():
        _record("consumer-exit", task_id)
        raise SystemExit(0)
