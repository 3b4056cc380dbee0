"""django_tasks, for bench/compare/peers/client.py.

Worker: ``manage.py runworker -c 2 --pool process`` (or ``--pool thread``). The round trip is
``noop.delay().get(timeout=...)``. The bulk API is used if the task has ``delay_many`` (it takes
one argument tuple per task); django_tasks has none yet, so the report says n/a.
"""

from __future__ import annotations

from djangobase import flush, migrate, setup

DISTRIBUTIONS = ["django-tasks-runtime", "Django", "redis", "psycopg"]
BULK_API = "Task.delay_many()"
purge = flush
__all__ = ["migrate", "purge"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from dt_site.tasks import count

    count.delay()


def _enqueue_bulk(n: int) -> None:
    from dt_site.tasks import count

    count.delay_many([() for _ in range(n)])


def _has_bulk() -> bool:
    from django_tasks.task import Task

    return hasattr(Task, "delay_many")


def __getattr__(name: str) -> object:
    # Resolved on first use: the bulk API appears only when django_tasks gains one.
    if name == "enqueue_bulk":
        return _enqueue_bulk if _has_bulk() else None
    raise AttributeError(name)


def round_trip(timeout: float) -> None:
    from bench.benchapp.tasks import noop

    noop.delay().get(timeout=timeout)
