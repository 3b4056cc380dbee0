"""The benchmark's tasks, with Django's own ``@task``."""

from counter import bump
from django.tasks import task


@task
def noop() -> None:
    return None


@task
def count() -> None:
    bump()
