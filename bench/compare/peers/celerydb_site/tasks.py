"""The benchmark's tasks."""

from celery import shared_task
from counter import bump


@shared_task
def noop() -> None:
    return None


@shared_task
def count() -> None:
    bump()
