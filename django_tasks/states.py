"""One state vocabulary for the model, the admin, AsyncResult and the API."""

from django.db import models
from django.tasks import TaskResultStatus
from django.utils.translation import pgettext_lazy


class TaskState(models.TextChoices):
    """The life cycle of a task, as stored on TaskResult.state."""

    #: Waiting in the queue, or not known at all (an unknown id reads as PENDING).
    PENDING = "PENDING", pgettext_lazy("Task", "Pending")
    #: A worker is running it.
    STARTED = "STARTED", pgettext_lazy("Task", "Started")
    #: An attempt failed and another one is scheduled.
    RETRY = "RETRY", pgettext_lazy("Task", "Retry")
    #: Finished and returned a value.
    SUCCESS = "SUCCESS", pgettext_lazy("Task", "Success")
    #: Finished by raising an exception (after its last attempt).
    FAILURE = "FAILURE", pgettext_lazy("Task", "Failure")
    #: Will not run: revoked, or expired before a worker reached it.
    REVOKED = "REVOKED", pgettext_lazy("Task", "Revoked")


READY_STATES = frozenset({TaskState.SUCCESS, TaskState.FAILURE, TaskState.REVOKED})
UNREADY_STATES = frozenset({TaskState.PENDING, TaskState.STARTED, TaskState.RETRY})

#: How each of our states reads through Django's TaskResult.status.
DJANGO_STATUS: dict[str, TaskResultStatus] = {
    TaskState.PENDING: TaskResultStatus.READY,
    TaskState.STARTED: TaskResultStatus.RUNNING,
    TaskState.RETRY: TaskResultStatus.READY,
    TaskState.SUCCESS: TaskResultStatus.SUCCESSFUL,
    TaskState.FAILURE: TaskResultStatus.FAILED,
    TaskState.REVOKED: TaskResultStatus.FAILED,
}
