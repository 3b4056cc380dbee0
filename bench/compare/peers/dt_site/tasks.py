"""The drain task of the comparison, and the no-op of its round trips."""

from counter import bump

from django_tasks import task


@task
def count() -> None:
    bump()


@task
def noop() -> None:
    return None
