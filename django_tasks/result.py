"""AsyncResult: a handle on one task's result, read from the result store."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.tasks import DEFAULT_TASK_BACKEND_ALIAS

from .exceptions import BrokerError, TaskRevokedError, TimeoutError
from .registry import backend_for
from .results.store import REVOKED, TERMINATED, ResultStore, rebuild_exception
from .states import READY_STATES, TaskState

if TYPE_CHECKING:
    from .backend import TasksBackend
    from .messages import Message
    from .models import TaskResult


class AsyncResult:
    """The result of a task by id. Any id reads as PENDING until a worker records it."""

    def __init__(
        self,
        id: str,
        *,
        backend: str = DEFAULT_TASK_BACKEND_ALIAS,
        task_name: str | None = None,
    ) -> None:
        self.id = id
        self.backend_alias = backend
        self.task_name = task_name
        self._row: TaskResult | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult: {self.id}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncResult):
            return self.id == other.id
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def backend(self) -> TasksBackend:
        return backend_for(self.backend_alias)

    def _fetch(self) -> TaskResult | None:
        """The stored row; once the task is finished it is cached and never read again."""
        if self._row is not None and self._row.state in READY_STATES:
            return self._row
        self._row = ResultStore().get(self.id)
        return self._row

    @property
    def state(self) -> str:
        """PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        row = self._fetch()
        return TaskState.PENDING if row is None else row.state

    status = state

    def ready(self) -> bool:
        """Whether the task has finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in READY_STATES

    def successful(self) -> bool:
        return self.state == TaskState.SUCCESS

    def failed(self) -> bool:
        return self.state == TaskState.FAILURE

    @property
    def result(self) -> Any:
        """The return value, the exception when it failed, or None while unfinished."""
        row = self._fetch()
        if row is None:
            return None
        if row.state == TaskState.FAILURE:
            return self._exception(row)
        if row.state == TaskState.REVOKED:
            return TaskRevokedError(row.reason or "revoked")
        return row.result if row.state == TaskState.SUCCESS else None

    info = result

    @property
    def traceback(self) -> str | None:
        row = self._fetch()
        return row.traceback or None if row is not None else None

    @property
    def date_done(self) -> datetime | None:
        row = self._fetch()
        return row.date_done if row is not None else None

    @property
    def retries(self) -> int:
        row = self._fetch()
        return row.retries if row is not None else 0

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the task to finish and return its value.

        A failed task's exception is raised (same type and message), or returned when
        ``propagate`` is false. Raises django_tasks.exceptions.TimeoutError (a TimeoutError)
        after ``timeout`` seconds.
        """
        row = self._wait(timeout)
        if row.state == TaskState.SUCCESS:
            return row.result
        error = self._exception(row) if row.state == TaskState.FAILURE else None
        if error is None:
            error = TaskRevokedError(f"Task {self.id} was revoked: {row.reason or 'revoked'}")
        if propagate:
            raise error
        return error

    wait = get

    def _wait(self, timeout: float | None) -> TaskResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        # Registered before the first read: a result stored after that read is announced to it.
        with self.backend.broker.result_waiter(self.id) as waiter:
            while True:
                row = self._fetch()
                if row is not None and row.state in READY_STATES:
                    return row
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"Task {self.id} did not finish within {timeout} s.")
                waiter.wait(min(remaining, 1.0))

    @staticmethod
    def _exception(row: TaskResult) -> BaseException:
        args = row.errors[-1].get("args") if row.errors else None
        return rebuild_exception(row.exception_type, row.exception_message, args)

    def revoke(self, terminate: bool = False) -> None:
        """Revoke the task: it will not run, or, with ``terminate``, it is stopped if running.

        The task is stored as REVOKED, with the reason ``"revoked"`` (``"terminated"`` with
        ``terminate``), then its message is removed from the queue if no worker holds it yet.
        A worker skips a task revoked before it starts; a task already running carries on
        unless ``terminate`` is true. A task that has finished keeps its state, and an unknown
        id is simply recorded as revoked: revoking is always safe.

        After a revoke, ``state`` is REVOKED (unless the task had finished), ``result`` is a
        TaskRevokedError and ``get()`` raises it.

        Raises BrokerConnectionError when the broker cannot be reached; the state is stored by
        then, so workers skip the task all the same.
        """
        backend = self.backend
        queues = backend.known_queues()
        message: Message | None
        try:
            # Only to fill in the row of a task still queued (its name, arguments, queue...).
            message = backend.broker.find(self.id, queues)
        except BrokerError:
            message = None
        ResultStore().revoke(
            self.id,
            reason=TERMINATED if terminate else REVOKED,
            task_name=self.task_name or "",
            message=message,
        )
        self._row = None
        backend.broker.revoke(self.id, queues)
        # Wake callers waiting for it: a task revoked before it ran has no worker to announce it.
        backend.broker.notify_results([self.id])

    def forget(self) -> None:
        """Delete the stored result."""
        ResultStore().delete(self.id)
        self._row = None
