"""Running one delivery: checks, the call itself, the outcome and the signals around it."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TypeGuard

from django.conf import settings
from django.db import DatabaseError
from django.dispatch import Signal
from django.tasks import Task as DjangoTask
from django.tasks import TaskContext
from django.tasks import TaskResult as DjangoTaskResult
from django.tasks.base import TaskResultStatus
from django.tasks.signals import log_task_finished, log_task_started, task_finished, task_started

from ..backend import TasksBackend
from ..brokers import Delivery
from ..exceptions import MessageError, Retry, RetryNotSent, SoftTimeLimitExceeded, Terminated
from ..messages import Message, _encoder
from ..models import TaskResult
from ..registry import registry
from ..results import ResultStore, error_entry
from ..results.store import is_refusal, message_columns
from ..signals import (
    send_robust,
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)
from ..states import DJANGO_STATUS, TaskState
from ..task import Request, Task, pop_request, push_request

logger = logging.getLogger("django_tasks.worker")
#: The logger of Django's own task receivers (log_task_started, log_task_finished).
_django_logger = logging.getLogger("django.tasks")


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


@dataclass(slots=True)
class Attempt:
    """One run of one delivery, as the executor tracks it."""

    delivery: Delivery
    task: DjangoTask
    message: Message
    row: TaskResult
    #: Django's TaskResult, made only for a receiver or a context that takes it (see _heard()).
    django_result: DjangoTaskResult | None
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


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
        #: Whether SIGALRM may carry soft time limits (the main thread of a pool process).
        self.alarms = alarms
        self.monitor = monitor
        self.running: str | None = None
        self.thread_alarm = ThreadAlarm()
        self.track_started_after = backend.config.track_started_after
        self._started_lock = threading.Lock()
        #: The running task whose start is not recorded yet, and when it started.
        self._unrecorded: tuple[Message, TaskResult | None, float] | None = None
        self._alarm_set = False  # A soft time limit's SIGALRM is pending.
        #: The "succeeded" lines not written yet (see write_log()): task, id, seconds, value.
        self._succeeded_lines: list[tuple[str, str, float, Short]] = []
        #: For _now(): settings.USE_TZ read once, not (as timezone.now() does) twice per task.
        self._zone = UTC if settings.USE_TZ else None

    def execute(self, delivery: Delivery) -> Outcome:
        message = delivery.message
        if message is None:
            return self._dead(delivery, delivery.error or "undecodable message")
        task = registry.get(message.task)
        if task is None:
            return self._dead(delivery, f"unknown task {message.task!r}: not registered here")
        # By the broker's clock: a worker whose own clock is off neither drops a task early
        # nor runs one that expired.
        if message.expires is not None and message.expires < time.time() + delivery.clock_offset:
            return self._revoked(delivery, task, message, "expired")
        if message.id in self.revoked:
            return self._revoked(delivery, task, message, "revoked")
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
            row.date_done = self._now()
        _send(task_revoked, task, task_id=message.id, reason=reason)
        return Outcome(delivery, TaskState.REVOKED, row)

    def _run(self, delivery: Delivery, task: DjangoTask, message: Message) -> Outcome:
        row = self._row(message, TaskState.STARTED)
        logger.debug("Task %s[%s] received", message.task, message.id)
        self._track_started(message, None if _ignores_result(task) else row)
        heard = _heard(task_started, log_task_started)
        django_result = (
            self.backend.to_django_result(row, task) if heard or task.takes_context else None
        )
        attempt = Attempt(delivery, task, message, row, django_result)
        if heard:
            _send_django(task_started, type(self.backend), task_result=django_result)
        _send(task_prerun, task, task_id=message.id, task=task, args=message.args,
              kwargs=message.kwargs)  # fmt: skip
        push_request(lambda: self._request(message))  # Made if the task asks for it.
        soft, hard = _limits(task, message)
        self._begin(attempt, soft, hard)
        try:
            value = self._call(attempt)
        except Retry as retry:
            return self._retried(attempt, retry.exc, retry.when or 0.0)
        except Terminated:
            return self._terminated(attempt)
        except Abort:
            raise
        except BaseException as exc:
            # sys.exit(), KeyboardInterrupt, GeneratorExit, CancelledError: raised by the task,
            # they end the task (FAILURE), never the pool member running it.
            return self._failed_or_retried(attempt, exc)
        finally:
            self._end()
            pop_request()
        return self._succeeded(attempt, value)

    def _begin(self, attempt: Attempt, soft: float | None, hard: float | None) -> None:
        self.running = attempt.message.id
        if self.monitor is not None:
            self.monitor.started(attempt.delivery, None if hard is None else time.time() + hard)
        if soft is not None and self.alarms:
            signal.setitimer(signal.ITIMER_REAL, soft)
            self._alarm_set = True
        elif soft is not None:
            self.thread_alarm.arm(soft)

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

    def _end(self) -> None:
        with self._started_lock:
            self._unrecorded = None
        if self._alarm_set:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._alarm_set = False
        self.thread_alarm.disarm()
        self.running = None
        if self.monitor is not None:
            self.monitor.finished()

    def _call(self, attempt: Attempt) -> Any:
        task, message = attempt.task, attempt.message
        if task.takes_context:
            assert attempt.django_result is not None  # Made in _run() for such a task.
            context: Any = TaskContext(task_result=attempt.django_result)
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

    def _succeeded(self, attempt: Attempt, value: Any) -> Outcome:
        message, row = attempt.message, attempt.row
        if logger.isEnabledFor(logging.INFO):
            self._succeeded_lines.append(
                (message.task, message.id, attempt.elapsed(), Short(value))
            )
        row.state, row.result, row.date_done = TaskState.SUCCESS, value, self._now()
        _send(task_success, attempt.task, task_id=message.id, result=value)
        return self._finish(attempt, value)

    def write_log(self) -> None:
        """Write the "succeeded" line of each task run since the last call, in order.

        The consumer calls it for each batch before storing the results, so a caller that has
        a result can find its line in the log. A task that fails or is retried is logged at
        once. Written one after another, the lines of a batch cost the worker about a third of
        what each costs written between two tasks (a thread-pool drain ran 23 % faster).
        """
        lines, self._succeeded_lines = self._succeeded_lines, []
        for line in lines:
            logger.info("Task %s[%s] succeeded in %.3fs: %s", *line)

    def _failed_or_retried(self, attempt: Attempt, exc: BaseException) -> Outcome:
        task, message = attempt.task, attempt.message
        if isinstance(task, Task) and task.autoretry_for and isinstance(exc, task.autoretry_for):
            limit = task.max_retries
            if limit is None or message.retries < limit:
                return self._retried(attempt, exc, task.retry_delay(message.retries))
        return self._failed(attempt, exc)

    def _failed(self, attempt: Attempt, exc: BaseException) -> Outcome:
        message, row = attempt.message, attempt.row
        logger.error("Task %s[%s] failed in %.3fs: %r", message.task, message.id,
                     attempt.elapsed(), exc, exc_info=exc)  # fmt: skip
        _record_error(row, exc)
        row.state, row.date_done = TaskState.FAILURE, self._now()
        _send(task_failure, attempt.task, task_id=message.id, exception=exc,
              traceback=row.traceback)  # fmt: skip
        return self._finish(attempt, exc)

    def _retried(self, attempt: Attempt, exc: BaseException | None, delay: float) -> Outcome:
        """Schedule the next attempt: state RETRY now, the same task id again after ``delay``.

        A task revoked meanwhile is not retried; nor is one whose next message could not be
        sent (over MAX_MESSAGE_SIZE, say): it fails with that reason.
        """
        task, message, row = attempt.task, attempt.message, attempt.row
        if self._revoked_while_running(message.id):
            logger.warning("Task %s[%s] was revoked: its retry is not scheduled", message.task,
                           message.id)  # fmt: skip
            return self._revoked(attempt.delivery, task, message, "revoked")
        eta = time.time() + delay
        headers = {**message.headers, "worker_ids": row.worker_ids}
        following = replace(message, retries=message.retries + 1, eta=eta, headers=headers)
        try:
            self.backend.broker.encode(following)
        except MessageError as error:
            refused = RetryNotSent(f"The retry of task {message.task} could not be sent: {error}")
            refused.__cause__ = exc
            return self._failed(attempt, refused)
        logger.warning("Task %s[%s] retry %d in %.1fs: %r", message.task, message.id,
                       message.retries + 1, delay, exc)  # fmt: skip
        if exc is not None:
            _record_error(row, exc)
        row.state, row.retries = TaskState.RETRY, message.retries + 1
        _send(task_retry, task, task_id=message.id, reason=exc, eta=eta)
        _send(task_postrun, task, task_id=message.id, task=task, args=message.args,
              kwargs=message.kwargs, retval=exc, state=row.state)  # fmt: skip
        stored = None if _ignores_result(task) else row
        return Outcome(attempt.delivery, TaskState.RETRY, stored, retry=(following, eta))

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

    def _terminated(self, attempt: Attempt) -> Outcome:
        message, row = attempt.message, attempt.row
        logger.warning("Task %s[%s] terminated (revoked) after %.3fs", message.task,
                       message.id, attempt.elapsed())  # fmt: skip
        row.state, row.reason, row.date_done = TaskState.REVOKED, "terminated", self._now()
        _send(task_revoked, attempt.task, task_id=message.id, reason="terminated")
        return self._finish(attempt, None)

    def _finish(self, attempt: Attempt, retval: Any) -> Outcome:
        """Tell Django's and our postrun receivers, and hand the row to the consumer."""
        task, message, row = attempt.task, attempt.message, attempt.row
        # A failure is always sent: Django's receiver logs it at ERROR, which a handler may take
        # (mail_admins with Django's default LOGGING) even where its INFO records go nowhere.
        failed = DJANGO_STATUS[row.state] == TaskResultStatus.FAILED
        if failed or _heard(task_finished, log_task_finished):
            result = attempt.django_result
            if result is None:
                result = self.backend.to_django_result(row, task)
            else:
                _finish_django_result(result, row)
            _send_django(task_finished, type(self.backend), task_result=result)
        _send(task_postrun, task, task_id=message.id, task=task, args=message.args,
              kwargs=message.kwargs, retval=retval, state=row.state)  # fmt: skip
        return Outcome(attempt.delivery, row.state, None if _ignores_result(task) else row)

    def _row(self, message: Message, state: str) -> TaskResult:
        earlier = message.headers.get("worker_ids")
        workers = [*earlier, self.worker_id] if _strings(earlier) else [self.worker_id]
        return TaskResult.build(
            id=message.id,
            state=state,
            worker=self.worker_id,
            worker_ids=workers,
            started_at=self._now(),
            **message_columns(message),
        )

    def _now(self) -> datetime:
        """timezone.now()."""
        return datetime.now(self._zone)

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


