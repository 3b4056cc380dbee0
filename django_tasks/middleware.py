"""Middleware: hooks around sending and running tasks, for a project's code and for our own.

A middleware is a class with some of the no-op methods of ``Middleware`` overridden. The project
lists its own in ``OPTIONS["MIDDLEWARE"]`` (dotted paths); each is made once per backend, with no
arguments. The worker runs its own first (expiry, revocation, signals), then the project's, then
retries and time limits, so that a project's ``after_execute`` sees the final state of the run
(a failure that will be retried is RETRY by then).

The hooks of one run, in order:

- ``before_execute(run)`` in list order, just before the task is called. Raising
  ``SkipTask(reason)`` there skips the task: it is stored REVOKED with that reason.
- the task itself, then ``after_execute(run)`` in reverse order, for every middleware whose
  ``before_execute`` ran, whatever happened (also after a skip).
- one of ``on_success``, ``on_failure``, ``on_retry`` or ``on_skip(run)``, in list order, once
  the state is settled.
- ``after_ack(runs)`` once the results of a batch are stored and its messages acknowledged.

In the sending process, ``before_enqueue(message)`` (it may add ``message.headers``) and
``after_enqueue(message)`` run around each message sent. A hook that raises is logged and the
others still run (except ``SkipTask``): a middleware cannot break a worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .states import TaskState

if TYPE_CHECKING:
    from django.tasks import Task as DjangoTask
    from django.tasks import TaskResult as DjangoTaskResult

    from .brokers.base import Delivery
    from .messages import Message
    from .models import TaskResult

logger = logging.getLogger("django_tasks.middleware")


class SkipTask(Exception):
    """Raised by ``before_execute`` to leave the task unrun, stored REVOKED with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True, eq=False)
class TaskRun:
    """One run of one task in a worker, as middleware sees it.

    ``state`` is STARTED until the task ends, then SUCCESS, FAILURE, RETRY or REVOKED. ``value``
    is what the task returned, ``exception`` what it raised (or why it is retried), ``reason``
    why it was not run or was stopped (REVOKED: "revoked", "expired", "terminated"...).
    ``row`` is the result row the worker stores, filled in from the state after the hooks.
    """

    task: DjangoTask
    message: Message
    delivery: Delivery
    worker_id: str
    row: TaskResult
    #: Django's view of the result, for Django's signals and for tasks that take a context.
    django_result: DjangoTaskResult | None = None
    started: float = field(default_factory=time.monotonic)
    state: str = TaskState.STARTED
    value: Any = None
    exception: BaseException | None = None
    reason: str = ""
    #: Whether the task's code was called (False when a middleware skipped it).
    ran: bool = False
    #: RETRY: when the next attempt is due (a Unix time), and its message once it is checked.
    retry_eta: float | None = None
    next_message: Message | None = None
    #: What middleware keep between their hooks for this run (a timer, a token to reset...).
    notes: dict[str, Any] = field(default_factory=dict)

    def elapsed(self) -> float:
        """Seconds since the run began."""
        return time.monotonic() - self.started

    def succeed(self, value: Any) -> None:
        self.state, self.value, self.exception = TaskState.SUCCESS, value, None

    def fail(self, exception: BaseException) -> None:
        self.state, self.exception, self.retry_eta = TaskState.FAILURE, exception, None

    def retry(self, delay: float, exception: BaseException | None = None) -> None:
        """Run the task again after ``delay`` seconds instead of ending it now."""
        self.state, self.exception = TaskState.RETRY, exception
        self.retry_eta = time.time() + delay

    def revoke(self, reason: str) -> None:
        self.state, self.reason, self.retry_eta = TaskState.REVOKED, reason, None


class Middleware:
    """Base class of middleware: every hook does nothing. Override the ones you need."""

    def before_enqueue(self, message: Message) -> None:
        """Before ``message`` is encoded and sent (in the sending process)."""

    def after_enqueue(self, message: Message) -> None:
        """After ``message`` was sent (or handed to the outbox until the commit)."""

    def before_execute(self, run: TaskRun) -> None:
        """Just before the task runs; raise SkipTask to leave it unrun."""

    def after_execute(self, run: TaskRun) -> None:
        """After the task ran or was skipped; ``run.state`` may still change (retries)."""

    def on_success(self, run: TaskRun) -> None:
        """The task returned ``run.value``."""

    def on_failure(self, run: TaskRun) -> None:
        """The task failed for good with ``run.exception``."""

    def on_retry(self, run: TaskRun) -> None:
        """The task will run again at ``run.retry_eta``."""

    def on_skip(self, run: TaskRun) -> None:
        """The task was not run, or was stopped, for ``run.reason`` (it is REVOKED)."""

    def after_ack(self, runs: Sequence[TaskRun]) -> None:
        """The results of these runs are stored and their messages acknowledged."""


_SETTLED: dict[str, str] = {
    TaskState.SUCCESS: "on_success",
    TaskState.FAILURE: "on_failure",
    TaskState.RETRY: "on_retry",
    TaskState.REVOKED: "on_skip",
}


class MiddlewareStack:
    """Runs the hooks of a list of middleware in the order the module's docstring gives."""

    def __init__(self, middleware: Sequence[Middleware]) -> None:
        self.middleware = list(middleware)

    def before_enqueue(self, message: Message) -> None:
        for middleware in self.middleware:
            _call(middleware.before_enqueue, message)

    def after_enqueue(self, message: Message) -> None:
        for middleware in self.middleware:
            _call(middleware.after_enqueue, message)

    def before_execute(self, run: TaskRun) -> tuple[int, SkipTask | None]:
        """Run the before_execute hooks until one raises SkipTask.

        Returns how many ran to the end (their after_execute hooks are due), and the SkipTask
        raised, if one was.
        """
        for entered, middleware in enumerate(self.middleware):
            try:
                middleware.before_execute(run)
            except SkipTask as skip:
                return entered, skip
            except Exception:
                logger.exception("Middleware %r failed before task %s", middleware, run.message.id)
        return len(self.middleware), None

    def after_execute(self, run: TaskRun, entered: int) -> None:
        """Run the after_execute hooks of the first ``entered`` middleware, last first."""
        for middleware in reversed(self.middleware[:entered]):
            _call(middleware.after_execute, run)

    def settled(self, run: TaskRun) -> None:
        """Run the on_success, on_failure, on_retry or on_skip hooks, as the state says."""
        name = _SETTLED[run.state]
        for middleware in self.middleware:
            _call(getattr(middleware, name), run)

    def after_ack(self, runs: Sequence[TaskRun]) -> None:
        if runs:
            for middleware in self.middleware:
                _call(middleware.after_ack, runs)


def _call(hook: Any, argument: Any) -> None:
    """Call one hook; its failure is logged, never raised (SkipTask is no exception here)."""
    try:
        hook(argument)
    except Exception:
        logger.exception("Middleware hook %s failed", getattr(hook, "__qualname__", hook))
