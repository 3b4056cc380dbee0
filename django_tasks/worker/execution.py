"""Running one delivery: the task called between its middleware hooks, and what became of it.

Everything around the call itself (expiry, revocation, signals, retries, time limits, and the
project's own middleware) is middleware: see django_tasks/middleware.py and
worker/middleware.py. The executor decodes nothing and stores nothing: it turns a delivery into an
Outcome (the result row to store, and the next attempt to send if there is one) for the consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeGuard

from django.db import DatabaseError
from django.tasks import Task as DjangoTask
from django.tasks import TaskContext
from django.utils import timezone

from ..backend import TasksBackend
from ..brokers import Delivery
from ..exceptions import Retry, Terminated
from ..messages import Message, _encoder
from ..middleware import MiddlewareStack, TaskRun
from ..models import TaskResult
from ..registry import registry
from ..results import ResultStore, error_entry
from ..results.store import is_refusal, message_columns
from ..states import TaskState
from ..task import Request, Task, pop_request, push_request
from .middleware import Expiry, Monitor, Retries, Revocation, Signals, TimeLimits

logger = logging.getLogger("django_tasks.worker")


class Abort(BaseException):
    """Raised in a running task to stop it at once (second shutdown signal)."""


@dataclass(slots=True)
class Outcome:
    """What became of one delivery; the consumer stores ``row``, then acks (or requeues)."""

    delivery: Delivery
    state: str
    row: TaskResult | None = None
    dead_letter: str | None = None
    #: The next attempt and when it is due (a Unix time), replacing the delivery.
    retry: tuple[Message, float] | None = None
    #: The run, for the middleware's after_ack hooks (None for a dead letter).
    run: TaskRun | None = None


class Executor:
    """Runs deliveries for one consumer and turns each into an Outcome."""

    def __init__(
        self,
        backend: TasksBackend,
        worker_id: str,
        *,
        alarms: bool = False,
        monitor: Monitor | None = None,
    ) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.store = ResultStore()
        #: Task ids revoked while this consumer held them (kept fresh by the lease keeper).
        self.revoked: set[str] = set()
        self.running: str | None = None
        self.track_started_after = backend.config.track_started_after
        self._started_lock = threading.Lock()
        #: The running task whose start is not recorded yet, and when it started.
        self._unrecorded: tuple[Message, TaskResult | None, float] | None = None
        self.time_limits = TimeLimits(alarms=alarms, monitor=monitor)
        self.middleware = MiddlewareStack([
            Expiry(),
            Revocation(self.revoked),
            Signals(backend),
            *backend.middleware,
            Retries(backend.broker, self._revoked_while_running),
            self.time_limits,
        ])  # fmt: skip

    def execute(self, delivery: Delivery) -> Outcome:
        message = delivery.message
        if message is None:
            return self._dead(delivery, delivery.error or "undecodable message")
        task = registry.get(message.task)
        if task is None:
            return self._dead(delivery, f"unknown task {message.task!r}: not registered here")
        run = TaskRun(task=task, message=message, delivery=delivery, worker_id=self.worker_id,
                      row=self._row(message))  # fmt: skip
        entered, skip = self.middleware.before_execute(run)
        try:
            if skip is not None:
                run.revoke(skip.reason)
            else:
                self._run(run)
        finally:
            self.middleware.after_execute(run, entered)
        _fill_row(run)
        self._log(run)
        self.middleware.settled(run)
        retry = None if run.next_message is None else (run.next_message, run.retry_eta or 0.0)
        stored = None if _ignores_result(task) else run.row
        return Outcome(delivery, run.state, stored, retry=retry, run=run)

    def _dead(self, delivery: Delivery, reason: str) -> Outcome:
        logger.error(
            "Message %s on queue %r dead-lettered: %s", delivery.tag, delivery.queue, reason
        )
        return Outcome(delivery, "DEAD", dead_letter=reason)

    def _run(self, run: TaskRun) -> None:
        message = run.message
        logger.debug("Task %s[%s] received", message.task, message.id)
        self._track_started(message, None if _ignores_result(run.task) else run.row)
        push_request(lambda: self._request(message))  # Made if the task asks for it.
        self.running = message.id
        run.ran = True
        try:
            run.succeed(self._call(run))
        except Retry as retry:
            run.retry(retry.when or 0.0, retry.exc)
        except Terminated:
            run.revoke("terminated")
        except Abort:
            raise
        except BaseException as exc:
            # sys.exit(), KeyboardInterrupt, GeneratorExit, CancelledError: raised by the task,
            # they end the task (FAILURE), never the pool member running it.
            run.fail(exc)
        finally:
            self._end()
            pop_request()

    def _call(self, run: TaskRun) -> Any:
        task, message = run.task, run.message
        if task.takes_context:
            if run.django_result is None:
                run.django_result = self.backend.to_django_result(run.row, task)
            context: Any = TaskContext(task_result=run.django_result)
            value = task.call(context, *message.args, **message.kwargs)
        else:
            value = task.call(*message.args, **message.kwargs)
        if value is None or type(value) in _ALWAYS_JSON:
            return value
        try:
            _encoder.encode(value)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TypeError(
                f"The return value of {message.task} ({type(value).__name__}) is not "
                f"JSON-serialisable: {exc}"
            ) from None
        return value

    def _log(self, run: TaskRun) -> None:
        """One line for how the run ended."""
        message, state = run.message, run.state
        name, task_id, elapsed = message.task, message.id, run.elapsed()
        if state == TaskState.SUCCESS:
            logger.info("Task %s[%s] succeeded in %.3fs: %s", name, task_id, elapsed,
                        Short(run.value))  # fmt: skip
        elif state == TaskState.FAILURE:
            logger.error("Task %s[%s] failed in %.3fs: %r", name, task_id, elapsed,
                         run.exception, exc_info=run.exception)  # fmt: skip
        elif state == TaskState.RETRY:
            delay = (run.retry_eta or 0.0) - time.time()
            logger.warning("Task %s[%s] retry %d in %.1fs: %r", name, task_id,
                           message.retries + 1, max(delay, 0.0), run.exception)  # fmt: skip
        elif run.ran:
            logger.warning("Task %s[%s] %s after %.3fs", name, task_id, run.reason, elapsed)
        else:
            logger.info("Task %s[%s] %s: not run", name, task_id, run.reason)

    # Recording the start of long tasks -------------------------------------------------------

    def _track_started(self, message: Message, row: TaskResult | None) -> None:
        """Record the start of a task now, or (by default) once it has run a little while.

        Recorded means a log line and the STARTED row (none for a task that ignores its result).
        Most tasks finish in milliseconds: their row goes straight to its final state and their
        one line in the log says how they ended, which saves a database write and a log line per
        task. The lease keeper records a task that runs longer (record_started_if_due), so a
        long or stuck task shows in the log and the admin while it runs.
        """
        if self.track_started_after <= 0:
            self._record_started(message, row, 0.0)
            return
        with self._started_lock:
            self._unrecorded = (message, row, time.monotonic())

    def record_started_if_due(self) -> None:
        """Record the start of the running task if it has run long enough (any thread)."""
        with self._started_lock:
            if self._unrecorded is None:
                return
            message, row, since = self._unrecorded
            running = time.monotonic() - since
            if running < self.track_started_after:
                return
            self._unrecorded = None
            # Under the lock: the task's final row cannot be written before this one.
            self._record_started(message, row, running)

    def _record_started(self, message: Message, row: TaskResult | None, running: float) -> None:
        if running:
            logger.info("Task %s[%s] started %.1fs ago, still running", message.task,
                        message.id, running)  # fmt: skip
        else:
            logger.info("Task %s[%s] started", message.task, message.id)
        if row is None:
            return
        try:
            self.store.save_started([row])
        except Exception as exc:
            if not is_refusal(exc):
                raise
            # The final write stores what it can (ResultStore.save_finished_or_lean).
            logger.warning("Could not record the start of task %s[%s]: %s", message.task,
                           message.id, exc)  # fmt: skip

    def reset(self) -> None:
        """Forget the running task: it ended in an error of the worker's, not of the task's."""
        self._end()
        self.time_limits.disarm()

    def _end(self) -> None:
        with self._started_lock:
            self._unrecorded = None
        self.running = None

    # Revocation -------------------------------------------------------------------------------

    def _revoked_while_running(self, task_id: str) -> bool:
        """Whether ``task_id`` was revoked: as the lease keeper saw, or the store says now.

        One query, on the rare path of a retry: the keeper looks only every second.
        """
        if task_id in self.revoked:
            return True
        try:
            return self.store.is_revoked(task_id)
        except DatabaseError as exc:
            logger.warning("Could not look for a revoke of task %s: %s", task_id, exc)
            return False

    # The result row and the request -----------------------------------------------------------

    def _row(self, message: Message) -> TaskResult:
        earlier = message.headers.get("worker_ids")
        workers = [*earlier, self.worker_id] if _strings(earlier) else [self.worker_id]
        return TaskResult.build(
            id=message.id,
            state=TaskState.STARTED,
            worker=self.worker_id,
            worker_ids=workers,
            started_at=timezone.now(),
            **message_columns(message),
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


def _fill_row(run: TaskRun) -> None:
    """Write the run's final state into its result row: the one place that does."""
    row, state = run.row, run.state
    row.state = state
    if state == TaskState.SUCCESS:
        row.result = run.value
    elif state in (TaskState.FAILURE, TaskState.RETRY) and run.exception is not None:
        entry = error_entry(run.exception)
        row.exception_type = entry["exception_class_path"]
        row.exception_message = entry["message"]
        row.traceback = entry["traceback"]
        row.errors = [entry]
    if state == TaskState.RETRY:
        row.retries = run.message.retries + 1
    else:
        row.date_done = timezone.now()
    if state == TaskState.REVOKED:
        row.reason = run.reason


def _strings(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


#: Return values that JSON always encodes (None aside): no need to try.
_ALWAYS_JSON = (bool, str)


def _ignores_result(task: DjangoTask) -> bool:
    return isinstance(task, Task) and task.ignore_result


class Short:
    """A return value as the "succeeded" line shows it: its repr, cut after LIMIT characters.

    The repr is made when the line is written, so a worker logging at WARNING makes none.
    """

    __slots__ = ("value",)
    LIMIT = 200

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        text = repr(self.value)
        return text if len(text) <= self.LIMIT else text[: self.LIMIT] + "..."