def _record_error(row: TaskResult, exc: BaseException) -> None:
    entry = error_entry(exc)
    row.exception_type = entry["exception_class_path"]
    row.exception_message = entry["message"]
    row.traceback = entry["traceback"]
    row.errors = [entry]


def _limits(task: DjangoTask, message: Message) -> tuple[float | None, float | None]:
    """The soft and hard time limits of this call: the call's options, else the task's.

    A header that is not a positive finite number (from another producer) is ignored.
    """
    soft = _positive(message.headers.get("soft_time_limit"))
    hard = _positive(message.headers.get("time_limit"))
    if isinstance(task, Task):
        soft = soft if soft is not None else task.soft_time_limit
        hard = hard if hard is not None else task.time_limit
    return soft, hard


def _strings(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < math.inf else None


def raise_soft_time_limit(signum: int, frame: FrameType | None) -> None:
    """SIGALRM handler of pool processes: the running task overran its soft time limit."""
    raise SoftTimeLimitExceeded("soft time limit exceeded")


class ThreadAlarm:
    """Soft time limits where SIGALRM cannot reach the task: in a thread of the thread pool.

    SoftTimeLimitExceeded is raised asynchronously in the task's thread. Python delivers it at the
    thread's next bytecode, so a task blocked inside a C call (a socket read, time.sleep) sees it
    only when that call returns: the limit is enforced as well as a thread allows.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._thread = 0
        self._armed = False
        self._fired = False

    def arm(self, seconds: float) -> None:
        with self._lock:
            self._thread, self._armed, self._fired = threading.get_ident(), True, False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = _async_raise(self._thread, SoftTimeLimitExceeded)

    def disarm(self) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        with self._lock:
            self._armed = False
            if self._fired:  # Not delivered yet: the task ended first.
                _async_raise(self._thread, None)
        self._timer = None


def _async_raise(thread_id: int, exception: type[BaseException] | None) -> bool:
    """Raise ``exception`` in another thread at its next bytecode (None clears a pending one)."""
    import ctypes  # Here: a thread pool that never aborts a task does without it (0.6 MiB).

    argument = ctypes.py_object(exception) if exception is not None else None
    return bool(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), argument))


class Monitor:
    """Reports the running task to whoever enforces hard time limits (the pool's parent)."""

    def started(self, delivery: Delivery, hard_deadline: float | None) -> None:
        """``delivery`` started; it must be stopped after ``hard_deadline`` (a Unix time)."""

    def finished(self) -> None:
        """The running task ended."""

    def held(self, deliveries: list[Delivery]) -> None:
        """The deliveries leased by this pool member now (running or waiting to run)."""


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


def _heard(signal: Signal, django_receiver: Any) -> bool:
    """Whether sending Django's ``signal`` (task_started, task_finished) would do anything.

    Django connects ``django_receiver`` to it, which only logs an INFO record on
    ``django.tasks``; runworker stops that logger building such records where no handler would
    write them (worker/logs.py). Then, with no other receiver, the signal and the TaskResult it
    carries are not made at all, which saves about a tenth of what a no-op task costs the worker
    (bench/compare drain).
    """
    receivers = signal.receivers
    if not receivers:
        return False
    if len(receivers) > 1 or _django_logger.isEnabledFor(logging.INFO):
        return True
    try:
        # django.dispatch keys a receiver by the id of the function, first in its entry.
        return bool(receivers[0][0][0] != id(django_receiver))
    except (IndexError, KeyError, TypeError):  # Another layout: send it, as Django would.
        return True


def _send(signal: Signal, sender: DjangoTask, **kwargs: Any) -> None:
    """Send one of our signals; a receiver's failure is logged, never raised into the task."""
    if not signal.receivers:  # send_robust() looks first too; this saves the call.
        return
    send_robust(signal, sender, **kwargs)


def _send_django(signal: Signal, sender: type[TasksBackend], **kwargs: Any) -> None:
    """Send Django's task_started or task_finished, as _send() sends ours."""
    send_robust(signal, sender, **kwargs)
