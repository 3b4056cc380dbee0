"""django_tasks, for bench/compare/peers/client.py.

Worker: ``manage.py runworker -c 2 --pool process`` (or ``--pool thread``). The round trip is
``noop.delay().get(timeout=...)``; the bulk API is ``Task.delay_many()`` (one argument tuple per
task, one round trip per call).
"""

from __future__ import annotations

from djangobase import flush, migrate, setup

DISTRIBUTIONS = ["django-tasks-runtime", "Django", "redis", "hiredis", "psycopg"]
BULK_API = "Task.delay_many()"
purge = flush
__all__ = ["migrate", "purge"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from dt_site.tasks import count

    count.delay()


def enqueue_bulk(n: int) -> None:
    from dt_site.tasks import count

    count.delay_many([() for _ in range(n)])


def round_trip(timeout: float) -> None:
    from dt_site.tasks import noop

    noop.delay().get(timeout=timeout)
