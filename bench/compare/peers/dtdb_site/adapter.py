"""django-tasks-db, for bench/compare/peers/client.py.

Worker: two ``manage.py db_worker`` processes (one task at a time each; it polls every 1 s when
idle). ``django.tasks`` has no call that waits for a result: the round trip polls
``TaskResult.refresh()`` every POLL_SECONDS.
"""

from __future__ import annotations

import time

from djangobase import flush, migrate, setup

DISTRIBUTIONS = ["django-tasks-db", "Django", "psycopg"]
BULK_API = None
POLL_SECONDS = 0.002
enqueue_bulk = None
purge = flush
__all__ = ["migrate", "purge"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from dtdb_site.tasks import count

    count.enqueue()


def round_trip(timeout: float) -> None:
    from dtdb_site.tasks import noop

    result = noop.enqueue()
    give_up = time.monotonic() + timeout
    while not result.is_finished:
        if time.monotonic() > give_up:
            raise TimeoutError(f"task {result.id} not finished")
        time.sleep(POLL_SECONDS)
        result.refresh()
    if result.status != "SUCCESSFUL":
        raise RuntimeError(f"task {result.id}: {result.status}")
