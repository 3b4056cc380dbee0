"""django-q2 (ORM broker), for bench/compare/peers/client.py.

Worker: ``manage.py qcluster`` with 2 workers. The round trip uses ``django_q.tasks.fetch(id,
wait=...)``, which polls the database every 10 ms (``result()`` cannot tell a ``None`` result
from a missing one).
"""

from __future__ import annotations

from djangobase import flush, migrate, setup

DISTRIBUTIONS = ["django-q2", "Django", "psycopg"]
BULK_API = None
enqueue_bulk = None
purge = flush
__all__ = ["migrate", "purge"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from django_q.tasks import async_task

    async_task("q2_site.tasks.count")


def round_trip(timeout: float) -> None:
    from django_q.tasks import async_task, fetch

    task = fetch(async_task("q2_site.tasks.noop"), wait=int(timeout * 1000))
    if task is None:
        raise TimeoutError("no result")
    if not task.success:
        raise RuntimeError(f"task failed: {task.result}")
