"""Huey on the benchmark's Redis: results in Redis, with ``notify_result`` (BLPOP, no polling).

Worker: ``huey_consumer huey_app.huey -w 2 -k process`` (or ``-k thread``).
"""

from __future__ import annotations

import os

from counter import bump
from huey import RedisHuey
from huey.exceptions import ResultTimeout

DISTRIBUTIONS = ["huey", "redis"]
BULK_API = None

# store_none: a no-op returns None, and Huey stores no None result unless told to.
huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"], notify_result=True, store_none=True)


@huey.task()
def noop() -> None:
    return None


@huey.task()
def count() -> None:
    bump()


def init() -> None:
    """Nothing to set up."""


def enqueue_one() -> None:
    count()


enqueue_bulk = None


def round_trip(timeout: float) -> None:
    try:
        noop().get(blocking=True, timeout=timeout)
    except ResultTimeout as exc:
        raise TimeoutError(str(exc)) from exc
