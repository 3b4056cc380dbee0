"""Celery with the Redis broker and the Redis result backend.

Worker: ``celery -A celery_app worker -c 2 -P prefork -l INFO`` (or ``-P threads``).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from counter import bump

DISTRIBUTIONS = ["celery", "kombu", "redis"]
BULK_API = "apply_async() inside producer.batch()"

app = Celery(
    "celery_app", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"]
)
app.conf.broker_connection_retry_on_startup = True


@app.task
def noop() -> None:
    return None


@app.task
def count() -> None:
    bump()


def init() -> None:
    """Nothing to set up."""


def enqueue_one() -> None:
    count.delay()


def enqueue_bulk(n: int) -> None:
    """kombu's ``Producer.batch()`` buffers the publishes in a Redis pipeline."""
    with app.producer_or_acquire() as producer, producer.batch(max_size=n):
        for _ in range(n):
            count.apply_async(producer=producer)


def round_trip(timeout: float) -> None:
    try:
        noop.delay().get(timeout=timeout)
    except CeleryTimeout as exc:
        raise TimeoutError(str(exc)) from exc
