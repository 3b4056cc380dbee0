"""The worker's own middleware: expiry, revocation, signals, retries and time limits.

Each is ordinary middleware (see django_tasks/middleware.py); the executor stacks them around the
project's own as ``[Expiry, Revocation, Signals, *project's, Retries, TimeLimits]``.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Any

from django.tasks.base import TaskError
from django.tasks.signals import task_finished, task_started

from ..exceptions import MessageError, RetryNotSent, SoftTimeLimitExceeded
from ..middleware import Middleware, SkipTask, TaskRun
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
from ..task import Task

if TYPE_CHECKING:
    from django.tasks import TaskResult as DjangoTaskResult

    from ..backend import TasksBackend
    from ..brokers import Broker, Delivery

logger = logging.getLogger("django_tasks.worker")


class Expiry(Middleware):
    """Skips a task whose ``expires`` time has passed, by the broker's clock.

    A worker whose own clock is off neither drops a task early nor runs one that expired.
    """

    def before_execute(self, run: TaskRun) -> None:
        expires = run.message.expires
        if expires is not None and expires < time.time() + run.delivery.clock_offset:
            raise SkipTask("expired")


class Revocation(Middleware):
    """Skips a task revoked before it started (``revoked``: the ids the consumer knows of)."""

    def __init__(self, revoked: set[str]) -> None:
        self.revoked = revoked

    def before_execute(self, run: TaskRun) -> None:
        if run.message.id in self.revoked:
            raise SkipTask("revoked")


class Signals(Middleware):
    """Sends our signals (signals.py) and Django's task_started and task_finished.

    Receivers that fail are logged, never raised into the task (send_robust).
    """

    def __init__(self, backend: TasksBackend) -> None:
        self.backend = backend

    def before_execute(self, run: TaskRun) -> None:
        if run.django_result is None:
            run.django_result = self.backend.to_django_result(run.row, run.task)
        send_robust(task_started, type(self.backend), task_result=run.django_result)
        message = run.message
        send_robust(task_prerun, run.task, task_id=message.id, task=run.task, args=message.args,
                    kwargs=message.kwargs)  # fmt: skip

    def on_success(self, run: TaskRun) -> None:
        send_robust(task_success, run.task, task_id=run.message.id, result=run.value)
        self._finished(run, run.value)

    def on_failure(self, run: TaskRun) -> None:
        send_robust(task_failure, run.task, task_id=run.message.id, exception=run.exception,
                    traceback=run.row.traceback)  # fmt: skip
        self._finished(run, run.exception)

    def on_retry(self, run: TaskRun) -> None:
        send_robust(task_retry, run.task, task_id=run.message.id, reason=run.exception,
                    eta=run.retry_eta)  # fmt: skip
        self._postrun(run, run.exception)

    def on_skip(self, run: TaskRun) -> None:
        send_robust(task_revoked, run.task, task_id=run.message.id, reason=run.reason)
        if run.ran:  # Stopped while running (terminated): it started, so it finishes.
            self._finished(run, None)

    def _finished(self, run: TaskRun, retval: Any) -> None:
        result, row = run.django_result, run.row
        if result is not None:
            object.__setattr__(result, "status", DJANGO_STATUS[row.state])
            object.__setattr__(result, "finished_at", row.date_done)
            if row.state == TaskState.SUCCESS:
                object.__setattr__(result, "_return_value", row.result)
            for entry in row.errors[-1:]:
                result.errors.append(TaskError(exception_class_path=entry["exception_class_path"],
                                               traceback=entry["traceback"]))  # fmt: skip
            self._send_finished(result, run.exception if run.state == TaskState.FAILURE else None)
        self._postrun(run, retval)

    def _send_finished(self, result: DjangoTaskResult, failure: BaseException | None) -> None:
        """Send Django's task_finished; for a failure, from inside a handler of its exception.

        Django sends it there, and its receiver logs the traceback it finds in sys.exc_info().
        """
        if failure is None:
            send_robust(task_finished, type(self.backend), task_result=result)
            return
        traceback = failure.__traceback__
        try:
            raise failure
        except BaseException:
            send_robust(task_finished, type(self.backend), task_result=result)
        finally:
            failure.__traceback__ = traceback  # As it was: raising it here added a frame.

    @staticmethod
    def _postrun(run: TaskRun, retval: Any) -> None:
        message = run.message
        send_robust(task_postrun, run.task, task_id=message.id, task=run.task, args=message.args,
                    kwargs=message.kwargs, retval=retval, state=run.state)  # fmt: skip


class Retries(Middleware):
    """Turns a failure into a retry (``autoretry_for``), and checks every retry before it is sent.

    A retry is not sent for a task revoked while it ran (``is_revoked``), nor when its next
    message cannot be sent (over MAX_MESSAGE_SIZE, say): the task then fails with that reason.
    The next message keeps every field of this one (unknown ones included) with one more retry,
    its due time, and the workers that ran it so far.
    """

    def __init__(self, broker: Broker, is_revoked: Callable[[str], bool]) -> None:
        self.broker = broker
        self.is_revoked = is_revoked

    def after_execute(self, run: TaskRun) -> None:
        task, message = run.task, run.message
        if run.state == TaskState.FAILURE and _autoretries(task, run.exception, message.retries):
            assert isinstance(task, Task)  # As _autoretries() checked.
            run.retry(task.retry_delay(message.retries), run.exception)
        if run.state != TaskState.RETRY or run.retry_eta is None:
            return
        if self.is_revoked(message.id):
            logger.warning("Task %s[%s] was revoked: its retry is not scheduled", message.task,
                           message.id)  # fmt: skip
            run.revoke("revoked")
            return
        headers = {**message.headers, "worker_ids": run.row.worker_ids}
        following = replace(message, retries=message.retries + 1, eta=run.retry_eta,
                            headers=headers)  # fmt: skip
        try:
            self.broker.encode(following)
        except MessageError as error:
            refused = RetryNotSent(f"The retry of task {message.task} could not be sent: {error}")
            refused.__cause__ = run.exception
            run.fail(refused)
            return
        run.next_message = following


def _autoretries(task: Any, exc: BaseException | None, retries: int) -> bool:
    """Whether ``exc`` is one of the task's ``autoretry_for`` with retries left."""
    if not isinstance(task, Task) or not task.autoretry_for or exc is None:
        return False
    if not isinstance(exc, task.autoretry_for):
        return False
    return task.max_retries is None or retries < task.max_retries


