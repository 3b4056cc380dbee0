"""Results, the database broker's queue, the outbox, dead letters and worker heartbeats."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Q
from django.tasks.base import TASK_MAX_PRIORITY, TASK_MIN_PRIORITY
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .states import READY_STATES, TaskState


class TaskResultQuerySet(models.QuerySet["TaskResult"]):
    def finished(self) -> TaskResultQuerySet:
        return self.filter(state__in=READY_STATES)

    def expired(self, older_than: timedelta, now: datetime | None = None) -> TaskResultQuerySet:
        """Finished results whose ``date_done`` is older than ``older_than``."""
        return self.finished().filter(date_done__lt=(now or timezone.now()) - older_than)


class TaskResult(models.Model):
    """What happened to one task: the source of truth for AsyncResult and Django's get_result()."""

    id = models.CharField(_("task id"), max_length=255, primary_key=True)
    task_name = models.CharField(_("task name"), max_length=255)
    state = models.CharField(
        _("state"), max_length=16, choices=TaskState.choices, default=TaskState.PENDING
    )
    reason = models.CharField(_("reason"), max_length=255, blank=True)
    queue = models.CharField(_("queue"), max_length=255, blank=True)
    priority = models.SmallIntegerField(_("priority"), default=0)
    args = models.JSONField(_("arguments"), default=list)
    kwargs = models.JSONField(_("keyword arguments"), default=dict)
    result = models.JSONField(_("result"), null=True, blank=True)
    exception_type = models.CharField(_("exception type"), max_length=255, blank=True)
    exception_message = models.TextField(_("exception message"), blank=True)
    traceback = models.TextField(_("traceback"), blank=True)
    errors = models.JSONField(_("errors of every attempt"), default=list, blank=True)
    worker = models.CharField(_("worker"), max_length=255, blank=True)
    worker_ids = models.JSONField(_("workers of every attempt"), default=list, blank=True)
    retries = models.PositiveIntegerField(_("retries"), default=0)
    root_id = models.CharField(_("root id"), max_length=255, blank=True)
    parent_id = models.CharField(_("parent id"), max_length=255, blank=True)
    group_id = models.CharField(_("group id"), max_length=255, blank=True)
    enqueued_at = models.DateTimeField(_("enqueued at"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    date_done = models.DateTimeField(_("done at"), null=True, blank=True, db_index=True)

    objects = TaskResultQuerySet.as_manager()

    #: Set by the result store once the errors of earlier attempts are in ``errors``.
    _earlier_errors = False

    class Meta:
        verbose_name = _("task result")
        verbose_name_plural = _("task results")
        ordering = ["-enqueued_at"]
        # Every index costs each task's result a write. Declared here rather than with
        # db_index=True, PostgreSQL gets no second "_like" index per text column (it serves
        # only LIKE 'prefix%', which nothing here runs), and only grouped tasks enter
        # dt_result_group (migration 0002 also drops the primary key's "_like" index).
        indexes = [
            models.Index(fields=["task_name"], name="dt_result_task_name"),
            models.Index(fields=["group_id"], name="dt_result_group", condition=~Q(group_id="")),
            models.Index(fields=["state", "-date_done"], name="dt_result_state_done"),
            models.Index(fields=["-enqueued_at"], name="dt_result_enqueued"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(state__in=TaskState.values), name="dt_result_state_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.id}] {self.state}"

    @classmethod
    def build(cls, **values: Any) -> TaskResult:
        """A new, unsaved row: ``TaskResult(**values)``, at a third of the cost.

        The worker makes one per task; Django's positional constructor skips the per-keyword
        lookups of the keyword one. Columns not given get their defaults.
        """
        row = [values[name] if name in values else default() for name, default in _defaults()]
        return cls(*row)  # type: ignore[misc]  # (django-stubs checks the first column only)

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.date_done:
            return self.date_done - self.started_at
        return None


@functools.cache
def _defaults() -> list[tuple[str, Callable[[], Any]]]:
    """Each TaskResult column's attribute name and a callable giving its default."""
    return [(f.attname, f.get_default) for f in TaskResult._meta.concrete_fields]


class QueuedMessageQuerySet(models.QuerySet["QueuedMessage"]):
    """``now`` is a datetime, or an expression of the database's time (Now())."""

    def expired_leases(self, now: datetime | models.Expression) -> QueuedMessageQuerySet:
        return self.filter(leased_until__lt=now)


class QueuedMessage(models.Model):
    """A message waiting in (or leased from) a queue of the database broker."""

    task_id = models.CharField(_("task id"), max_length=255)
    queue = models.CharField(_("queue"), max_length=255)
    priority = models.SmallIntegerField(_("priority"), default=0)
    available_at = models.DateTimeField(_("available at"))
    delayed = models.BooleanField(_("delayed"), default=False)
    body = models.TextField(_("body"))
    leased_until = models.DateTimeField(_("leased until"), null=True, blank=True)
    lease_token = models.CharField(_("lease token"), max_length=64, blank=True)
    delivery_count = models.PositiveIntegerField(_("deliveries"), default=0)
    created_at = models.DateTimeField(_("created at"), default=timezone.now)

    objects = QueuedMessageQuerySet.as_manager()

    class Meta:
        verbose_name = _("queued message")
        verbose_name_plural = _("queued messages")
        indexes = [
            models.Index(
                "queue",
                models.F("priority").desc(),
                "available_at",
                "id",
                name="dt_queue_ready",
                condition=Q(leased_until__isnull=True),
            ),
            # When the next delayed message of a queue is due: one probe, however many wait
            # (made by a short claim, see database_sql.claim_sql).
            # Only rows published with an eta are in it, so that PostgreSQL can never pick it
            # for the claim (with stale statistics it did, and sorted the whole queue).
            models.Index(
                fields=["queue", "available_at"],
                name="dt_queue_delayed",
                condition=Q(leased_until__isnull=True, delayed=True),
            ),
            models.Index(
                fields=["leased_until"],
                name="dt_queue_leased",
                condition=Q(leased_until__isnull=False),
            ),
            models.Index(fields=["lease_token"], name="dt_queue_token"),
            models.Index(fields=["task_id"], name="dt_queue_task"),  # No "_like" twin.
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(priority__gte=TASK_MIN_PRIORITY, priority__lte=TASK_MAX_PRIORITY),
                name="dt_queue_priority_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.queue}: {self.task_id}"


class OutboxMessageQuerySet(models.QuerySet["OutboxMessage"]):
    def due(self, backend: str, written_before: datetime) -> OutboxMessageQuerySet:
        """The messages of ``backend`` written before ``written_before``, oldest first."""
        return self.filter(backend=backend, created_at__lt=written_before).order_by("created_at")


class OutboxMessage(models.Model):
    """A message sent inside a transaction, kept until the broker has it (see outbox.py).

    Written in the caller's transaction and deleted once published after the commit; a row that
    stays (the broker was down, or the sending process died first) is published by a worker.
    """

    # Made here, not by the database: bulk_create() cannot read generated keys everywhere.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    backend = models.CharField(_("backend"), max_length=255)
    task_id = models.CharField(_("task id"), max_length=255)
    task_name = models.CharField(_("task name"), max_length=255)
    queue = models.CharField(_("queue"), max_length=255)
    body = models.TextField(_("body"))
    created_at = models.DateTimeField(_("written at"), default=timezone.now)
    attempts = models.PositiveIntegerField(_("failed attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True)

    objects = OutboxMessageQuerySet.as_manager()

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox messages")
        ordering = ["created_at"]
        indexes = [models.Index(fields=["backend", "created_at"], name="dt_outbox_due")]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]"


class DeadLetter(models.Model):
    """A message no worker could run (bad JSON, unknown task, ...), kept with the reason."""

    task_id = models.CharField(_("task id"), max_length=255, blank=True, db_index=True)
    task_name = models.CharField(_("task name"), max_length=255, blank=True)
    queue = models.CharField(_("queue"), max_length=255)
    reason = models.TextField(_("reason"))
    body = models.TextField(_("body"))
    worker = models.CharField(_("worker"), max_length=255, blank=True)
    created_at = models.DateTimeField(_("dead-lettered at"), default=timezone.now, db_index=True)

    class Meta:
        verbose_name = _("dead letter")
        verbose_name_plural = _("dead letters")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.task_name or '?'}[{self.task_id or '?'}]: {self.reason}"


class Worker(models.Model):
    """A running (or lately running) worker, kept fresh by its heartbeat."""

    name = models.CharField(_("name"), max_length=255, unique=True)
    hostname = models.CharField(_("hostname"), max_length=255)
    pid = models.PositiveIntegerField(_("pid"))
    backend = models.CharField(_("backend"), max_length=255, default="default")
    queues = models.JSONField(_("queues"), default=list)
    concurrency = models.PositiveIntegerField(_("concurrency"), default=1)
    pool = models.CharField(_("pool"), max_length=16)
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    last_seen = models.DateTimeField(_("last seen"), default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(_("stopped at"), null=True, blank=True)
    processed = models.PositiveBigIntegerField(_("tasks processed"), default=0)

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return self.name

    def is_alive(self, now: datetime | None = None, grace: float = 30.0) -> bool:
        now = now or timezone.now()
        return self.stopped_at is None and (now - self.last_seen).total_seconds() < grace
