"""The exceptions raised by django_tasks. Configuration errors subclass ImproperlyConfigured."""

import builtins

from django.core.exceptions import ImproperlyConfigured
from django.tasks.exceptions import TaskException


class TasksError(TaskException):
    """Base class of every runtime error raised by django_tasks."""


class ConfigurationError(ImproperlyConfigured):
    """The TASKS setting (or an option of it) is invalid."""


class MessageError(TasksError):
    """A message could not be encoded, decoded or accepted."""


class EncodeError(MessageError, TypeError):
    """The task's arguments are not JSON-serialisable."""


class DecodeError(MessageError):
    """A message in the broker is not a valid envelope; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MessageTooLarge(MessageError, ValueError):
    """The encoded message is larger than OPTIONS["MAX_MESSAGE_SIZE"]."""


class BrokerError(TasksError):
    """The broker failed to carry out an operation."""


class BrokerConnectionError(BrokerError, ConnectionError):
    """The broker cannot be reached (after the bounded connection wait)."""


class TimeoutError(TasksError, builtins.TimeoutError):
    """AsyncResult.get() waited longer than its timeout."""


class TaskFailedError(TasksError):
    """A task failed with an exception that cannot be rebuilt in this process."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(f"{exception_type}: {message}")
        self.exception_type = exception_type
        self.message = message


class TaskRevokedError(TasksError):
    """The task was revoked (or expired) before it could finish."""


class Retry(TasksError):
    """Raised by ``Task.retry()``: the worker schedules another attempt instead of failing."""

    def __init__(self, message: str = "", *, exc: BaseException | None = None,
                 when: float | None = None) -> None:  # fmt: skip
        super().__init__(message or f"Retry in {when}s: {exc!r}")
        self.exc = exc
        self.when = when


class MaxRetriesExceededError(TasksError):
    """``Task.retry()`` was called after the last attempt allowed by ``max_retries``."""


class SoftTimeLimitExceeded(Exception):
    """Raised inside a task that ran past its ``soft_time_limit``; the task may clean up."""


class TimeLimitExceeded(TasksError):
    """The task ran past its ``time_limit`` and its pool process was stopped."""


class RetryNotSent(TasksError):
    """The task asked for a retry whose message could not be sent (too large, say)."""


class ResultRefused(TasksError):
    """The database refused to store the task's result (or arguments, or error) as they were."""


class WorkerLostError(TasksError):
    """The pool process running the task died (killed, crashed or out of memory)."""


class Terminated(BaseException):
    """Raised inside a running task revoked with ``terminate=True``."""
