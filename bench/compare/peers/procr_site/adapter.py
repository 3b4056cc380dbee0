"""procrastinate, for bench/compare/peers/client.py.

Worker: ``manage.py procrastinate worker --concurrency 2`` (asyncio; woken by LISTEN/NOTIFY;
synchronous tasks run in threads). procrastinate keeps no return value: the round trip ends when
the job's status reads ``succeeded`` (``JobManager.get_job_status``, polled every POLL_SECONDS).
"""

from __future__ import annotations

import time

from djangobase import migrate, setup

DISTRIBUTIONS = ["procrastinate", "Django", "psycopg"]
BULK_API = "Task.batch_defer()"
POLL_SECONDS = 0.002
__all__ = ["migrate"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from procr_site.tasks import count

    count.defer()


def enqueue_bulk(n: int) -> None:
    from procr_site.tasks import count

    count.batch_defer(*({} for _ in range(n)))


def round_trip(timeout: float) -> None:
    from procrastinate.contrib.django import app
    from procrastinate.jobs import Status

    from procr_site.tasks import noop

    job_id = noop.defer()
    give_up = time.monotonic() + timeout
    while (status := app.job_manager.get_job_status(job_id)) != Status.SUCCEEDED:
        if status in (Status.FAILED, Status.CANCELLED, Status.ABORTED):
            raise RuntimeError(f"job {job_id}: {status}")
        if time.monotonic() > give_up:
            raise TimeoutError(f"job {job_id} still {status}")
        time.sleep(POLL_SECONDS)


def purge() -> None:
    """Empty procrastinate's tables (its models are not managed by Django, so no flush)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers,"
            " procrastinate_workers RESTART IDENTITY CASCADE"
        )
