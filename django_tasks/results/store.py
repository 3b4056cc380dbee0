"""The result store over the TaskResult model."""

from __future__ import annotations

import logging
import traceback as tb
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from inspect import isclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connections, router
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from ..exceptions import ResultRefused, TaskFailedError
from ..messages import Message
from ..models import TaskResult
from ..states import UNREADY_STATES, TaskState
from .bulk import prepared_upsert

logger = logging.getLogger("django_tasks.results")

#: Errors that writing again may cure: the database could not be reached, was locked or busy.
RETRYABLE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` says the database refused the values written, so writing them again
    would fail again: a data error (a NUL character in PostgreSQL's jsonb, a value too long
    for its column), an integrity error, or a value that cannot even be encoded for it.
    """
    if isinstance(exc, RETRYABLE_ERRORS):
        return False
    return isinstance(exc, DatabaseError | ValueError | TypeError | RecursionError)


#: The reason AsyncResult.revoke() stores: a task not started yet is skipped, a running one
#: carries on.
REVOKED = "revoked"
#: The reason AsyncResult.revoke(terminate=True) stores: a running task is stopped as well.
TERMINATED = "terminated"


def message_columns(message: Message) -> dict[str, Any]:
    """The TaskResult columns that come from a task's message, by column name.

    The one place a message's fields are copied into a row: a field stored in both is added
    here (and to the model).
    """
    return {
        "task_name": message.task,
        "queue": message.queue,
        "priority": message.priority,
        "args": message.args,
        "kwargs": message.kwargs,
        "retries": message.retries,
        "root_id": message.root_id or "",
        "parent_id": message.parent_id or "",
        "group_id": message.group_id or "",
        "enqueued_at": _datetime(message.enqueued_at),
    }


def _datetime(timestamp: float) -> datetime:
    """A Unix time as the database wants it: aware, or naive in TIME_ZONE without USE_TZ."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return when if settings.USE_TZ else timezone.make_naive(when)


#: The columns message_columns() fills (its keys; the app is loaded, so settings are readable).
MESSAGE_COLUMNS = tuple(message_columns(Message(id="", task="", enqueued_at=0.0)))
#: Columns a STARTED write may change: it must keep the errors of earlier attempts.
STARTED_FIELDS = ["state", *MESSAGE_COLUMNS, "worker", "worker_ids", "started_at", "reason"]
FINISHED_FIELDS = [
    *STARTED_FIELDS,
    "result",
    "exception_type",
    "exception_message",
    "traceback",
    "errors",
    "date_done",
]


def _select_by_id(using: str) -> str:
    """SELECT every column of one TaskResult row by primary key, on the database ``using``."""
    qn = connections[using].ops.quote_name
    meta = TaskResult._meta
    select = ", ".join(qn(str(field.column)) for field in meta.concrete_fields)
    pk = qn(str(meta.get_field("id").column))
    return f"SELECT {select} FROM {qn(meta.db_table)} WHERE {pk} = %s"  # noqa: S608


class ResultStore:
    """Reads and writes TaskResult rows on the database the router picks for them."""

    @property
    def using(self) -> str:
        return router.db_for_write(TaskResult)

    def get(self, task_id: str) -> TaskResult | None:
        """The row of ``task_id``, or None.

        AsyncResult.get() reads it before it waits and again when woken. ``raw()`` makes the
        row as the ORM does, without building and compiling a query each time, which costs
        twice the read itself (about 0.3 ms of a 2.5 ms round trip).
        """
        using = router.db_for_read(TaskResult)
        rows = TaskResult.objects.db_manager(using).raw(_select_by_id(using), [task_id])
        return next(iter(rows), None)

    def save_started(self, results: Sequence[TaskResult]) -> None:
        """Insert or update rows as STARTED, keeping what earlier attempts recorded.

        A row revoked meanwhile stays REVOKED: the worker sees it and stops (or skips) the task.
        """
        rows = TaskResult.objects.using(self.using)
        for result in results:
            fields = {name: getattr(result, name) for name in STARTED_FIELDS}
            if not rows.filter(pk=result.pk).exclude(state=TaskState.REVOKED).update(**fields):
                rows.bulk_create([result], ignore_conflicts=True)

    def save_finished(self, results: Sequence[TaskResult]) -> None:
        """Insert or update final (or RETRY) rows in one statement.

        A row of a later attempt keeps the errors of the earlier ones: Django's
        TaskResult.errors lists every failed attempt.
        """
        self.prepare_finished(results)()

    def prepare_finished(self, results: Sequence[TaskResult]) -> Callable[[], None]:
        """save_finished() in two steps: the rows are made ready now (the errors of earlier
        attempts read, the values encoded); the returned call writes them with one statement.

        The worker calls it before the transaction that writes them with its acks.
        """
        self._add_earlier_errors(results)
        return prepared_upsert(self.using, results, FINISHED_FIELDS)

    def save_finished_or_lean(self, results: Sequence[TaskResult]) -> list[TaskResult]:
        """save_finished(), where the database refuses no row for good.

        When the batch is refused (see is_refusal()), each row is written alone; a row the
        database refuses is replaced by a lean one: FAILURE with ResultRefused, which says
        what was refused, without the arguments, result and traceback that may hold the
        offending value. The other rows of the batch are stored as they are. Returns the rows
        not even a lean row could store (an id too long for its column). Connection errors
        are raised: the caller writes again later.
        """
        try:
            self.save_finished(results)
            return []
        except Exception as exc:
            if not is_refusal(exc):
                raise
        unstored = []
        for result in results:
            try:
                self.save_finished([result])
                continue
            except Exception as exc:
                if not is_refusal(exc):
                    raise
                refusal = exc
            try:
                self.save_finished([lean_row(result, refusal)])
            except Exception as exc:
                if not is_refusal(exc):
                    raise
                logger.error("The result store refused task %s[%s] even without its values: "
                             "%s", result.task_name, result.id, _one_line(exc))  # fmt: skip
                unstored.append(result)
        return unstored

    def _add_earlier_errors(self, results: Sequence[TaskResult]) -> None:
        """Put the errors of earlier attempts before those of this one (one query, if any)."""
        later = {r.id: r for r in results if len(r.worker_ids) > 1 and not r._earlier_errors}
        if not later:
            return
        previous = dict(
            TaskResult.objects.using(self.using)
            .filter(pk__in=list(later))
            .values_list("pk", "errors")
        )
        for task_id, result in later.items():
            result.errors = [*(previous.get(task_id) or []), *result.errors]
            result._earlier_errors = True  # A retried write must not add them twice.

    def fail(
        self, task_id: str, exc: BaseException, *, task_name: str = "", queue: str = ""
    ) -> None:
        """Mark a task FAILURE with ``exc`` because its worker could not (it died)."""
        row = TaskResult.objects.using(self.using).filter(pk=task_id).first()
        if row is None:  # It died before its STARTED row was due.
            row = TaskResult(id=task_id, task_name=task_name, queue=queue)
        entry = error_entry(exc)
        row.state = TaskState.FAILURE
        row.exception_type = entry["exception_class_path"]
        row.exception_message = entry["message"]
        row.traceback = entry["traceback"]
        row.errors = [*row.errors, entry]
        row.date_done = timezone.now()
        row.save(using=self.using)

    def revoke(
        self,
        task_id: str,
        *,
        reason: str,
        task_name: str = "",
        message: Message | None = None,
    ) -> None:
        """Mark ``task_id`` REVOKED with ``reason``, creating its row if there is none yet.

        A finished task (SUCCESS, FAILURE, or REVOKED already) is left as it is, except that
        TERMINATED replaces the reason REVOKED, so that a revoked task still running can be
        stopped after all. ``message``, the task's message if it is still queued, fills in the
        row made for a task no worker has started. Two queries.
        """
        now = timezone.now()
        columns = {"task_name": task_name} if message is None else message_columns(message)
        row = TaskResult(
            id=task_id, state=TaskState.REVOKED, reason=reason, date_done=now, **columns
        )
        results = TaskResult.objects.using(self.using)
        # Insert, then update: a worker that writes the row in between (STARTED) is revoked by
        # the update, instead of silently winning over the insert.
        results.bulk_create([row], ignore_conflicts=True)
        revocable = Q(state__in=UNREADY_STATES)
        if reason == TERMINATED:
            revocable |= Q(state=TaskState.REVOKED, reason=REVOKED)
        results.filter(revocable, pk=task_id).update(
            state=TaskState.REVOKED, reason=reason, date_done=now
        )

    def is_revoked(self, task_id: str) -> bool:
        return (
            TaskResult.objects.using(self.using)
            .filter(pk=task_id, state=TaskState.REVOKED)
            .exists()
        )

    def delete(self, task_id: str) -> None:
        TaskResult.objects.using(self.using).filter(pk=task_id).delete()

    def delete_expired(
        self, older_than: timedelta, *, batch_size: int = 1000, max_batches: int = 10
    ) -> int:
        """Delete finished results done more than ``older_than`` ago; return how many.

        In batches of ``batch_size`` rows, each one short statement (no long lock on a big
        table), at most ``max_batches`` per call: what is left goes with the next call.
        Unfinished rows are kept, however old.
        """
        results = TaskResult.objects.using(self.using)
        deleted = 0
        for _ in range(max_batches):
            expired = results.expired(older_than).order_by().values_list("pk", flat=True)
            batch = list(expired[:batch_size])
            if batch:
                deleted += results.filter(pk__in=batch).delete()[0]
            if len(batch) < batch_size:
                break
        return deleted


def lean_row(result: TaskResult, refusal: BaseException) -> TaskResult:
    """``result`` as FAILURE with ResultRefused, without the values that may have been refused.

    The arguments, result, traceback and errors are left out; text columns are cut to their
    length; the error message says what the database refused.
    """
    what = "the result" if result.state == TaskState.SUCCESS else "the row"
    error = ResultRefused(
        f"The result store refused {what} of this task: {_one_line(refusal)}. Its arguments, "
        "result and traceback were left out of this row."
    )
    logger.error("Task %s[%s]: %s", result.task_name, result.id, error)
    entry = error_entry(error)
    entry["traceback"] = ""
    # A retried or revoked task keeps its state; any other ends FAILURE.
    kept = result.state in (TaskState.RETRY, TaskState.REVOKED)
    lean = TaskResult.build(
        id=result.id,
        state=result.state if kept else TaskState.FAILURE,
        reason=result.reason,
        exception_type=entry["exception_class_path"],
        exception_message=str(error),
        errors=[entry],
        date_done=result.date_done or timezone.now(),
        **{name: getattr(result, name) for name in _LEAN_KEPT},
    )
    for field in TaskResult._meta.concrete_fields:
        value = getattr(lean, field.attname)
        if isinstance(value, str):
            value = value.replace("\x00", "")
            if field.max_length is not None and not field.primary_key:
                value = value[: field.max_length]
            setattr(lean, field.attname, value)
    lean._earlier_errors = True  # Earlier attempts' errors may be what was refused.
    return lean


#: The columns a lean row keeps from the refused one (besides its id): not the arguments,
#: which may hold what was refused.
_LEAN_KEPT = (*(c for c in MESSAGE_COLUMNS if c not in ("args", "kwargs")), "worker",
              "worker_ids", "started_at")  # fmt: skip


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, without NUL characters (for rows and logs)."""
    return " ".join(str(exc).replace("\x00", "").split()) or type(exc).__name__


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
