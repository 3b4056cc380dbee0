"""Celery + django-celery-results, for bench/compare/peers/client.py.

Worker: ``celery -A celerydb_site worker -c 2 -P prefork -l INFO`` (or ``-P threads``).
``AsyncResult.get()`` polls the database backend every 0.5 s (its default interval).
"""

from __future__ import annotations

from djangobase import flush, migrate, setup

DISTRIBUTIONS = ["celery", "django-celery-results", "Django", "psycopg"]
BULK_API = "apply_async() inside producer.batch()"
purge = flush
__all__ = ["migrate", "purge"]


def init() -> None:
    setup()


def enqueue_one() -> None:
    from celerydb_site.tasks import count

    count.delay()


def enqueue_bulk(n: int) -> None:
    """kombu's ``Producer.batch()`` buffers the publishes in a Redis pipeline."""
    from celerydb_site.celery import app
    from celerydb_site.tasks import count

    with app.producer_or_acquire() as producer, producer.batch(max_size=n):
        for _ in range(n):
            count.apply_async(producer=producer)


def round_trip(timeout: float) -> None:
    from celery.exceptions import TimeoutError as CeleryTimeout

    from celerydb_site.tasks import noop

    try:
        noop.delay().get(timeout=timeout)
    except CeleryTimeout as exc:
        raise TimeoutError(str(exc)) from exc
