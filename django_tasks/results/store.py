"""The result store over the TaskResult model."""

from __future__ import annotations

import traceback as tb
from collections.abc import Sequence
from inspect import isclass
from typing import Any

from django.db import router
from django.utils.module_loading import import_string

from ..exceptions import TaskFailedError
from ..models import TaskResult
from ..states import TaskState

#: Columns a STARTED write may change: it must keep the errors of earlier attempts.
STARTED_FIELDS = [
    "state",
    "task_name",
    "queue",
    "priority",
    "args",
    "kwargs",
    "worker",
    "worker_ids",
    "retries",
    "root_id",
    "parent_id",
    "group_id",
    "enqueued_at",
    "started_at",
    "reason",
]
FINISHED_FIELDS = [
    *STARTED_FIELDS,
    "result",
    "exception_type",
    "exception_message",
    "traceback",
    "errors",
    "date_done",
]


class ResultStore:
    """Reads and writes TaskResult rows on the database the router picks for them."""

    @property
    def using(self) -> str:
        return router.db_for_write(TaskResult)

    def get(self, task_id: str) -> TaskResult | None:
        return TaskResult.objects.using(router.db_for_read(TaskResult)).filter(pk=task_id).first()

    def save_started(self, results: Sequence[TaskResult]) -> None:
        """Insert or update rows as STARTED, keeping what earlier attempts recorded."""
        self._upsert(results, STARTED_FIELDS)

    def save_finished(self, results: Sequence[TaskResult]) -> None:
        """Insert or update final rows in one statement; failures keep earlier attempts' errors."""
        failed = {r.id: r for r in results if r.errors and r.retries}
        if failed:
            previous = dict(
                TaskResult.objects.using(self.using)
                .filter(pk__in=list(failed))
                .values_list("pk", "errors")
            )
            for task_id, result in failed.items():
                earlier = previous.get(task_id) or []
                result.errors = [*earlier[: max(0, result.retries)], *result.errors[-1:]]
        self._upsert(results, FINISHED_FIELDS)

    def _upsert(self, results: Sequence[TaskResult], fields: list[str]) -> None:
        if not results:
            return
        TaskResult.objects.using(self.using).bulk_create(
            results, update_conflicts=True, unique_fields=["id"], update_fields=fields
        )

    def delete(self, task_id: str) -> None:
        TaskResult.objects.using(self.using).filter(pk=task_id).delete()


def error_entry(exc: BaseException) -> dict[str, Any]:
    """What the store keeps of an exception: its class path, message, args and traceback."""
    exc_type = type(exc)
    try:
        from ..messages import _encoder

        _encoder.encode(list(exc.args))
        args: list[Any] | None = list(exc.args)
    except (TypeError, ValueError):
        args = None
    return {
        "exception_class_path": f"{exc_type.__module__}.{exc_type.__qualname__}",
        "message": str(exc),
        "args": args,
        "traceback": "".join(tb.format_exception(exc)),
    }


def rebuild_exception(exception_type: str, message: str, args: list[Any] | None) -> BaseException:
    """The stored exception as an instance of its own class, or TaskFailedError if impossible."""
    try:
        cls = import_string(exception_type)
    except (ImportError, ValueError):
        return TaskFailedError(exception_type, message)
    if not isclass(cls) or not issubclass(cls, BaseException):
        return TaskFailedError(exception_type, message)
    for call_args in ([*args] if args is not None else None, [message]):
        if call_args is None:
            continue
        try:
            exc = cls(*call_args)
        except Exception:  # noqa: S112 - any constructor may refuse our arguments
            continue
        if str(exc) == message:
            return exc
    return TaskFailedError(exception_type, message)


def is_ready(state: str) -> bool:
    return state in (TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED)
