"""The drain task of the comparison; the no-op is bench.benchapp.tasks.noop."""

from counter import bump

from django_tasks import task


@task
def count() -> None:
    bump()
