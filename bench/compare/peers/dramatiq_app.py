"""Dramatiq with the Redis broker and the Results middleware on Redis.

Worker: ``dramatiq dramatiq_app -p 2 -t 1`` (processes) or ``-p 1 -t 2`` (threads).
"""

from __future__ import annotations

import os

import dramatiq
from counter import bump
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results, ResultTimeout
from dramatiq.results.backends import RedisBackend

DISTRIBUTIONS = ["dramatiq", "redis"]
BULK_API = None

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
broker.add_middleware(Results(backend=RedisBackend(url=os.environ["BENCH_REDIS_URL"])))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop() -> None:
    return None


@dramatiq.actor(store_results=True)
def count() -> None:
    bump()


def init() -> None:
    """Nothing to set up."""


def enqueue_one() -> None:
    count.send()


enqueue_bulk = None


def round_trip(timeout: float) -> None:
    try:
        noop.send().get_result(block=True, timeout=int(timeout * 1000))
    except ResultTimeout as exc:
        raise TimeoutError(str(exc)) from exc
