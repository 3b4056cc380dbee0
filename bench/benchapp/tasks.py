"""The benchmark's tasks: they do nothing, so the figures measure the queue, not the work."""

from django_tasks import task


@task
def noop() -> None:
    return None
