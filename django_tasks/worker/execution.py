"""Running one delivery: checks, the call itself, the outcome and the signals around it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.dispatch import Signal
from django.tasks import Task as DjangoTask
from django.tasks import TaskContext
from django.tasks import TaskResult as DjangoTaskResult
from django.tasks.signals import task_finished, task_started
from django.utils import timezone

from ..backend import TasksBackend
from ..brokers import Delivery
from ..messages import Message, _encoder
from ..models import TaskResult
from ..registry import registry
from ..results import ResultStore, error_entry
from ..signals import task_failure, task_postrun, task_prerun, task_revoked, task_success
from ..states import TaskState
from ..task import Request, Task, pop_request, push_request

logger = logging.getLogger("django_tasks.worker")


class Abort(BaseException):
    """Raised in a running task to stop it at once (second shutdown signal)."""


@dataclass(slots=True)
class Outcome:
    """What became of one delivery; the consumer stores ``row``, then acks."""

    delivery: Delivery
    state: str
    row: TaskResult | None = None
    dead_letter: str | None = None


@dataclass(slots=True)
class Attempt:
    """One run of one delivery, as the executor tracks it."""

    delivery: Delivery
    task: DjangoTask
    message: Message
    row: TaskResult
    django_result: DjangoTaskResult
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Executor:
    """Runs deliveries for one consumer and turns each into an Outcome."""

    def __init__(self, backend: TasksBackend, worker_id: str) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.store = ResultStore()

    def execute(self, delivery: Delivery) -> Outcome:
        message = delivery.message
        if message is None:
            return self._dead(delivery, delivery.error or "undecodable message")
        task = registry.get(message.task)
        if task is None:
            return self._dead(delivery, f"unknown task {message.task!r}: not registered here")
        if message.expires is not None and message.expires < time.time():
            return self._revoked(delivery, task, message, "expired")
        return self._run(delivery, task, message)

    def _dead(self, delivery: Delivery, reason: str) -> Outcome:
        logger.error(
            "Message %s on queue %r dead-lettered: %s", delivery.tag, delivery.queue, reason
        )
        return Outcome(delivery, "DEAD", dead_letter=reason)

    def _revoked(
        self, delivery: Delivery, task: DjangoTask, message: Message, reason: str
    ) -> Outcome:
        logger.info("Task %s[%s] %s: not run", message.task, message.id, reason)
        row = None
        if not _ignores_result(task):
            row = self._row(message, TaskState.REVOKED)
            row.reason = reason
            row.date_done = timezone.now()
        _send(task_revoked, task, task_id=message.id, reason=reason)
        return Outcome(delivery, TaskState.REVOKED, row)

    def _run(self, delivery: Delivery, task: DjangoTask, message: Message) -> Outcome:
        row = self._row(message, TaskState.STARTED)
        if not _ignores_result(task):
            self.store.save_started([row])
        attempt = Attempt(delivery, task, message, row, self.backend.to_django_result(row, task))
        logger.info("Task %s[%s] received", message.task, message.id)
        task_started.send(type(self.backend), task_result=attempt.django_result)
        _send(task_prerun, task, task_id=message.id, task=task, args=message.args,
              kwargs=message.kwargs)  # fmt: skip
        push_request(self._request(message))
        try:
            value = self._call(attempt)
        except Exception as exc:
            return self._failed(attempt, exc)
        finally:
            pop_request()
        return self._succeeded(attempt, value)

    def _call(self, attempt: Attempt) -> Any:
        task, message = attempt.task, attempt.message
        if task.takes_context:
            context: Any = TaskContext(task_result=attempt.django_result)
            value = task.call(context, *message.args, **message.kwargs)
        else:
            value = task.call(*message.args, **message.kwargs)
        try:
            _encoder.encode(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"The return value of {message.task} is not JSON-serialisable: {exc}"
            ) from None
        return value

    def _succeeded(self, attempt: Attempt, value: Any) -> Outcome:
        message, row = attempt.message, attempt.row
        logger.info("Task %s[%s] succeeded in %.3fs: %s", message.task, message.id,
                    attempt.elapsed(), _short(value))  # fmt: skip
        row.state, row.result, row.date_done = TaskState.SUCCESS, value, timezone.now()
        _send(task_success, attempt.task, task_id=message.id, result=value)
        return self._finish(attempt, value)

    def _failed(self, attempt: Attempt, exc: Exception) -> Outcome:
        message, row = attempt.message, attempt.row
        logger.error("Task %s[%s] failed in %.3fs: %r", message.task, message.id,
                     attempt.elapsed(), exc, exc_info=exc)  # fmt: skip
        entry = error_entry(exc)
        row.state, row.date_done = TaskState.FAILURE, timezone.now()
        row.exception_type = entry["exception_class_path"]
        row.exception_message = entry["message"]
        row.traceback = entry["traceback"]
        row.errors = [entry]
        _send(task_failure, attempt.task, task_id=message.id, exception=exc,
              traceback=row.traceback)  # fmt: skip
        return self._finish(attempt, exc)

    def _finish(self, attempt: Attempt, retval: Any) -> Outcome:
        """Tell Django's and our postrun receivers, and hand the row to the consumer."""
        task, message, row = attempt.task, attempt.message, attempt.row
        _finish_django_result(attempt.django_result, row)
        task_finished.send(type(self.backend), task_result=attempt.django_result)
        _send(task_postrun, task, task_id=message.id, task=task, args=message.args,
              kwargs=message.kwargs, retval=retval, state=row.state)  # fmt: skip
        return Outcome(attempt.delivery, row.state, None if _ignores_result(task) else row)

    def _row(self, message: Message, state: str) -> TaskResult:
        workers = [*message.headers.get("worker_ids", []), self.worker_id]
        return TaskResult(
            id=message.id,
            task_name=message.task,
            state=state,
            queue=message.queue,
            priority=message.priority,
            args=message.args,
            kwargs=message.kwargs,
            worker=self.worker_id,
            worker_ids=workers,
            retries=message.retries,
            root_id=message.root_id or "",
            parent_id=message.parent_id or "",
            group_id=message.group_id or "",
            enqueued_at=_aware(message.enqueued_at),
            started_at=timezone.now(),
        )

    def _request(self, message: Message) -> Request:
        return Request(
            id=message.id,
            task=message.task,
            args=message.args,
            kwargs=message.kwargs,
            queue=message.queue,
            priority=message.priority,
            retries=message.retries,
            eta=message.eta,
            expires=message.expires,
            root_id=message.root_id,
            parent_id=message.parent_id,
            hostname=self.worker_id,
            headers=message.headers,
            called_directly=False,
        )


def _finish_django_result(result: DjangoTaskResult, row: TaskResult) -> None:
    from django.tasks.base import TaskError

    from ..states import DJANGO_STATUS

    object.__setattr__(result, "status", DJANGO_STATUS[row.state])
    object.__setattr__(result, "finished_at", row.date_done)
    if row.state == TaskState.SUCCESS:
        object.__setattr__(result, "_return_value", row.result)
    for entry in row.errors[-1:]:
        result.errors.append(
            TaskError(
                exception_class_path=entry["exception_class_path"], traceback=entry["traceback"]
            )
        )


def _ignores_result(task: DjangoTask) -> bool:
    return isinstance(task, Task) and task.ignore_result


def _aware(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _send(signal: Signal, sender: DjangoTask, **kwargs: Any) -> None:
    """Send one of our signals; a receiver's failure is logged, never raised into the task."""
    for receiver, response in signal.send_robust(sender=sender, **kwargs):
        if isinstance(response, Exception):
            logger.error("Signal receiver %r failed: %r", receiver, response, exc_info=response)
