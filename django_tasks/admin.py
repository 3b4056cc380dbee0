"""Admin: results (read-only; revoke, retry), dead letters (requeue), workers, the queue, the
outbox (publish now)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.db import DatabaseError
from django.db.models import QuerySet
from django.http import HttpRequest
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .exceptions import DecodeError, TasksError
from .messages import decode
from .models import DeadLetter, OutboxMessage, QueuedMessage, TaskResult, Worker
from .states import READY_STATES, TaskState

#: The states of the results the retry action sends again.
RETRIABLE_STATES = frozenset({TaskState.FAILURE, TaskState.REVOKED})


def _tell(
    model_admin: admin.ModelAdmin, request: HttpRequest, count: int, singular: str,
    plural: str, level: int,
) -> None:  # fmt: skip
    """Report ``count`` things done (nothing when there are none)."""
    if count:
        model_admin.message_user(request, ngettext(singular, plural, count) % count, level)


def _holds_change_permission(model_admin: admin.ModelAdmin, request: HttpRequest) -> bool:
    """Whether the user holds the change permission of the model, which nobody edits here.

    Read-only admins answer False to has_change_permission(): their actions look it up
    themselves.
    """
    codename = get_permission_codename("change", model_admin.opts)
    return request.user.has_perm(f"{model_admin.opts.app_label}.{codename}")


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written by workers: viewable, deletable, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TaskResult)
class TaskResultAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "task_name",
        "state",
        "queue",
        "enqueued_at",
        "date_done",
        "duration",
        "retries",
        "worker",
    ]
    list_filter = ["state", "task_name", "queue", "date_done"]
    search_fields = ["id", "task_name", "worker"]
    date_hierarchy = "enqueued_at"
    list_per_page = 50
    show_full_result_count = False
    fieldsets = [
        (None, {"fields": ["id", "task_name", "state", "reason", "queue", "priority"]}),
        (_("Call"), {"fields": ["args", "kwargs"]}),
        (
            _("Outcome"),
            {"fields": ["result", "exception_type", "exception_message", "traceback", "errors"]},
        ),
        (
            _("Execution"),
            {
                "fields": [
                    "worker",
                    "worker_ids",
                    "retries",
                    "enqueued_at",
                    "started_at",
                    "date_done",
                    "root_id",
                    "parent_id",
                    "group_id",
                ]
            },
        ),
    ]
    actions = ["revoke", "retry"]

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        """Whether the user holds the change permission of results."""
        return _holds_change_permission(self, request)

    def has_retry_permission(self, request: HttpRequest) -> bool:
        """Retrying takes the same permission as revoking."""
        return self.has_revoke_permission(request)

    @admin.action(description=_("Revoke the selected tasks"), permissions=["revoke"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[TaskResult]) -> None:
        """Revoke each unfinished task (see AsyncResult.revoke()); finished ones are left alone."""
        from .result import AsyncResult

        done, finished, failed = 0, 0, []
        for task_id, state in queryset.values_list("pk", "state"):
            if state in READY_STATES:
                finished += 1
                continue
            try:
                AsyncResult(task_id).revoke()
            except TasksError as exc:
                # The state is stored before the broker is asked: the revoke stands.
                failed.append(f"{task_id}: {exc}")
            done += 1
        _tell(self, request, done, "%d task revoked.", "%d tasks revoked.", messages.SUCCESS)
        _tell(
            self,
            request,
            finished,
            "%d task had already finished: it was left as it was.",
            "%d tasks had already finished: they were left as they were.",
            messages.WARNING,
        )
        for failure in failed:
            self.message_user(
                request,
                _("Revoked, but its message stays queued (workers will skip it): %s") % failure,
                messages.WARNING,
            )

    @admin.action(description=_("Retry the selected tasks"), permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: QuerySet[TaskResult]) -> None:
        """Send each failed or revoked task again under a new id.

        The new task has the same name, arguments, queue and priority; the old result stays.
        """
        from .backend import get_backend, resolve_task

        backend = get_backend()
        fields = ["pk", "state", "task_name", "args", "kwargs", "queue", "priority"]
        done, skipped, failed = 0, 0, []
        for task_id, state, name, args, kwargs, queue, priority in queryset.values_list(*fields):
            if state not in RETRIABLE_STATES:
                skipped += 1
                continue
            try:
                task = resolve_task(name)
                backend.send(task, list(args), dict(kwargs), queue=queue or None, priority=priority)
            except (TaskResultDoesNotExist, InvalidTask, TasksError) as exc:
                failed.append(f"{task_id}: {exc}")
                continue
            done += 1
        _tell(self, request, done, "%d task sent again.", "%d tasks sent again.", messages.SUCCESS)
        _tell(
            self,
            request,
            skipped,
            "%d task was not retried: only failed or revoked tasks are.",
            "%d tasks were not retried: only failed or revoked tasks are.",
            messages.WARNING,
        )
        for failure in failed:
            self.message_user(request, _("Not retried: %s") % failure, messages.ERROR)


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ["created_at", "task_name", "task_id", "queue", "reason", "worker"]
    list_filter = ["queue", "task_name", "created_at"]
    search_fields = ["task_id", "task_name", "reason"]
    readonly_fields = ["task_id", "task_name", "queue", "reason", "body", "worker", "created_at"]
    actions = ["requeue"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description=_("Requeue the selected messages"), permissions=["change"])
    def requeue(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        """Publish each message again (as it was) and delete its dead letter."""
        from .backend import get_backend

        broker = get_backend().broker
        done, failed = 0, []
        for letter in queryset:
            try:
                broker.publish(decode(letter.body))
            except (DecodeError, TasksError) as exc:
                failed.append(f"{letter.pk}: {exc}")
                continue
            letter.delete()
            done += 1
        _tell(
            self, request, done, "%d message requeued.", "%d messages requeued.", messages.SUCCESS
        )
        for failure in failed:
            self.message_user(request, _("Not requeued: %s") % failure, messages.ERROR)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = [
        "name",
        "alive",
        "queues",
        "concurrency",
        "pool",
        "processed",
        "started_at",
        "last_seen",
        "stopped_at",
    ]
    list_filter = ["hostname", "pool"]
    search_fields = ["name", "hostname"]

    @admin.display(boolean=True, description=_("alive"))
    def alive(self, obj: Worker) -> bool:
        return obj.is_alive()


@admin.register(QueuedMessage)
class QueuedMessageAdmin(ReadOnlyAdmin):
    list_display = [
        "task_id",
        "queue",
        "priority",
        "available_at",
        "leased_until",
        "delivery_count",
        "created_at",
    ]
    list_filter = ["queue", "priority"]
    search_fields = ["task_id"]


@admin.register(OutboxMessage)
class OutboxMessageAdmin(ReadOnlyAdmin):
    """Messages sent inside transactions that are not published yet (see outbox.py)."""

    list_display = ["task_id", "task_name", "queue", "created_at", "attempts", "last_error"]
    list_filter = ["backend", "queue", "task_name"]
    search_fields = ["task_id", "task_name"]
    actions = ["publish_now"]

    def has_publish_now_permission(self, request: HttpRequest) -> bool:
        """Whether the user holds the change permission of outbox messages."""
        return _holds_change_permission(self, request)

    @admin.action(description=_("Publish the selected messages now"), permissions=["publish_now"])
    def publish_now(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        """Publish each message to its backend's broker and delete its row.

        Rows a worker is publishing at the same moment are left to it.
        """
        from .backend import get_backend
        from .outbox import publish

        done, failed = 0, []
        for alias in queryset.order_by().values_list("backend", flat=True).distinct():
            try:
                done += publish(get_backend(alias).broker, queryset.filter(backend=alias))
            except (TasksError, DatabaseError) as exc:
                failed.append(f"{alias}: {exc}")
        _tell(
            self, request, done, "%d message published.", "%d messages published.",
            messages.SUCCESS,
        )  # fmt: skip
        for failure in failed:
            self.message_user(request, _("Not published: %s") % failure, messages.ERROR)