class Monitor:
    """Reports the running task to whoever enforces hard time limits (the pool's parent)."""

    def started(self, delivery: Delivery, hard_deadline: float | None) -> None:
        """``delivery`` started; it must be stopped after ``hard_deadline`` (a Unix time)."""

    def finished(self) -> None:
        """The running task ended."""

    def held(self, deliveries: list[Delivery]) -> None:
        """The deliveries leased by this pool member now (running or waiting to run)."""


class TimeLimits(Middleware):
    """Soft and hard time limits: the call's options (headers), else the task's.

    The soft limit raises SoftTimeLimitExceeded in the task: by SIGALRM in the main thread of a
    pool process (``alarms``), by ThreadAlarm in a thread. The hard limit is enforced by the
    pool's parent, which the monitor tells when the task must be stopped.
    """

    def __init__(self, *, alarms: bool, monitor: Monitor | None) -> None:
        self.alarms = alarms
        self.monitor = monitor
        self.thread_alarm = ThreadAlarm()
        self._alarm_set = False

    def before_execute(self, run: TaskRun) -> None:
        soft, hard = _limits(run)
        if self.monitor is not None:
            self.monitor.started(run.delivery, None if hard is None else time.time() + hard)
        if soft is not None and self.alarms:
            signal.setitimer(signal.ITIMER_REAL, soft)
            self._alarm_set = True
        elif soft is not None:
            self.thread_alarm.arm(soft)

    def after_execute(self, run: TaskRun) -> None:
        self.disarm()

    def disarm(self) -> None:
        if self._alarm_set:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._alarm_set = False
        self.thread_alarm.disarm()
        if self.monitor is not None:
            self.monitor.finished()


def _limits(run: TaskRun) -> tuple[float | None, float | None]:
    """The soft and hard time limits of this call: the call's options, else the task's.

    A header that is not a positive finite number (from another producer) is ignored.
    """
    soft = _positive(run.message.headers.get("soft_time_limit"))
    hard = _positive(run.message.headers.get("time_limit"))
    if isinstance(run.task, Task):
        soft = soft if soft is not None else run.task.soft_time_limit
        hard = hard if hard is not None else run.task.time_limit
    return soft, hard


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
