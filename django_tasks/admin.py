"""Admin: results (read-only), dead letters (with requeue), workers and the database queue."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .exceptions import DecodeError, TasksError
from .messages import decode
from .models import DeadLetter, QueuedMessage, TaskResult, Worker


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
        if done:
            self.message_user(
                request,
                ngettext("%d message requeued.", "%d messages requeued.", done) % done,
                messages.SUCCESS,
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
